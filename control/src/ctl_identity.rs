//! straitctl's identity commands: `token create`, `cert issue`, `cert agent`.
//! Private keys are generated here, in memory; only CSRs leave the process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use strait_control_ca::new_key_and_csr;
use strait_control_client::identity::{
    call_any, discover, now_unix, write_atomic, write_files, IdentityEndpoints, SvidRequest,
};
use strait_control_client::live_tls::{self, TlsSource};
use strait_control_client::ClientConfig;
use strait_proto::control as pb;
use tonic::transport::Channel;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}': {e}"))
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a join token (admin only); prints the token on stdout.
    Create {
        /// SPIFFE ID glob the token may be redeemed for, e.g.
        /// `spiffe://example.org/edge/*` (`*` stays within a path segment).
        #[arg(long)]
        spiffe_id: String,
        #[arg(long, default_value = "10m", value_parser = duration)]
        ttl: Duration,
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Start the next CA generation now (admin only): published at once,
    /// signing after the publication delay; the current one then retires.
    Rotate,
    /// Print the trust bundle (every root to trust now) as PEM.
    Bundle {
        /// Also include the bootstrap CA the nodes' first certificates
        /// chain to (`--tls-client-ca` of strait-control): the file then
        /// verifies the control nodes whichever certificate they serve.
        #[arg(long)]
        with_server_ca: bool,
        /// Write the PEM to FILE (atomically) instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Issue a certificate for any identity (admin only): writes cert.pem,
    /// key.pem (0600) and bundle.pem to --out, or prints them.
    Issue {
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (default: the role's, e.g. 1h for workloads).
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        out: Option<PathBuf>,
        /// DNS name served by the certificate's holder (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP address served by the certificate's holder (repeatable).
        #[arg(long)]
        ip: Vec<String>,
    },
    /// Join with a token, then keep cert.pem/key.pem/bundle.pem in --dir
    /// renewed at half-life; run a command or signal a process after each
    /// write (for clients that read their files only at start).
    Agent {
        #[arg(long)]
        token: String,
        #[arg(long)]
        spiffe_id: String,
        #[arg(long)]
        dir: PathBuf,
        /// Run with `sh -c` after each renewal.
        #[arg(long, conflicts_with = "signal")]
        exec: Option<String>,
        /// Signal (e.g. HUP) to send to --pid after each renewal.
        #[arg(long, requires = "pid")]
        signal: Option<String>,
        #[arg(long, requires = "signal")]
        pid: Option<u32>,
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long)]
        ip: Vec<String>,
        /// Stop after the first certificate is written.
        #[arg(long)]
        once: bool,
    },
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{} ({:?})", s.message(), s.code())
}

/// Channels to every endpoint with straitctl's own TLS settings, through
/// the control client's TLS (the `--ca` roots are announced, so a node
/// serves the certificate they verify).
fn admin_channels(cfg: &ClientConfig) -> Result<Vec<(String, Channel)>> {
    let tls = cfg.tls.as_ref().ok_or_else(|| {
        anyhow!("identity commands need TLS: give --ca (and --cert/--key for admin commands)")
    })?;
    let source = TlsSource::from_pem(tls)?;
    cfg.endpoints
        .iter()
        .map(|ep| {
            let channel = live_tls::channel(
                ep,
                &source,
                tls.domain.as_deref(),
                Duration::from_secs(3),
                Some(cfg.request_timeout),
            )
            .map_err(|e| anyhow!("endpoint '{ep}': {e}"))?;
            Ok((ep.clone(), channel))
        })
        .collect()
}

pub async fn run_ca(cfg: &ClientConfig, cmd: CaCmd) -> Result<()> {
    let channels = admin_channels(cfg)?;
    match cmd {
        CaCmd::Rotate => {
            let resp = call_any(&channels, cfg.request_timeout, |mut c| async move {
                c.rotate_ca(pb::RotateCaRequest {}).await
            })
            .await
            .map_err(status_err)?;
            println!(
                "CA generation {} published; it signs from unix {}",
                resp.generation, resp.activate_at_unix
            );
        }
        CaCmd::Bundle {
            with_server_ca,
            out,
        } => {
            let resp = call_any(&channels, cfg.request_timeout, |mut c| async move {
                c.trust_bundle(pb::TrustBundleRequest {}).await
            })
            .await
            .map_err(status_err)?;
            if resp.bundle_pem.trim().is_empty() {
                bail!("the CA of {} has no root yet; retry", resp.trust_domain);
            }
            let mut pem = String::new();
            if with_server_ca {
                pem.push_str(&resp.server_ca_pem);
                if !pem.ends_with('\n') {
                    pem.push('\n');
                }
            }
            pem.push_str(&resp.bundle_pem);
            match out {
                Some(path) => {
                    let dir = path
                        .parent()
                        .filter(|d| !d.as_os_str().is_empty())
                        .unwrap_or(std::path::Path::new("."));
                    let name = path
                        .file_name()
                        .ok_or_else(|| anyhow!("--out {} names no file", path.display()))?
                        .to_string_lossy();
                    write_atomic(dir, &name, pem.as_bytes(), 0o644)?;
                }
                None => print!("{pem}"),
            }
        }
    }
    Ok(())
}

pub async fn run_token(cfg: &ClientConfig, cmd: TokenCmd) -> Result<()> {
    let TokenCmd::Create {
        spiffe_id,
        ttl,
        uses,
    } = cmd;
    let channels = admin_channels(cfg)?;
    let req = pb::CreateJoinTokenRequest {
        spiffe_id_pattern: spiffe_id,
        ttl_seconds: ttl.as_secs(),
        uses,
    };
    let resp = call_any(&channels, cfg.request_timeout, |mut c| {
        let r = req.clone();
        async move { c.create_join_token(r).await }
    })
    .await
    .map_err(status_err)?;
    println!("{}", resp.token);
    eprintln!(
        "# join token {} for {} ({} use(s)), expires at unix {}",
        resp.id, req.spiffe_id_pattern, uses, resp.expires_at_unix
    );
    Ok(())
}

pub async fn run_cert(cfg: &ClientConfig, cmd: CertCmd) -> Result<()> {
    match cmd {
        CertCmd::Issue {
            spiffe_id,
            ttl,
            out,
            dns,
            ip,
        } => {
            let channels = admin_channels(cfg)?;
            let (key, csr) = new_key_and_csr().map_err(|e| anyhow!("{e}"))?;
            let req = pb::IssueRequest {
                spiffe_id,
                csr_pem: csr,
                dns_names: dns,
                ips: ip,
                ttl_seconds: ttl.map(|d| d.as_secs()).unwrap_or(0),
            };
            let resp = call_any(&channels, cfg.request_timeout, |mut c| {
                let r = req.clone();
                async move { c.issue(r).await }
            })
            .await
            .map_err(status_err)?;
            match out {
                Some(dir) => {
                    write_files(&dir, &resp.cert_pem, &key, &resp.bundle_pem)?;
                    eprintln!(
                        "# {} serial {} valid until unix {} written to {}",
                        resp.spiffe_id,
                        resp.serial,
                        resp.not_after_unix,
                        dir.display()
                    );
                }
                None => {
                    print!("{}{}{}", resp.cert_pem, key.as_str(), resp.bundle_pem);
                }
            }
            Ok(())
        }
        CertCmd::Agent {
            token,
            spiffe_id,
            dir,
            exec,
            signal,
            pid,
            ttl,
            dns,
            ip,
            once,
        } => {
            let agent = Agent {
                cfg: cfg.clone(),
                spiffe_id,
                dir,
                exec,
                signal: signal.zip(pid),
                req: SvidRequest {
                    dns_names: dns,
                    ips: ip,
                    ttl,
                },
            };
            agent.run(&token, once).await
        }
    }
}

struct Agent {
    cfg: ClientConfig,
    spiffe_id: String,
    dir: PathBuf,
    exec: Option<String>,
    signal: Option<(String, u32)>,
    req: SvidRequest,
}

impl Agent {
    async fn run(&self, token: &str, once: bool) -> Result<()> {
        let server_ca = discover(&self.cfg.endpoints, token).await?;
        let ids =
            IdentityEndpoints::new(&self.cfg.endpoints, &server_ca, self.cfg.request_timeout)?;
        let mut svid = ids
            .join(token, &self.spiffe_id, &self.req)
            .await
            .map_err(|e| anyhow!("join: {e}"))?;
        write_files(&self.dir, &svid.cert_pem, &svid.key_pem, &svid.bundle_pem)?;
        eprintln!(
            "# joined as {} (serial {}), valid until unix {}",
            svid.spiffe_id, svid.serial, svid.not_after_unix
        );
        self.notify().await;
        if once {
            return Ok(());
        }
        loop {
            let wait = (svid.renew_at_unix() - now_unix()).max(1) as u64;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            let mut backoff = Duration::from_secs(1);
            loop {
                match ids.renew(&svid, &self.req).await {
                    Ok(next) => {
                        write_files(&self.dir, &next.cert_pem, &next.key_pem, &next.bundle_pem)?;
                        eprintln!(
                            "# renewed (serial {}), valid until unix {}",
                            next.serial, next.not_after_unix
                        );
                        svid = next;
                        self.notify().await;
                        break;
                    }
                    Err(e) if now_unix() + (backoff.as_secs() as i64) < svid.not_after_unix => {
                        eprintln!("# renewal failed: {e}; retrying in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => bail!("the certificate expired without a renewal: {e}"),
                }
            }
        }
    }

    async fn notify(&self) {
        if let Some(cmd) = &self.exec {
            match tokio::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .await
            {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("# --exec '{cmd}' exited with {s}"),
                Err(e) => eprintln!("# --exec '{cmd}': {e}"),
            }
        }
        if let Some((sig, pid)) = &self.signal {
            match tokio::process::Command::new("kill")
                .arg("-s")
                .arg(sig)
                .arg(pid.to_string())
                .status()
                .await
            {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("# signal {sig} to {pid}: kill exited with {s}"),
                Err(e) => eprintln!("# signal {sig} to {pid}: {e}"),
            }
        }
    }
}
