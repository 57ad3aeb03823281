//! The command-line flags of a process that follows the control plane
//! (`strait-edge`, `strait-kms-broker`): one definition, flattened into
//! each binary's `clap` arguments, so the flags and their rules agree.

use std::path::PathBuf;

/// `--control ADDRS --name NAME` with `--control-ca/--control-cert/--control-key`
/// (mTLS) or `--insecure-plaintext` (loopback only).
#[derive(Debug, Clone, clap::Args)]
pub struct ControlConnectionArgs {
    /// Control-plane members to follow (`host:port,host:port`).
    #[arg(long, value_delimiter = ',', requires = "name")]
    pub control: Vec<String>,
    /// This process's name in the control plane: its identity is
    /// `spiffe://<trust_domain>/<edge|kms-broker>/<name>`.
    #[arg(long)]
    pub name: Option<String>,
    /// CA (PEM) that signed the control-plane nodes' certificates.
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        control: ControlConnectionArgs,
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
