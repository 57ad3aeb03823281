//! strait-control's certificate-authority flags and their wiring into the
//! Identity service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use strait_control_api::access::Authorizer;
use strait_control_api::identity::rate::JoinLimit;
use strait_control_api::identity::{IdentityConfig, IdentityService};
use strait_control_ca::{FileSealer, KmsSealer, Lifetimes, RotationPolicy, Sealer};
use strait_control_raft::Node;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}': {e}"))
}

#[derive(Args, Debug, Clone)]
pub struct CaArgs {
    /// DEVELOPMENT: seal the CA key with the 32-byte key in this file
    /// (created, mode 0600, when missing; every node needs the same file).
    #[arg(long)]
    pub ca_seal_key_file: Option<PathBuf>,
    /// Seal the CA key through a KMS: a YAML file holding one KMS entry in
    /// the `kms:` format of the edge and broker (vault, aws_kms, local, broker).
    #[arg(long, requires = "ca_seal_kek")]
    pub ca_seal_kms: Option<PathBuf>,
    /// Name of the KEK (in --ca-seal-kms) that wraps the CA key.
    #[arg(long, requires = "ca_seal_kms")]
    pub ca_seal_kek: Option<String>,
    /// Validity of each CA root.
    #[arg(long, default_value = "365d", value_parser = duration)]
    pub ca_validity: Duration,
    /// Start the next CA generation when the signing one has less than
    /// this left (default: a third of --ca-validity).
    #[arg(long, value_parser = duration)]
    pub ca_rotate_before: Option<Duration>,
    /// How long a new root is in trust bundles before it signs.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub ca_publish_delay: Duration,
    /// Lifetime (default and maximum) of workload certificates (/ns/*/sa/*).
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub cert_ttl_workload: Duration,
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub cert_ttl_edge: Duration,
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub cert_ttl_kms_broker: Duration,
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub cert_ttl_control: Duration,
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub cert_ttl_admin: Duration,
    /// Identity/Join requests per second allowed per source address (a
    /// token bucket; refusals are RESOURCE_EXHAUSTED and audited).
    #[arg(long, default_value_t = 1.0)]
    pub join_rate: f64,
    /// Joins a source may make at once (the bucket's size).
    #[arg(long, default_value_t = 10)]
    pub join_burst: u32,
    /// Source addresses tracked at once; beyond, new sources share one bucket.
    #[arg(long, default_value_t = 10_000)]
    pub join_rate_sources: usize,
}

impl CaArgs {
    /// The node runs the CA of --trust-domain when it is given a sealer.
    pub fn enabled(&self) -> bool {
        self.ca_seal_key_file.is_some() || self.ca_seal_kms.is_some()
    }
}

async fn sealer(args: &CaArgs) -> Result<Arc<dyn Sealer>> {
    match (&args.ca_seal_key_file, &args.ca_seal_kms, &args.ca_seal_kek) {
        (Some(_), Some(_), _) => {
            bail!("use one of --ca-seal-key-file and --ca-seal-kms, not both")
        }
        (Some(path), None, _) => {
            let create = !path.exists();
            let s = FileSealer::open(path, true)?;
            if create {
                tracing::warn!(
                    path = %path.display(),
                    "created a new CA seal key file (development only; give every node the same file)"
                );
            }
            Ok(Arc::new(s))
        }
        (None, Some(file), Some(kek)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading --ca-seal-kms {}", file.display()))?;
            let cfg: strait_kms_broker::core::config::KmsConfig =
                serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(&text))
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "--ca-seal-kms {}: {}: {}",
                            file.display(),
                            e.path(),
                            e.inner()
                        )
                    })?;
            let mut errs = Vec::new();
            cfg.validate_into("kms", &mut errs);
            if !errs.is_empty() {
                let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
                bail!("--ca-seal-kms {}: {}", file.display(), msgs.join("; "));
            }
            let kms = strait_kms_broker::kms::build_kms(&cfg, None)
                .await
                .with_context(|| format!("--ca-seal-kms {}", file.display()))?;
            Ok(Arc::new(KmsSealer::new(kms, kek.clone())))
        }
        _ => bail!("--ca-seal-kms needs --ca-seal-kek NAME"),
    }
}

pub async fn identity_service(
    args: &CaArgs,
    trust_domain: &str,
    node: Node,
    client_ca_pem: &[u8],
    authz: Authorizer,
) -> Result<IdentityService> {
    strait_control_ca::spiffe::validate_trust_domain(trust_domain)
        .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
    let lifetimes = Lifetimes {
        workload: args.cert_ttl_workload,
        edge: args.cert_ttl_edge,
        kms_broker: args.cert_ttl_kms_broker,
        control: args.cert_ttl_control,
        admin: args.cert_ttl_admin,
    };
    lifetimes
        .validate()
        .map_err(|e| anyhow::anyhow!("--cert-ttl-*: {e}"))?;
    let rotation = RotationPolicy {
        validity: args.ca_validity,
        rotate_before: args.ca_rotate_before.unwrap_or(args.ca_validity / 3),
        publish_delay: args.ca_publish_delay,
        longest_leaf: lifetimes.longest(),
    };
    rotation
        .validate()
        .map_err(|e| anyhow::anyhow!("CA rotation flags: {e}"))?;
    // The root that verifies this node's server certificate: the bootstrap
    // CA. Join tokens pin it.
    let server_ca_pem =
        String::from_utf8(client_ca_pem.to_vec()).context("--tls-client-ca is not UTF-8 PEM")?;
    strait_control_ca::root_pin(&server_ca_pem)
        .map_err(|e| anyhow::anyhow!("--tls-client-ca: {e}"))?;
    let join_limit = JoinLimit {
        per_second: args.join_rate,
        burst: args.join_burst,
        max_sources: args.join_rate_sources,
    };
    join_limit.validate().map_err(anyhow::Error::msg)?;
    let sealer = sealer(args).await?;
    Ok(IdentityService::new(
        node,
        IdentityConfig {
            trust_domain: trust_domain.to_string(),
            lifetimes,
            rotation,
            sealer,
            authz,
            server_ca_pem,
            join_limit,
        },
    ))
}
