//! straitctl: command-line client of the Strait control plane.

#[path = "../ctl_failover.rs"]
mod ctl_failover;
#[path = "../ctl_identity.rs"]
mod ctl_identity;
#[path = "../ctl_planned.rs"]
mod ctl_planned;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use strait_control_client::live_tls::TlsError;
use strait_control_client::{ClientConfig, ClientError, ControlClient, TlsConfig};
use strait_control_state::{validate_command, Command, CommandError, Kind};
use strait_proto::control as pb;

#[derive(Parser, Debug)]
#[command(name = "straitctl", about = "Manage the Strait control plane")]
struct Cli {
    /// Control-plane members, comma-separated host:port.
    #[arg(
        long,
        env = "STRAITCTL_ENDPOINTS",
        default_value = "127.0.0.1:7001",
        global = true
    )]
    endpoints: String,
    /// CA certificates (PEM) that verify the control nodes; enables TLS.
    /// Their subjects are announced in the handshake, so with the output of
    /// `ca bundle --with-server-ca` the nodes serve their CA-issued
    /// certificates, with the bootstrap CA alone their bootstrap one.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS.
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// Talk to the control plane without TLS; only to loopback endpoints.
    #[arg(
        long,
        global = true,
        env = "STRAITCTL_INSECURE_PLAINTEXT",
        conflicts_with = "ca"
    )]
    insecure_plaintext: bool,
    /// How long a command keeps trying members that are unavailable or have
    /// no leader yet (an election), e.g. `10s`, `1m`.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create or update the resources of a YAML file (documents separated by ---).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Show resources of a kind, or one by name.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Label selector: k=v,k!=v,k,!k
        #[arg(short = 'l', long, default_value = "")]
        selector: String,
        /// Read the answering member's replica without a ReadIndex round
        /// (works without a leader; may be behind).
        #[arg(long)]
        stale: bool,
    },
    Delete {
        kind: String,
        name: String,
    },
    /// Stream changes of a kind ("all" for every kind).
    Watch {
        kind: String,
        /// Start from this revision instead of listing first.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// List members, or add/remove one.
    Members {
        #[command(subcommand)]
        action: Option<MembersCmd>,
    },
    /// Raft status of every endpoint.
    Status,
    /// Join tokens (admin).
    Token {
        #[command(subcommand)]
        action: ctl_identity::TokenCmd,
    },
    /// The control plane's certificate authority.
    Ca {
        #[command(subcommand)]
        action: ctl_identity::CaCmd,
    },
    /// Certificates from the control plane's CA.
    Cert {
        #[command(subcommand)]
        action: ctl_identity::CertCmd,
    },
    /// Key-encryption keys across realms (federated encryption).
    Kek {
        #[command(subcommand)]
        action: KekCmd,
    },
    /// Make a standby (or --to CLUSTER) the active cluster of a
    /// FailoverGroup (admin); every edge following the group switches.
    Failover(ctl_failover::FailoverArgs),
    /// Make a FailoverGroup's primary its active cluster again (admin).
    Failback(ctl_failover::FailbackArgs),
}

#[derive(Subcommand, Debug)]
enum KekCmd {
    /// Crypto-shred a KEK everywhere (irreversible): every kms-broker that
    /// follows the control plane deletes it in its realm (Vault: the transit
    /// key is deleted; AWS: disabled and scheduled for deletion) and refuses
    /// it; every edge refuses it and drops its cached DEKs.
    Shred {
        /// The KEK name as rules name it (`kek-orders`; AWS: `alias/kek-orders`
        /// or the bare name).
        name: String,
        /// Only these realms (repeatable); default every realm.
        #[arg(long = "kms")]
        kms: Vec<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// The KekShred orders and what each kms-broker reported doing.
    Shreds,
}

/// The KekShred resource name of a KEK name: resource names are DNS-like,
/// KEK names may carry `/` (`alias/kek-orders`).
fn shred_resource_name(kek: &str) -> String {
    let mut out: String = kek
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out = out.trim_matches(|c| c == '-' || c == '.').to_string();
    if out.is_empty() {
        out = "kek".into();
    }
    out
}

#[derive(Subcommand, Debug)]
enum MembersCmd {
    Add { id: u64, addr: String },
    Remove { id: u64 },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    kind: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    spec: serde_yaml_ng::Value,
}

#[derive(Debug, Serialize)]
struct Printable {
    kind: String,
    name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    spec: serde_json::Value,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    status: serde_json::Value,
    revision: u64,
    create_revision: u64,
}

fn printable(r: &pb::Resource) -> Printable {
    Printable {
        kind: r.kind.clone(),
        name: r.name.clone(),
        labels: r.labels.clone().into_iter().collect(),
        spec: serde_json::from_str(&r.spec_json).unwrap_or(serde_json::Value::Null),
        status: if r.status_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&r.status_json).unwrap_or(serde_json::Value::Null)
        },
        revision: r.revision,
        create_revision: r.create_revision,
    }
}

/// Parses and validates every document before anything is sent, so a bad
/// file changes nothing.
fn load_manifests(path: &PathBuf) -> Result<Vec<(usize, Command)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = path.display().to_string();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let n = i + 1;
        let value = match serde_yaml_ng::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{file}: document {n}: YAML syntax: {e}"));
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let m: Manifest = match serde_path_to_error::deserialize(value) {
            Ok(m) => m,
            Err(e) => {
                let p = e.path().to_string();
                let at = if p == "." {
                    String::new()
                } else {
                    format!("{p}: ")
                };
                errors.push(format!("{file}: document {n}: {at}{}", e.into_inner()));
                continue;
            }
        };
        let kind = match Kind::parse(&m.kind) {
            Ok(k) => k,
            Err(msg) => {
                errors.push(format!("{file}: document {n} ({}): kind: {msg}", m.name));
                continue;
            }
        };
        let spec = match serde_json::to_value(&m.spec) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!(
                    "{file}: document {n} ({kind} {}): spec: {e}",
                    m.name
                ));
                continue;
            }
        };
        let cmd = Command::Apply {
            kind,
            name: m.name.clone(),
            labels: m.labels,
            spec,
            expected_revision: None,
        };
        match validate_command(&cmd) {
            Ok(()) => out.push((n, cmd)),
            Err(CommandError::Invalid { errors: es, .. }) => {
                for e in es {
                    errors.push(format!("{file}: document {n} ({kind} {}): {e}", m.name));
                }
            }
            Err(e) => errors.push(format!("{file}: document {n}: {e}")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(out)
}

fn summary(r: &pb::Resource) -> String {
    let s = r.spec_json.replace('"', "");
    if s.len() > 70 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(67).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

fn print_table(rows: &[pb::Resource]) {
    let headers = ["KIND", "NAME", "REVISION", "LABELS", "SPEC"];
    let body: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let labels: Vec<String> = {
                let mut l: Vec<_> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                l.sort();
                l
            };
            [
                r.kind.clone(),
                r.name.clone(),
                r.revision.to_string(),
                if labels.is_empty() {
                    "<none>".into()
                } else {
                    labels.join(",")
                },
                summary(r),
            ]
        })
        .collect();
    let mut w = headers.map(str::len);
    for row in &body {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 4 {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<width$}   ", c, width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers);
    for row in &body {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
}

fn print_resources(rows: &[pb::Resource], output: Output, single: bool) -> Result<()> {
    match output {
        Output::Table => print_table(rows),
        Output::Json => {
            let p: Vec<Printable> = rows.iter().map(printable).collect();
            if single && p.len() == 1 {
                println!("{}", serde_json::to_string_pretty(&p[0])?);
            } else {
                println!("{}", serde_json::to_string_pretty(&p)?);
            }
        }
        Output::Yaml => {
            for (i, r) in rows.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", serde_yaml_ng::to_string(&printable(r))?);
            }
        }
    }
    Ok(())
}

fn print_event(ev: &pb::WatchEvent) {
    let t = pb::EventType::try_from(ev.r#type)
        .map(|t| {
            t.as_str_name()
                .trim_start_matches("EVENT_TYPE_")
                .to_string()
        })
        .unwrap_or_else(|_| "?".into());
    match &ev.resource {
        Some(r) => println!(
            "{}\t{t}\t{}/{}\t{}",
            ev.revision, r.kind, r.name, r.spec_json
        ),
        None => println!("{}\t{t}", ev.revision),
    }
}

/// FailoverGroups printed as YAML or JSON show the decision in force and
/// `status.edges`, each edge's applied generation from its heartbeat. The
/// Edges are read for that only; without them the groups print as stored.
async fn with_failover_view(client: &ControlClient, rows: &mut [pb::Resource], output: Output) {
    if output == Output::Table || !rows.iter().any(|r| r.kind == Kind::FailoverGroup.as_str()) {
        return;
    }
    match client.list(Kind::Edge.as_str(), "").await {
        Ok(edges) => ctl_failover::annotate(rows, &edges.resources),
        Err(s) => eprintln!("# cannot list Edges for status.edges: {}", s.message()),
    }
}

fn kind_arg(s: &str) -> Result<String> {
    Ok(Kind::parse(s).map_err(|e| anyhow!(e))?.as_str().to_string())
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{} ({:?})", s.message(), s.code())
}

/// A client error naming the file a TLS error comes from.
fn tls_files_error(e: ClientError, cli: &Cli) -> anyhow::Error {
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    match &e {
        ClientError::Tls(TlsError::Roots(m)) => anyhow!("--ca {}: {m}", path(&cli.ca)),
        ClientError::Tls(TlsError::ClientCert(m)) => anyhow!("--cert {}: {m}", path(&cli.cert)),
        ClientError::Tls(TlsError::ClientKey(m)) => anyhow!("--key {}: {m}", path(&cli.key)),
        ClientError::Tls(TlsError::ClientPair(m)) => {
            anyhow!("--cert {} / --key {}: {m}", path(&cli.cert), path(&cli.key))
        }
        _ => e.into(),
    }
}

async fn run(cli: Cli) -> Result<()> {
    let endpoints: Vec<String> = cli
        .endpoints
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut cfg = ClientConfig::new(&endpoints);
    cfg.request_timeout = cli.timeout;
    // `cert agent` authenticates the control plane by its join token's pin
    // and always uses TLS; it needs neither --ca nor the plaintext rule.
    let pinned = matches!(
        cli.cmd,
        Cmd::Cert {
            action: ctl_identity::CertCmd::Agent { .. }
        }
    );
    if cli.ca.is_none() && !pinned {
        strait_control_client::plaintext::check_plaintext(
            cli.insecure_plaintext,
            "straitctl",
            endpoints.iter().map(String::as_str),
        )
        .map_err(anyhow::Error::msg)?;
    }
    if let Some(ca) = &cli.ca {
        cfg.tls = Some(TlsConfig {
            ca_pem: std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            cert_pem: cli.cert.as_ref().map(std::fs::read).transpose()?,
            key_pem: cli.key.as_ref().map(std::fs::read).transpose()?,
            domain: None,
        });
    }
    let client = ControlClient::new(&cfg).map_err(|e| tls_files_error(e, &cli))?;
    match cli.cmd {
        Cmd::Token { action } => ctl_identity::run_token(&cfg, action).await?,
        Cmd::Cert { action } => ctl_identity::run_cert(&cfg, action).await?,
        Cmd::Ca { action } => ctl_identity::run_ca(&cfg, action).await?,
        Cmd::Failover(args) => ctl_failover::run_failover(&client, args).await?,
        Cmd::Failback(args) => ctl_failover::run_failback(&client, args).await?,
        Cmd::Apply { file } => {
            let cmds = load_manifests(&file)?;
            for (n, cmd) in cmds {
                let Command::Apply {
                    kind,
                    name,
                    labels,
                    spec,
                    ..
                } = cmd
                else {
                    continue;
                };
                let req = pb::ApplyRequest {
                    resource: Some(pb::Resource {
                        kind: kind.as_str().into(),
                        name: name.clone(),
                        labels: labels.into_iter().collect(),
                        spec_json: spec.to_string(),
                        ..Default::default()
                    }),
                    expected_revision: None,
                };
                let resp = client.apply(req).await.map_err(|s| {
                    anyhow!(
                        "{}: document {n} ({kind} {name}): {}",
                        file.display(),
                        status_err(s)
                    )
                })?;
                let r = resp.resource.unwrap_or_default();
                let verb = if !resp.changed {
                    "unchanged"
                } else if r.create_revision == r.revision {
                    "created"
                } else {
                    "configured"
                };
                println!("{kind}/{name} {verb} (revision {})", r.revision);
            }
        }
        Cmd::Get {
            kind,
            name,
            output,
            selector,
            stale,
        } => {
            let kind = if kind == "all" {
                String::new()
            } else {
                kind_arg(&kind)?
            };
            match name {
                Some(name) => {
                    let req = pb::GetRequest { kind, name, stale };
                    let r = client
                        .call(|mut c| {
                            let r = req.clone();
                            async move { c.get(r).await }
                        })
                        .await
                        .map_err(status_err)?;
                    let mut rows = [r];
                    with_failover_view(&client, &mut rows, output).await;
                    print_resources(&rows, output, true)?;
                }
                None => {
                    let req = pb::ListRequest {
                        kind,
                        label_selector: selector,
                        stale,
                    };
                    let mut l = client
                        .call(|mut c| {
                            let r = req.clone();
                            async move { c.list(r).await }
                        })
                        .await
                        .map_err(status_err)?;
                    with_failover_view(&client, &mut l.resources, output).await;
                    print_resources(&l.resources, output, false)?;
                }
            }
        }
        Cmd::Kek {
            action: KekCmd::Shred { name, kms, reason },
        } => {
            let resource = shred_resource_name(&name);
            let mut spec = serde_json::json!({ "kek": name });
            if !kms.is_empty() {
                spec["kms"] = serde_json::json!(kms);
            }
            if let Some(reason) = &reason {
                spec["reason"] = serde_json::json!(reason);
            }
            let req = pb::ApplyRequest {
                resource: Some(pb::Resource {
                    kind: Kind::KekShred.as_str().into(),
                    name: resource.clone(),
                    spec_json: spec.to_string(),
                    ..Default::default()
                }),
                expected_revision: None,
            };
            let resp = client.apply(req).await.map_err(status_err)?;
            let r = resp.resource.unwrap_or_default();
            let realms = if kms.is_empty() {
                "every realm".to_string()
            } else {
                kms.join(", ")
            };
            println!(
                "KekShred/{resource} {} (revision {}): {name} is shredded in {realms}; kms-brokers delete it and refuse it, edges refuse it and drop cached DEKs (see `straitctl kek shreds`)",
                if resp.changed { "created" } else { "unchanged" },
                r.revision
            );
        }
        Cmd::Kek {
            action: KekCmd::Shreds,
        } => {
            let list = |kind: Kind| {
                let req = pb::ListRequest {
                    kind: kind.as_str().into(),
                    label_selector: String::new(),
                    stale: false,
                };
                let client = &client;
                async move {
                    client
                        .call(|mut c| {
                            let r = req.clone();
                            async move { c.list(r).await }
                        })
                        .await
                        .map_err(status_err)
                }
            };
            let shreds = list(Kind::KekShred).await?;
            let brokers = list(Kind::KmsBroker).await?;
            for r in &shreds.resources {
                let spec: serde_json::Value =
                    serde_json::from_str(&r.spec_json).unwrap_or_default();
                let kek = spec["kek"].as_str().unwrap_or_default();
                println!(
                    "{}\tkek={kek}\tkms={}\treason={}",
                    r.name,
                    spec.get("kms").map_or("*".to_string(), |k| k.to_string()),
                    spec["reason"].as_str().unwrap_or("-")
                );
                for b in &brokers.resources {
                    let status: serde_json::Value =
                        serde_json::from_str(&b.status_json).unwrap_or_default();
                    for s in status["shredded"].as_array().into_iter().flatten() {
                        if s["kek"].as_str() == Some(kek) {
                            println!(
                                "  kms-broker {}: {} {}",
                                b.name,
                                s["kms"].as_str().unwrap_or("?"),
                                s["outcome"].as_str().unwrap_or("?")
                            );
                        }
                    }
                }
            }
        }
        Cmd::Delete { kind, name } => {
            let kind = kind_arg(&kind)?;
            let r = client.delete(&kind, &name).await.map_err(status_err)?;
            println!("{kind}/{name} deleted (revision {})", r.revision);
        }
        Cmd::Watch { kind, from } => {
            let kinds = if kind == "all" {
                vec![]
            } else {
                vec![kind_arg(&kind)?]
            };
            // Follows the stream across member failures: resume from the
            // next revision on another member, list again if it was compacted.
            let mut next = from;
            let mut failures = 0u32;
            loop {
                let (ep, mut c) = client.current();
                let res = c
                    .watch(pb::WatchRequest {
                        kinds: kinds.clone(),
                        label_selector: String::new(),
                        start_revision: next,
                    })
                    .await;
                let err = match res {
                    Ok(resp) => {
                        let mut stream = resp.into_inner();
                        // Listing events are not in revision order: only
                        // the SYNCED marker and later events move `next`.
                        let mut synced = next != 0;
                        loop {
                            match stream.message().await {
                                Ok(Some(ev)) => {
                                    failures = 0;
                                    if ev.r#type == pb::EventType::Synced as i32 {
                                        synced = true;
                                    }
                                    if synced {
                                        next = ev.revision + 1;
                                    }
                                    print_event(&ev);
                                }
                                Ok(None) => break tonic::Status::unavailable("stream ended"),
                                Err(e) => break e,
                            }
                        }
                    }
                    Err(e) => e,
                };
                if err.code() == tonic::Code::OutOfRange {
                    eprintln!("# revision {next} was compacted; listing again");
                    next = 0;
                    continue;
                }
                if !matches!(
                    err.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Aborted
                        | tonic::Code::Cancelled
                ) {
                    return Err(status_err(err));
                }
                failures += 1;
                if failures > 3 * client.endpoints().len() as u32 {
                    return Err(anyhow!("no member reachable: {}", err.message()));
                }
                eprintln!("# {ep}: {}; resuming from revision {next}", err.message());
                client.rotate();
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        Cmd::Members { action } => {
            let resp = match action {
                None => client.members().await,
                Some(MembersCmd::Add { id, addr }) => {
                    client
                        .call(|mut c| {
                            let addr = addr.clone();
                            async move { c.add_member(pb::AddMemberRequest { id, addr }).await }
                        })
                        .await
                }
                Some(MembersCmd::Remove { id }) => {
                    client
                        .call(|mut c| async move {
                            c.remove_member(pb::RemoveMemberRequest { id }).await
                        })
                        .await
                }
            }
            .map_err(status_err)?;
            println!("{:<6} {:<24} {:<8} ROLE", "ID", "ADDRESS", "VOTER");
            for m in resp.members {
                println!(
                    "{:<6} {:<24} {:<8} {}",
                    m.id,
                    m.addr,
                    m.is_voter,
                    if m.is_leader { "leader" } else { "follower" }
                );
            }
        }
        Cmd::Status => {
            println!(
                "{:<22} {:<4} {:<10} {:<7} {:<6} {:<8} {:<8} {:<9} REVISION",
                "ENDPOINT", "ID", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "SNAPSHOT"
            );
            for ep in client.endpoints() {
                let one = ControlClient::new(&ClientConfig {
                    endpoints: vec![ep.clone()],
                    ..cfg.clone()
                })?;
                let (_, mut c) = one.current();
                match c.status(pb::StatusRequest {}).await {
                    Ok(s) => {
                        let s = s.into_inner();
                        println!(
                            "{:<22} {:<4} {:<10} {:<7} {:<6} {:<8} {:<8} {:<9} {}",
                            ep,
                            s.id,
                            s.role,
                            s.leader_id,
                            s.term,
                            s.commit_index,
                            s.applied_index,
                            s.snapshot_index,
                            s.revision
                        );
                    }
                    Err(e) => println!("{ep:<22} unreachable: {}", e.message()),
                }
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    // Built in one workspace with the AWS SDK, rustls has two crypto
    // providers compiled in and cannot pick one by itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
