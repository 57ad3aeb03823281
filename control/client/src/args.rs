//! The command-line flags of a process that follows the control plane
//! (`strait-edge`, `strait-kms-broker`): one definition, flattened into
//! each binary's `clap` arguments, so the flags and their rules agree.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::SvidRequest;

/// `--control ADDRS --name NAME` with `--control-ca/--control-cert/--control-key`
/// (mTLS), `--insecure-plaintext` (loopback only), or `--join-token` of
/// [`SvidArgs`] (mTLS with the process's own SVID).
#[derive(Debug, Clone, clap::Args)]
pub struct ControlConnectionArgs {
    /// Control-plane members to follow (`host:port,host:port`).
    #[arg(long, value_delimiter = ',', requires = "name")]
    pub control: Vec<String>,
    /// This process's name in the control plane: its identity is
    /// `spiffe://<trust_domain>/<edge|kms-broker>/<name>`.
    #[arg(long)]
    pub name: Option<String>,
    /// CA certificates (PEM) that verify the control-plane nodes: the
    /// bootstrap CA, or `straitctl ca bundle --with-server-ca` (then the
    /// nodes serve their CA-issued certificates; see docs/security.md).
    #[arg(long, value_name = "FILE", requires_all = ["control", "control_cert", "control_key"])]
    pub control_ca: Option<PathBuf>,
    /// The client certificate (PEM) towards the control plane, re-read at
    /// every reconnect; its SPIFFE ID decides what this process may read
    /// and write.
    #[arg(long, value_name = "FILE", requires = "control_ca")]
    pub control_cert: Option<PathBuf>,
    /// The private key (PEM) of `--control-cert`.
    #[arg(long, value_name = "FILE", requires = "control_ca")]
    pub control_key: Option<PathBuf>,
    /// Follow the control plane without TLS; only when every --control
    /// address is loopback.
    #[arg(long, requires = "control", conflicts_with = "control_ca")]
    pub insecure_plaintext: bool,
}

/// `--join-token T` and what the certificate it gets should say: the
/// process then gets `spiffe://<domain>/<edge|kms-broker>/<name>` from the
/// control plane's CA and renews it itself (see [`crate::svid`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SvidArgs {
    /// Join the control plane with this token (from `straitctl token
    /// create`): this process gets its certificate
    /// `spiffe://<domain>/<edge|kms-broker>/<name>` from the control plane's
    /// CA and renews it itself. Not needed again while a still-valid
    /// certificate is in --cache-dir.
    #[arg(long, env = "STRAIT_JOIN_TOKEN", hide_env_values = true, requires = "control",
          conflicts_with_all = ["control_ca", "insecure_plaintext"])]
    pub join_token: Option<String>,
    /// Extra DNS names for this process's certificate (besides the hosts
    /// its listeners are reached at).
    #[arg(long, value_delimiter = ',')]
    pub svid_dns: Vec<String>,
    /// Extra IP addresses for this process's certificate.
    #[arg(long, value_delimiter = ',')]
    pub svid_ip: Vec<String>,
    /// Lifetime to ask for (default: the control plane's `--cert-ttl-edge`
    /// or `--cert-ttl-kms-broker`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub svid_ttl: Option<Duration>,
}

impl SvidArgs {
    /// What the certificate should name: `hosts` (the listeners' addresses;
    /// IPs become IP SANs, an unspecified address names nothing, the rest
    /// are DNS names), `--svid-dns` and `--svid-ip`, sorted and deduplicated.
    pub fn request<'a>(&'a self, hosts: impl IntoIterator<Item = &'a str>) -> SvidRequest {
        let mut dns = BTreeSet::new();
        let mut ips = BTreeSet::new();
        let all = hosts
            .into_iter()
            .chain(self.svid_dns.iter().map(String::as_str))
            .chain(self.svid_ip.iter().map(String::as_str));
        for host in all {
            let host = host.trim_matches(['[', ']']);
            match host.parse::<std::net::IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => {
                    ips.insert(ip.to_string());
                }
                Ok(_) => {}
                Err(_) if !host.is_empty() => {
                    dns.insert(host.to_ascii_lowercase());
                }
                Err(_) => {}
            }
        }
        SvidRequest {
            dns_names: dns.into_iter().collect(),
            ips: ips.into_iter().collect(),
            ttl: self.svid_ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        control: ControlConnectionArgs,
        #[command(flatten)]
        svid: SvidArgs,
    }

    #[test]
    fn join_token_needs_control_and_excludes_files_and_plaintext() {
        let ok = Cli::try_parse_from([
            "x",
            "--control",
            "a:1",
            "--name",
            "k1",
            "--join-token",
            "T",
            "--svid-dns",
            "kms.example.org,KMS2.example.org",
            "--svid-ip",
            "10.0.0.5",
            "--svid-ttl",
            "1m",
        ])
        .unwrap();
        assert_eq!(ok.svid.join_token.as_deref(), Some("T"));
        let req = ok
            .svid
            .request(["127.0.0.1", "0.0.0.0", "[::1]", "kms.example.org"]);
        assert_eq!(
            req,
            SvidRequest {
                dns_names: vec!["kms.example.org".into(), "kms2.example.org".into()],
                ips: vec!["10.0.0.5".into(), "127.0.0.1".into(), "::1".into()],
                ttl: Some(Duration::from_secs(60)),
            }
        );
        assert!(Cli::try_parse_from(["x", "--join-token", "T"]).is_err());
        for extra in [
            &["--insecure-plaintext"][..],
            &[
                "--control-ca",
                "ca",
                "--control-cert",
                "c",
                "--control-key",
                "k",
            ][..],
        ] {
            let args = [
                &["x", "--control", "a:1", "--name", "n", "--join-token", "T"][..],
                extra,
            ]
            .concat();
            assert!(Cli::try_parse_from(args).is_err(), "{extra:?}");
        }
    }

    #[test]
    fn mtls_needs_all_three_files_and_a_name() {
        let ok = Cli::try_parse_from([
            "x",
            "--control",
            "a:1,b:2",
            "--name",
            "n",
            "--control-ca",
            "ca",
            "--control-cert",
            "c",
            "--control-key",
            "k",
        ])
        .unwrap();
        assert_eq!(ok.control.control, ["a:1", "b:2"]);
        assert!(Cli::try_parse_from(["x", "--control", "a:1"]).is_err());
        assert!(Cli::try_parse_from([
            "x",
            "--control",
            "a:1",
            "--name",
            "n",
            "--control-ca",
            "ca"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "x",
            "--control",
            "a:1",
            "--name",
            "n",
            "--insecure-plaintext",
            "--control-ca",
            "ca",
            "--control-cert",
            "c",
            "--control-key",
            "k",
        ])
        .is_err());
    }
}
