//! `strait-testcerts`: test PKI for the integration tests.
//!
//! `strait-testcerts ca --dir D --name ca` writes `D/ca.pem` and `D/ca.key`;
//! `strait-testcerts leaf --dir D --ca ca --name client --uri spiffe://td/ns/a/sa/b`
//! writes `D/client.pem` and `D/client.key`, signed by `D/ca.*`. Validity can
//! be moved into the past or future to make expired or not-yet-valid certificates.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A self-signed certificate authority.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 30)]
        valid_days: i64,
    },
    /// A certificate signed by a CA made with `ca`.
    Leaf {
        #[arg(long)]
        dir: PathBuf,
        /// Name of the CA files in `dir`.
        #[arg(long)]
        ca: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        cn: Option<String>,
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        #[arg(long)]
        uri: Vec<String>,
        /// Days from now the certificate becomes valid (negative: in the past).
        #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
        valid_from_days: i64,
        #[arg(long, default_value_t = 30)]
        valid_days: i64,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Ca {
            dir,
            name,
            valid_days,
        } => {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, &name);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::days(1);
            params.not_after = now + Duration::days(valid_days);
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            write(&dir, &name, &cert.pem(), &key.serialize_pem())
        }
        Command::Leaf {
            dir,
            ca,
            name,
            cn,
            dns,
            ip,
            uri,
            valid_from_days,
            valid_days,
        } => {
            let ca_pem = std::fs::read_to_string(dir.join(format!("{ca}.pem")))
                .with_context(|| format!("reading CA {ca}"))?;
            let ca_key =
                KeyPair::from_pem(&std::fs::read_to_string(dir.join(format!("{ca}.key")))?)?;
            let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, cn.unwrap_or_else(|| name.clone()));
            for host in dns {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(host.try_into()?));
            }
            for address in ip {
                params.subject_alt_names.push(SanType::IpAddress(address));
            }
            for uri in uri {
                params.subject_alt_names.push(SanType::URI(uri.try_into()?));
            }
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.use_authority_key_identifier_extension = true;
            let now = OffsetDateTime::now_utc();
            params.not_before = now + Duration::days(valid_from_days);
            params.not_after = params.not_before + Duration::days(valid_days);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            write(&dir, &name, &cert.pem(), &key.serialize_pem())
        }
    }
}

/// Writes through a temporary file and a rename, so a process watching the
/// files never reads half of one.
fn write(dir: &std::path::Path, name: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (ext, content) in [("key", key), ("pem", cert)] {
        let path = dir.join(format!("{name}.{ext}"));
        let tmp = dir.join(format!(".{name}.{ext}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}
