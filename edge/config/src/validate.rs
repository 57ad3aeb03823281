//! Raw configuration to validated configuration, collecting every error.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use strait_tls::{
    BundleSource, ClientAuth, ClientIdentity, ClientTlsSettings, PrincipalSource,
    ServedCertificate, ServerTlsSettings, TrustBundleSettings,
};

use crate::raw::{
    RawConfig, RawLimits, RawQuotas, RawRates, RawTls, RawUpstreamTls, RawVirtualCluster,
};
use crate::{
    BrokerAddressing, Config, ConfigError, ConfigErrors, HostPort, Limits, Quotas, Rates, Shutdown,
    Tls, Upstream, VirtualCluster, DEFAULT_MAX_FRAME_BYTES,
};

#[derive(Default)]
pub(crate) struct Errors(pub(crate) Vec<ConfigError>);

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Validates a raw configuration, reporting every error found.
pub fn validate(raw: &RawConfig) -> Result<Config, ConfigErrors> {
    validate_with(raw, false)
}

/// Like [`validate`]; `allow_empty` accepts a configuration with no virtual
/// cluster, as an edge that gets its clusters from the control plane starts.
pub fn validate_with(raw: &RawConfig, allow_empty: bool) -> Result<Config, ConfigErrors> {
    let mut errors = Errors::default();

    let admin = raw.admin.as_ref().and_then(|admin| {
        parse_socket_addr(&admin.listen)
            .map_err(|message| errors.push("admin.listen", message))
            .ok()
    });

    let max_frame_bytes = match raw.limits.max_frame_bytes {
        None => DEFAULT_MAX_FRAME_BYTES,
        Some(0) => {
            errors.push("limits.max_frame_bytes", "must be greater than 0");
            DEFAULT_MAX_FRAME_BYTES
        }
        Some(n) if n > i32::MAX as u64 => {
            errors.push(
                "limits.max_frame_bytes",
                format!(
                    "must be at most {} (a Kafka frame length is an i32)",
                    i32::MAX
                ),
            );
            DEFAULT_MAX_FRAME_BYTES
        }
        Some(n) => n as u32,
    };
    let filter_timeout = raw.limits.filter_timeout.unwrap_or(Duration::from_secs(20));
    if filter_timeout.is_zero() {
        errors.push("limits.filter_timeout", "must be greater than 0");
    }
    let limits = validate_limits(&raw.limits, max_frame_bytes, filter_timeout, &mut errors);

    if let Err(kms_errors) = strait_kms_core::config::validate_kms_list("kms", &raw.kms) {
        for error in kms_errors.0 {
            errors.push(error.path, error.message);
        }
    }
    let kms_names: Vec<&str> = raw.kms.iter().map(|k| k.name.as_str()).collect();

    if raw.virtual_clusters.is_empty() && !allow_empty {
        errors.push(
            "virtual_clusters",
            "at least one virtual cluster is required",
        );
    }
    let mut virtual_clusters = Vec::new();
    for (index, vc) in raw.virtual_clusters.iter().enumerate() {
        if let Some(vc) = validate_virtual_cluster(
            vc,
            &format!("virtual_clusters[{index}]"),
            &kms_names,
            raw.mesh.as_ref(),
            &mut errors,
        ) {
            virtual_clusters.push(vc);
        }
    }
    check_cross_cluster(&virtual_clusters, admin, &mut errors);
    let deny_identities = validate_deny_identities(&raw.deny_identities, &mut errors);
    let mesh = raw
        .mesh
        .as_ref()
        .and_then(|mesh| crate::mesh::validate_mesh(mesh, &mut errors));

    let health_probes =
        crate::probes::validate_probes(&raw.health_probes, raw.mesh.as_ref(), &mut errors);

    if errors.0.is_empty() {
        Ok(Config {
            admin,
            kms: raw.kms.clone(),
            virtual_clusters,
            limits,
            shutdown: Shutdown {
                drain_timeout: raw
                    .shutdown
                    .drain_timeout
                    .unwrap_or(Duration::from_secs(10)),
            },
            deny_identities,
            mesh,
            health_probes,
        })
    } else {
        Err(ConfigErrors(errors.0))
    }
}

/// The memory and connection limits; a missing key takes its default.
fn validate_limits(
    raw: &RawLimits,
    max_frame_bytes: u32,
    filter_timeout: Duration,
    errors: &mut Errors,
) -> Limits {
    let defaults = Limits::default();
    let mut count = |key: &str, value: Option<u64>, default: u64, max: u64| match value {
        None => default,
        Some(0) => {
            errors.push(format!("limits.{key}"), "must be greater than 0");
            default
        }
        Some(n) if n > max => {
            errors.push(format!("limits.{key}"), format!("must be at most {max}"));
            default
        }
        Some(n) => n,
    };
    let per_connection = count(
        "max_buffered_bytes_per_connection",
        raw.max_buffered_bytes_per_connection,
        defaults.max_buffered_bytes_per_connection.into(),
        i32::MAX as u64,
    ) as u32;
    // A tokio semaphore holds at most usize::MAX >> 3 permits.
    let total = count(
        "max_buffered_bytes",
        raw.max_buffered_bytes,
        defaults.max_buffered_bytes,
        1 << 60,
    );
    let in_flight = count(
        "max_in_flight_per_connection",
        raw.max_in_flight_per_connection,
        defaults.max_in_flight_per_connection.into(),
        1 << 20,
    ) as u32;
    let max_connections = count(
        "max_connections",
        raw.max_connections,
        defaults.max_connections.into(),
        1 << 24,
    ) as u32;
    if u64::from(per_connection) > total {
        errors.push(
            "limits.max_buffered_bytes_per_connection",
            format!("must not exceed limits.max_buffered_bytes ({total})"),
        );
    }
    let mut timeout = |key: &str, value: Option<Duration>, default: Duration| {
        let value = value.unwrap_or(default);
        if value.is_zero() {
            errors.push(format!("limits.{key}"), "must be greater than 0");
        }
        value
    };
    let idle_timeout = timeout("idle_timeout", raw.idle_timeout, defaults.idle_timeout);
    let request_read_timeout = timeout(
        "request_read_timeout",
        raw.request_read_timeout,
        defaults.request_read_timeout,
    );
    Limits {
        max_frame_bytes,
        filter_timeout,
        max_buffered_bytes_per_connection: per_connection,
        max_buffered_bytes: total,
        max_in_flight_per_connection: in_flight,
        max_connections,
        idle_timeout,
        request_read_timeout,
    }
}

fn validate_virtual_cluster(
    raw: &RawVirtualCluster,
    path: &str,
    kms_names: &[&str],
    mesh: Option<&crate::mesh::RawMesh>,
    errors: &mut Errors,
) -> Option<VirtualCluster> {
    let before = errors.0.len();
    if raw.name.trim().is_empty() {
        errors.push(format!("{path}.name"), "must not be empty");
    } else if !raw
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        errors.push(
            format!("{path}.name"),
            "may contain only letters, digits, '-', '_' and '.'",
        );
    }
    let bootstrap = parse_socket_addr(&raw.bootstrap)
        .map_err(|message| errors.push(format!("{path}.bootstrap"), message))
        .ok();

    let brokers = validate_brokers(raw, bootstrap, path, errors);
    let tls = raw
        .tls
        .as_ref()
        .and_then(|tls| validate_tls(tls, &format!("{path}.tls"), errors));
    if matches!(brokers, Some(BrokerAddressing::Sni { .. })) && raw.tls.is_none() {
        errors.push(
            format!("{path}.brokers.sni"),
            "SNI routing needs TLS: add a tls section",
        );
    }

    let upstream = validate_upstream(&raw.upstream, &format!("{path}.upstream"), mesh, errors);

    if let Some(encryption) = &raw.encryption {
        let mut found = Vec::new();
        encryption.validate_into(&format!("{path}.encryption"), kms_names, &mut found);
        for error in found {
            errors.push(error.path, error.message);
        }
    }
    if let Some(authorization) = &raw.authorization {
        if let Err(found) = authorization.validate() {
            for error in found.0 {
                errors.push(format!("{path}.{}", error.path), error.message);
            }
        }
    }
    if let Some(audit) = &raw.audit {
        if let Err(found) = audit.validate() {
            for error in found.0 {
                errors.push(format!("{path}.{}", error.path), error.message);
            }
        }
    }
    let quotas = raw
        .quotas
        .as_ref()
        .map(|quotas| validate_quotas(quotas, &format!("{path}.quotas"), errors));
    if errors.0.len() != before {
        return None;
    }
    Some(VirtualCluster {
        name: raw.name.clone(),
        bootstrap: bootstrap?,
        brokers: brokers?,
        upstream: upstream?,
        tls,
        quotas,
        encryption: raw.encryption.clone(),
        authorization: raw.authorization.clone(),
        audit: raw.audit.clone(),
    })
}

/// `upstream:` of a virtual cluster (or of a health probe, `mesh: None`,
/// where `remote` is refused as unknown).
pub(crate) fn validate_upstream(
    raw: &crate::raw::RawUpstream,
    path: &str,
    mesh: Option<&crate::mesh::RawMesh>,
    errors: &mut Errors,
) -> Option<Upstream> {
    let before = errors.0.len();
    let upstream_path = format!("{path}.bootstrap_servers");
    let remote = raw.remote.as_ref().map(|remote| {
        crate::mesh::validate_remote(remote, mesh, &format!("{path}.remote"), errors)
    });
    match &remote {
        None if raw.bootstrap_servers.is_empty() => errors.push(
            &upstream_path,
            "at least one bootstrap server is required (or remote)",
        ),
        Some(_) if !raw.bootstrap_servers.is_empty() => {
            errors.push(path.to_string(), "use one of bootstrap_servers, remote")
        }
        // The far edge reaches the brokers with its own credentials.
        Some(_) if raw.tls.is_some() || raw.sasl.is_some() => errors.push(
            path.to_string(),
            "remote takes no tls or sasl: the peer edge authenticates to its brokers",
        ),
        _ => {}
    }
    let mut bootstrap_servers = Vec::new();
    for (index, server) in raw.bootstrap_servers.iter().enumerate() {
        match parse_host_port(server) {
            Ok(hp) => bootstrap_servers.push(hp),
            Err(message) => errors.push(format!("{upstream_path}[{index}]"), message),
        }
    }
    let connect_timeout = raw.connect_timeout.unwrap_or(Duration::from_secs(10));
    if connect_timeout.is_zero() {
        errors.push(format!("{path}.connect_timeout"), "must be greater than 0");
    }

    // With `remote` both are refused above: nothing more to say about them.
    let upstream_tls = raw
        .tls
        .as_ref()
        .filter(|_| remote.is_none())
        .and_then(|tls| validate_upstream_tls(tls, &format!("{path}.tls"), errors));
    let upstream_sasl = raw
        .sasl
        .as_ref()
        .filter(|_| remote.is_none())
        .and_then(|sasl| {
            crate::sasl::validate_sasl(sasl, &format!("{path}.sasl"))
                .map_err(|found| {
                    for error in found {
                        errors.push(error.path, error.message);
                    }
                })
                .ok()
        });

    if errors.0.len() != before {
        return None;
    }
    Some(Upstream {
        bootstrap_servers,
        remote,
        connect_timeout,
        tls: upstream_tls,
        sasl: upstream_sasl,
        failover: raw.failover.clone(),
    })
}

fn validate_brokers(
    raw: &RawVirtualCluster,
    bootstrap: Option<SocketAddr>,
    path: &str,
    errors: &mut Errors,
) -> Option<BrokerAddressing> {
    let brokers = &raw.brokers;
    if let Some(sni) = &brokers.sni {
        if brokers.port_range.is_some() || brokers.advertised_host.is_some() {
            errors.push(
                format!("{path}.brokers"),
                "use either sni or advertised_host/port_range, not both",
            );
        }
        let sni_path = format!("{path}.brokers.sni");
        if !is_host_name(&sni.bootstrap_host) {
            errors.push(
                format!("{sni_path}.bootstrap_host"),
                format!("'{}' is not a host name", sni.bootstrap_host),
            );
        }
        let pattern = &sni.broker_host_pattern;
        if pattern.matches(NODE_ID).count() != 1 || !is_host_name(&pattern.replace(NODE_ID, "1")) {
            errors.push(
                format!("{sni_path}.broker_host_pattern"),
                format!("'{pattern}' must be a host name containing $(node_id) once"),
            );
        }
        if sni.advertised_port == Some(0) {
            errors.push(format!("{sni_path}.advertised_port"), "must not be 0");
        }
        return Some(BrokerAddressing::Sni {
            bootstrap_host: sni.bootstrap_host.to_ascii_lowercase(),
            broker_host_pattern: pattern.to_ascii_lowercase(),
            advertised_port: sni.advertised_port.or(bootstrap.map(|b| b.port()))?,
        });
    }
    let advertised_host = match &brokers.advertised_host {
        Some(host) if !host.trim().is_empty() => Some(host.clone()),
        Some(_) => {
            errors.push(
                format!("{path}.brokers.advertised_host"),
                "must not be empty",
            );
            None
        }
        None => {
            errors.push(
                format!("{path}.brokers.advertised_host"),
                "required (or configure brokers.sni)",
            );
            None
        }
    };
    let port_range = match &brokers.port_range {
        Some(text) => parse_port_range(text)
            .map_err(|message| errors.push(format!("{path}.brokers.port_range"), message))
            .ok(),
        None => {
            errors.push(
                format!("{path}.brokers.port_range"),
                "required (or configure brokers.sni)",
            );
            None
        }
    };
    if let (Some(range), Some(bootstrap)) = (&port_range, bootstrap) {
        if range.contains(&bootstrap.port()) {
            errors.push(
                format!("{path}.brokers.port_range"),
                format!("contains the bootstrap port {}", bootstrap.port()),
            );
        }
    }
    let bind_address = match &brokers.bind_address {
        Some(text) => text
            .parse::<IpAddr>()
            .map_err(|_| {
                errors.push(
                    format!("{path}.brokers.bind_address"),
                    format!("'{text}' is not an IP address"),
                )
            })
            .ok(),
        None => bootstrap.map(|b| b.ip()),
    };
    Some(BrokerAddressing::PortPerBroker {
        advertised_host: advertised_host?,
        port_range: port_range?,
        bind_address: bind_address?,
    })
}

/// The placeholder a broker host pattern must contain.
pub const NODE_ID: &str = "$(node_id)";

fn is_host_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        })
}

fn validate_rates(raw: &RawRates, path: &str, errors: &mut Errors) -> Rates {
    for (field, value) in [
        ("produce_bytes_per_second", raw.produce_bytes_per_second),
        ("fetch_bytes_per_second", raw.fetch_bytes_per_second),
        ("requests_per_second", raw.requests_per_second),
    ] {
        if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            errors.push(format!("{path}.{field}"), "must be a positive number");
        }
    }
    Rates {
        produce_bytes_per_second: raw.produce_bytes_per_second,
        fetch_bytes_per_second: raw.fetch_bytes_per_second,
        requests_per_second: raw.requests_per_second,
    }
}

fn validate_quotas(raw: &RawQuotas, path: &str, errors: &mut Errors) -> Quotas {
    let default = validate_rates(&raw.default, &format!("{path}.default"), errors);
    let mut principals = Vec::new();
    for (index, entry) in raw.principals.iter().enumerate() {
        let entry_path = format!("{path}.principals[{index}]");
        let entry_rates = validate_rates(&entry.rates, &entry_path, errors);
        if let Err(err) = globset::Glob::new(&entry.principal) {
            errors.push(format!("{entry_path}.principal"), err.to_string());
        }
        principals.push((entry.principal.clone(), entry_rates));
    }
    Quotas {
        default,
        principals,
    }
}

fn validate_upstream_tls(
    raw: &RawUpstreamTls,
    path: &str,
    errors: &mut Errors,
) -> Option<ClientTlsSettings> {
    let before = errors.0.len();
    for (field, file) in [
        ("ca", Some(&raw.ca)),
        ("cert", raw.cert.as_ref()),
        ("key", raw.key.as_ref()),
    ] {
        if let Some(file) = file {
            if !Path::new(file).is_file() {
                errors.push(
                    format!("{path}.{field}"),
                    format!("'{file}' is not a readable file"),
                );
            }
        }
    }
    let identity = match (raw.identity.as_deref(), &raw.cert, &raw.key) {
        (None | Some("files"), Some(cert), Some(key)) => Some(ClientIdentity::Files {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        }),
        (None, None, None) => None,
        (Some("files"), None, None) => {
            errors.push(path, "identity: files needs cert and key");
            None
        }
        (Some("svid"), None, None) => Some(ClientIdentity::Svid),
        (Some("svid"), ..) => {
            errors.push(
                format!("{path}.identity"),
                "svid presents the edge's own certificate: remove cert and key",
            );
            None
        }
        (None | Some("files"), ..) => {
            errors.push(path, "cert and key go together");
            None
        }
        (Some(other), ..) => {
            errors.push(
                format!("{path}.identity"),
                format!("'{other}' is not one of files, svid"),
            );
            None
        }
    };
    if errors.0.len() != before {
        return None;
    }
    let settings = ClientTlsSettings {
        ca: PathBuf::from(&raw.ca),
        identity,
        server_name: raw.server_name.clone(),
    };
    if let Err(err) = strait_tls::ClientTls::load(&settings) {
        errors.push(path, err.to_string());
        return None;
    }
    Some(settings)
}

/// `tls.identity`: the files `cert` and `key`, or the edge's SVID (then no files).
fn served_certificate(raw: &RawTls, path: &str, errors: &mut Errors) -> Option<ServedCertificate> {
    match raw.identity.as_deref() {
        None | Some("files") => match (&raw.cert, &raw.key) {
            (Some(cert), Some(key)) => Some(ServedCertificate::Files {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            (cert, key) => {
                for (field, value) in [("cert", cert), ("key", key)] {
                    if value.is_none() {
                        errors.push(
                            format!("{path}.{field}"),
                            "required (or identity: svid to serve the edge's certificate from the control plane's CA)",
                        );
                    }
                }
                None
            }
        },
        Some("svid") => {
            for (field, value) in [("cert", &raw.cert), ("key", &raw.key)] {
                if value.is_some() {
                    errors.push(
                        format!("{path}.{field}"),
                        "not with identity: svid (the edge serves its own SVID); remove it or use identity: files",
                    );
                }
            }
            Some(ServedCertificate::Svid)
        }
        Some(other) => {
            errors.push(
                format!("{path}.identity"),
                format!("'{other}' is not one of files, svid"),
            );
            None
        }
    }
}

fn validate_tls(raw: &RawTls, path: &str, errors: &mut Errors) -> Option<Tls> {
    let before = errors.0.len();
    let verifies = raw.client_ca.is_some() || !raw.client_trust_bundles.is_empty();
    let client_auth = match raw.client_auth.as_deref() {
        None if verifies => ClientAuth::Required,
        // Fail closed: TLS without a way to verify clients is a mistake
        // unless it is asked for in so many words.
        None => {
            errors.push(
                format!("{path}.client_trust_bundles"),
                "no client trust bundle: add client_trust_bundles (or a client_ca for certificates without a SPIFFE ID), or write client_auth: none to accept clients without certificates",
            );
            ClientAuth::None
        }
        Some("none") => {
            if verifies {
                errors.push(
                    format!("{path}.client_auth"),
                    "'none' asks for no client certificate, so client_ca and client_trust_bundles would be ignored: remove them or use required/optional",
                );
            }
            ClientAuth::None
        }
        Some("required") => ClientAuth::Required,
        Some("optional") => ClientAuth::Optional,
        Some(other) => {
            errors.push(
                format!("{path}.client_auth"),
                format!("'{other}' is not one of required, optional, none"),
            );
            ClientAuth::None
        }
    };
    if client_auth != ClientAuth::None && !verifies {
        errors.push(
            format!("{path}.client_trust_bundles"),
            "required (or client_ca) when client_auth is required or optional",
        );
    }
    let client_trust_bundles = validate_trust_bundles(raw, path, errors);
    let mut principal_sources = Vec::new();
    for (index, source) in raw
        .principal
        .clone()
        .unwrap_or_else(|| vec!["spiffe".into(), "subject".into()])
        .iter()
        .enumerate()
    {
        match source.as_str() {
            "spiffe" => principal_sources.push(PrincipalSource::Spiffe),
            "subject" => principal_sources.push(PrincipalSource::Subject),
            "cn" => principal_sources.push(PrincipalSource::CommonName),
            "dns_san" => principal_sources.push(PrincipalSource::DnsSan),
            other => errors.push(
                format!("{path}.principal[{index}]"),
                format!("'{other}' is not one of spiffe, subject, cn, dns_san"),
            ),
        }
    }
    let certificate = served_certificate(raw, path, errors);
    for (field, file) in [
        ("cert", raw.cert.as_ref()),
        ("key", raw.key.as_ref()),
        ("client_ca", raw.client_ca.as_ref()),
    ] {
        if let Some(file) = file {
            if !Path::new(file).is_file() {
                errors.push(
                    format!("{path}.{field}"),
                    format!("'{file}' is not a readable file"),
                );
            }
        }
    }
    let reload_interval = raw.reload_interval.unwrap_or(Duration::from_secs(1));
    if reload_interval.is_zero() {
        errors.push(format!("{path}.reload_interval"), "must be greater than 0");
    }
    if errors.0.len() != before {
        return None;
    }
    let settings = ServerTlsSettings {
        certificate: certificate?,
        client_ca: raw.client_ca.as_ref().map(PathBuf::from),
        client_trust_bundles,
        client_auth,
        principal_sources,
    };
    // Build once so a bad certificate, key or bundle is a config error, not a start failure.
    if let Err(err) = strait_tls::ServerTls::load(&settings) {
        errors.push(path, err.to_string());
        return None;
    }
    Some(Tls {
        server: settings,
        reload_interval,
        handshake_timeout: raw.handshake_timeout.unwrap_or(Duration::from_secs(10)),
    })
}

fn validate_trust_bundles(
    raw: &RawTls,
    path: &str,
    errors: &mut Errors,
) -> Vec<TrustBundleSettings> {
    let mut bundles = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, bundle) in raw.client_trust_bundles.iter().enumerate() {
        let entry = format!("{path}.client_trust_bundles[{index}]");
        if !strait_tls::is_trust_domain(&bundle.trust_domain) {
            errors.push(
                format!("{entry}.trust_domain"),
                format!(
                    "'{}' is not a trust domain (lower-case letters, digits, '.', '-', '_'; no scheme or path)",
                    bundle.trust_domain
                ),
            );
        } else if let Some(first) = seen.insert(&bundle.trust_domain, index) {
            errors.push(
                format!("{entry}.trust_domain"),
                format!(
                    "'{}' already has a bundle in client_trust_bundles[{first}]: concatenate the CAs into one",
                    bundle.trust_domain
                ),
            );
        }
        let source = match (&bundle.pem_file, &bundle.pem) {
            (Some(file), None) => {
                if !Path::new(file).is_file() {
                    errors.push(
                        format!("{entry}.pem_file"),
                        format!("'{file}' is not a readable file"),
                    );
                }
                BundleSource::File(PathBuf::from(file))
            }
            (None, Some(pem)) => BundleSource::Inline(pem.clone()),
            _ => {
                errors.push(&entry, "use exactly one of pem_file, pem");
                continue;
            }
        };
        bundles.push(TrustBundleSettings {
            trust_domain: bundle.trust_domain.clone(),
            source,
        });
    }
    bundles
}

/// Exact principal names; sorted and deduplicated so that an unchanged list
/// compares equal however it is written.
fn validate_deny_identities(raw: &[String], errors: &mut Errors) -> Vec<String> {
    let mut identities = Vec::new();
    for (index, identity) in raw.iter().enumerate() {
        if identity.trim().is_empty() || identity.trim() != identity {
            errors.push(
                format!("deny_identities[{index}]"),
                "must be a principal name without surrounding spaces",
            );
        } else if identity.contains('*') {
            errors.push(
                format!("deny_identities[{index}]"),
                format!("'{identity}': entries are exact identities, not patterns"),
            );
        } else if identity.starts_with("spiffe://") {
            if strait_tls::trust_domain_of(identity).is_err() {
                errors.push(
                    format!("deny_identities[{index}]"),
                    format!("'{identity}' is not a SPIFFE ID (spiffe://<trust-domain>/<path>, trust domain in lower case)"),
                );
            }
            identities.push(identity.clone());
        } else {
            identities.push(identity.clone());
        }
    }
    identities.sort();
    identities.dedup();
    identities
}

/// Names, bootstrap addresses and port ranges must not collide between clusters.
fn check_cross_cluster(
    clusters: &[VirtualCluster],
    admin: Option<SocketAddr>,
    errors: &mut Errors,
) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (index, vc) in clusters.iter().enumerate() {
        if let Some(first) = names.insert(&vc.name, index) {
            errors.push(
                format!("virtual_clusters[{index}].name"),
                format!("'{}' is already used by virtual_clusters[{first}]", vc.name),
            );
        }
    }
    for (i, a) in clusters.iter().enumerate() {
        if admin.is_some_and(|admin| admin.port() == a.bootstrap.port()) {
            errors.push(
                format!("virtual_clusters[{i}].bootstrap"),
                "uses the admin port",
            );
        }
        for (j, b) in clusters.iter().enumerate().skip(i + 1) {
            check_pair(i, a, j, b, errors);
        }
    }
}

fn port_range(vc: &VirtualCluster) -> Option<&RangeInclusive<u16>> {
    match &vc.brokers {
        BrokerAddressing::PortPerBroker { port_range, .. } => Some(port_range),
        BrokerAddressing::Sni { .. } => None,
    }
}

fn sni_hosts(vc: &VirtualCluster) -> Option<(&str, &str)> {
    match &vc.brokers {
        BrokerAddressing::Sni {
            bootstrap_host,
            broker_host_pattern,
            ..
        } => Some((bootstrap_host, broker_host_pattern)),
        BrokerAddressing::PortPerBroker { .. } => None,
    }
}

fn check_pair(i: usize, a: &VirtualCluster, j: usize, b: &VirtualCluster, errors: &mut Errors) {
    if a.bootstrap.port() == b.bootstrap.port() {
        match (sni_hosts(a), sni_hosts(b)) {
            // Sharing a port is what SNI routing is for, as long as names differ.
            (Some((a_host, a_pattern)), Some((b_host, b_pattern))) => {
                if a.bootstrap != b.bootstrap {
                    errors.push(
                        format!("virtual_clusters[{j}].bootstrap"),
                        format!("shares port {} with virtual_clusters[{i}] but not its address", b.bootstrap.port()),
                    );
                }
                if a_host == b_host || a_pattern == b_pattern || a_host == b_pattern || b_host == a_pattern {
                    errors.push(
                        format!("virtual_clusters[{j}].brokers.sni"),
                        format!("host names collide with virtual_clusters[{i}]"),
                    );
                }
            }
            _ => errors.push(
                format!("virtual_clusters[{j}].bootstrap"),
                format!(
                    "port {} is already used by virtual_clusters[{i}] (only SNI-routed clusters may share a port)",
                    b.bootstrap.port()
                ),
            ),
        }
    }
    if let (Some(ra), Some(rb)) = (port_range(a), port_range(b)) {
        if ra.start() <= rb.end() && rb.start() <= ra.end() {
            errors.push(
                format!("virtual_clusters[{j}].brokers.port_range"),
                format!("overlaps the port range of virtual_clusters[{i}]"),
            );
        }
    }
    if port_range(a).is_some_and(|r| r.contains(&b.bootstrap.port())) {
        errors.push(
            format!("virtual_clusters[{j}].bootstrap"),
            format!(
                "port {} is inside the port range of virtual_clusters[{i}]",
                b.bootstrap.port()
            ),
        );
    }
    if port_range(b).is_some_and(|r| r.contains(&a.bootstrap.port())) {
        errors.push(
            format!("virtual_clusters[{i}].bootstrap"),
            format!(
                "port {} is inside the port range of virtual_clusters[{j}]",
                a.bootstrap.port()
            ),
        );
    }
}

pub(crate) fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("'{text}' is not a socket address (expected IP:PORT, e.g. 127.0.0.1:19092)")
    })
}

pub(crate) fn parse_host_port(text: &str) -> Result<HostPort, String> {
    let invalid = || format!("'{text}' is not HOST:PORT");
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid());
    }
    let port: u16 = port.parse().map_err(|_| invalid())?;
    if port == 0 {
        return Err(format!("'{text}': port must not be 0"));
    }
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let invalid =
        || format!("'{text}' is not a port range (expected FIRST-LAST, e.g. 19100-19199)");
    let (first, last) = text.split_once('-').ok_or_else(invalid)?;
    let first: u16 = first.trim().parse().map_err(|_| invalid())?;
    let last: u16 = last.trim().parse().map_err(|_| invalid())?;
    if first == 0 || first > last {
        return Err(format!(
            "'{text}': first port must be non-zero and not above the last"
        ));
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use crate::{parse, Limits};
    use std::time::Duration;
    use strait_tls::ServedCertificate;

    const GOOD: &str = r#"
admin:
  listen: 127.0.0.1:9901
virtual_clusters:
  - name: local
    bootstrap: 127.0.0.1:19092
    brokers:
      advertised_host: 127.0.0.1
      port_range: 19100-19199
    upstream:
      bootstrap_servers: [127.0.0.1:9092, "kafka-2.internal:9092"]
  - name: other
    bootstrap: 127.0.0.1:29092
    brokers: { advertised_host: edge.example.com, port_range: 29100-29199 }
    upstream: { bootstrap_servers: ["127.0.0.1:9093"], connect_timeout: 3s }
limits:
  max_frame_bytes: 1048576
shutdown:
  drain_timeout: 5s
"#;

    #[test]
    fn accepts_the_documented_example() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.admin.unwrap().port(), 9901);
        assert_eq!(config.virtual_clusters.len(), 2);
        let local = &config.virtual_clusters[0];
        let crate::BrokerAddressing::PortPerBroker {
            port_range,
            bind_address,
            ..
        } = &local.brokers
        else {
            panic!("port mode expected")
        };
        assert_eq!(*port_range, 19100..=19199);
        assert_eq!(bind_address.to_string(), "127.0.0.1");
        assert_eq!(local.upstream.bootstrap_servers[1].host, "kafka-2.internal");
        assert_eq!(
            config.virtual_clusters[1]
                .upstream
                .connect_timeout
                .as_secs(),
            3
        );
        assert_eq!(config.limits.max_frame_bytes, 1 << 20);
        assert_eq!(config.shutdown.drain_timeout.as_secs(), 5);
    }

    #[test]
    fn unknown_keys_are_errors_with_a_path() {
        let yaml = GOOD.replace(
            "advertised_host: 127.0.0.1",
            "advertised_host: 127.0.0.1\n      colour: blue",
        );
        let errors = parse(&yaml).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "virtual_clusters[0].brokers.colour");
        assert!(
            errors[0].message.contains("colour"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn reports_every_error_with_its_path() {
        let yaml = r#"
admin: { listen: "nowhere" }
virtual_clusters:
  - name: ""
    bootstrap: 127.0.0.1:99999
    brokers: { advertised_host: "", port_range: 200-100 }
    upstream: { bootstrap_servers: [] }
  - name: b
    bootstrap: 127.0.0.1:19150
    brokers: { advertised_host: h, port_range: 19100-19199 }
    upstream: { bootstrap_servers: ["no-port"] }
  - name: b
    bootstrap: 127.0.0.1:19150
    brokers: { advertised_host: h, port_range: 19180-19299 }
    upstream: { bootstrap_servers: ["h:1"] }
limits: { max_frame_bytes: 0 }
"#;
        let errors = parse(yaml).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "admin.listen",
            "limits.max_frame_bytes",
            "virtual_clusters[0].name",
            "virtual_clusters[0].bootstrap",
            "virtual_clusters[0].brokers.advertised_host",
            "virtual_clusters[0].brokers.port_range",
            "virtual_clusters[0].upstream.bootstrap_servers",
            "virtual_clusters[1].brokers.port_range",
            "virtual_clusters[1].upstream.bootstrap_servers[0]",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
        }
    }

    #[test]
    fn memory_and_connection_limits() {
        let cluster = r#"
virtual_clusters:
  - name: a
    bootstrap: 127.0.0.1:19092
    brokers: { advertised_host: h, port_range: 19100-19199 }
    upstream: { bootstrap_servers: ["h:1"] }
"#;
        let config = parse(cluster).unwrap();
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.max_buffered_bytes_per_connection, 16 << 20);
        let config = parse(&format!(
            "{cluster}limits: {{ max_buffered_bytes_per_connection: 2097152, max_buffered_bytes: 8388608, \
             max_in_flight_per_connection: 5, max_connections: 3, idle_timeout: 2s, request_read_timeout: 500ms }}"
        ))
        .unwrap();
        assert_eq!(config.limits.max_buffered_bytes_per_connection, 2 << 20);
        assert_eq!(config.limits.max_buffered_bytes, 8 << 20);
        assert_eq!(config.limits.max_in_flight_per_connection, 5);
        assert_eq!(config.limits.max_connections, 3);
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(2));
        assert_eq!(
            config.limits.request_read_timeout,
            Duration::from_millis(500)
        );

        let errors = parse(&format!(
            "{cluster}limits: {{ max_buffered_bytes_per_connection: 4096, max_buffered_bytes: 1024, \
             max_in_flight_per_connection: 0, max_connections: 0, idle_timeout: 0s, request_read_timeout: 0s }}"
        ))
        .unwrap_err()
        .0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "limits.max_in_flight_per_connection",
                "limits.max_connections",
                "limits.max_buffered_bytes_per_connection",
                "limits.idle_timeout",
                "limits.request_read_timeout",
            ]
        );
        let unknown = parse(&format!("{cluster}limits: {{ max_buffered: 1 }}"))
            .unwrap_err()
            .0;
        assert!(unknown[0].path.starts_with("limits"), "{unknown:?}");
    }

    #[test]
    fn collisions_between_clusters() {
        let yaml = r#"
virtual_clusters:
  - name: a
    bootstrap: 127.0.0.1:19092
    brokers: { advertised_host: h, port_range: 19100-19199 }
    upstream: { bootstrap_servers: ["h:1"] }
  - name: a
    bootstrap: 127.0.0.1:19092
    brokers: { advertised_host: h, port_range: 19150-19250 }
    upstream: { bootstrap_servers: ["h:1"] }
"#;
        let errors = parse(yaml).unwrap_err().0;
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|e| e.starts_with("virtual_clusters[1].name: 'a' is already used")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.starts_with("virtual_clusters[1].bootstrap: port 19092")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.starts_with("virtual_clusters[1].brokers.port_range: overlaps")),
            "{text:?}"
        );
    }

    #[test]
    fn empty_config_needs_a_cluster() {
        let errors = parse("{}").unwrap_err().0;
        assert_eq!(errors[0].path, "virtual_clusters");
    }

    fn with_tls(tls: &str) -> String {
        format!(
            "virtual_clusters:\n  - name: a\n    bootstrap: 127.0.0.1:19092\n    brokers: {{ advertised_host: h, port_range: 19100-19199 }}\n    upstream: {{ bootstrap_servers: [\"h:1\"] }}\n    tls: {tls}\n"
        )
    }

    #[test]
    fn tls_identity_is_files_or_svid_never_both() {
        let errors = errors_of(&with_tls("{ client_auth: none }"));
        assert!(
            errors.iter().any(|e| e.starts_with(
                "virtual_clusters[0].tls.cert: required (or identity: svid"
            )),
            "{errors:?}"
        );
        let errors = errors_of(&with_tls(
            "{ identity: svid, cert: /nonexistent/c.pem, client_auth: none }",
        ));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("virtual_clusters[0].tls.cert: not with identity: svid")),
            "{errors:?}"
        );
        let errors = errors_of(&with_tls("{ identity: spire, client_auth: none }"));
        assert_eq!(
            errors,
            vec!["virtual_clusters[0].tls.identity: 'spire' is not one of files, svid"]
        );
        let config = parse(&with_tls("{ identity: svid, client_auth: none }")).unwrap();
        assert_eq!(
            config.virtual_clusters[0]
                .tls
                .as_ref()
                .unwrap()
                .server
                .certificate,
            ServedCertificate::Svid
        );
    }

    fn with_upstream_tls(tls: &str) -> String {
        format!(
            "virtual_clusters:\n  - name: a\n    bootstrap: 127.0.0.1:19092\n    brokers: {{ advertised_host: h, port_range: 19100-19199 }}\n    upstream: {{ bootstrap_servers: [\"h:1\"], tls: {tls} }}\n"
        )
    }

    #[test]
    fn upstream_tls_identity_is_files_or_svid_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["h".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let ca = ca.display();
        let config = parse(&with_upstream_tls(&format!(
            "{{ ca: \"{ca}\", identity: svid }}"
        )))
        .unwrap();
        assert_eq!(
            config.virtual_clusters[0]
                .upstream
                .tls
                .as_ref()
                .unwrap()
                .identity,
            Some(strait_tls::ClientIdentity::Svid)
        );
        assert_eq!(
            errors_of(&with_upstream_tls(&format!(
                "{{ ca: \"{ca}\", identity: svid, cert: \"{ca}\", key: \"{ca}\" }}"
            ))),
            vec!["virtual_clusters[0].upstream.tls.identity: svid presents the edge's own certificate: remove cert and key"]
        );
        assert_eq!(
            errors_of(&with_upstream_tls(&format!(
                "{{ ca: \"{ca}\", identity: files }}"
            ))),
            vec!["virtual_clusters[0].upstream.tls: identity: files needs cert and key"]
        );
        assert_eq!(
            errors_of(&with_upstream_tls(&format!(
                "{{ ca: \"{ca}\", identity: spire }}"
            ))),
            vec!["virtual_clusters[0].upstream.tls.identity: 'spire' is not one of files, svid"]
        );
    }

    fn errors_of(yaml: &str) -> Vec<String> {
        parse(yaml)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn tls_without_a_client_trust_bundle_is_an_error_unless_none_is_written() {
        let errors = errors_of(&with_tls(
            "{ cert: /nonexistent/c.pem, key: /nonexistent/k.pem }",
        ));
        assert!(
            errors.iter().any(|e| e.starts_with(
                "virtual_clusters[0].tls.client_trust_bundles: no client trust bundle: add client_trust_bundles"
            )),
            "{errors:?}"
        );
        let errors = errors_of(&with_tls(
            "{ cert: /nonexistent/c.pem, key: /nonexistent/k.pem, client_auth: none }",
        ));
        assert!(
            !errors.iter().any(|e| e.contains("client_trust_bundles")),
            "{errors:?}"
        );
        let errors = errors_of(&with_tls(
            "{ cert: /nonexistent/c.pem, key: /nonexistent/k.pem, client_auth: none, client_trust_bundles: [{ trust_domain: example.org, pem: x }] }",
        ));
        assert!(
            errors.iter().any(|e| e.starts_with(
                "virtual_clusters[0].tls.client_auth: 'none' asks for no client certificate"
            )),
            "{errors:?}"
        );
    }

    #[test]
    fn client_trust_bundles_are_checked_with_their_paths() {
        let errors = errors_of(&with_tls(
            "{ cert: /nonexistent/c.pem, key: /nonexistent/k.pem, client_trust_bundles: [{ trust_domain: example.org, pem: x }, { trust_domain: example.org, pem_file: /nonexistent/b.pem }, { trust_domain: \"spiffe://Bad\", pem: x }, { trust_domain: ok.example }] }",
        ));
        for expected in [
            "virtual_clusters[0].tls.client_trust_bundles[1].trust_domain: 'example.org' already has a bundle in client_trust_bundles[0]",
            "virtual_clusters[0].tls.client_trust_bundles[1].pem_file: '/nonexistent/b.pem' is not a readable file",
            "virtual_clusters[0].tls.client_trust_bundles[2].trust_domain: 'spiffe://Bad' is not a trust domain",
            "virtual_clusters[0].tls.client_trust_bundles[3]: use exactly one of pem_file, pem",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(expected)),
                "missing {expected} in {errors:?}"
            );
        }
    }

    #[test]
    fn deny_identities_are_exact_sorted_and_checked() {
        let yaml = format!(
            "deny_identities: [\"spiffe://b.example/x\", \"CN=legacy\", \"spiffe://b.example/x\"]\n{GOOD}"
        );
        assert_eq!(
            parse(&yaml).unwrap().deny_identities,
            vec!["CN=legacy".to_owned(), "spiffe://b.example/x".to_owned()]
        );
        let yaml = format!(
            "deny_identities: [\"spiffe://b.example/*\", \"spiffe://Bad/x\", \" x\"]\n{GOOD}"
        );
        let errors = errors_of(&yaml);
        for expected in [
            "deny_identities[0]: 'spiffe://b.example/*': entries are exact identities, not patterns",
            "deny_identities[1]: 'spiffe://Bad/x' is not a SPIFFE ID (spiffe://<trust-domain>/<path>, trust domain in lower case)",
            "deny_identities[2]: must be a principal name without surrounding spaces",
        ] {
            assert!(
                errors.iter().any(|e| e == expected),
                "missing {expected} in {errors:?}"
            );
        }
    }

    #[test]
    fn allow_all_is_explicit_and_takes_no_rules() {
        let cluster = |authorization: &str| {
            format!("virtual_clusters:\n  - name: a\n    bootstrap: 127.0.0.1:19092\n    brokers: {{ advertised_host: h, port_range: 19100-19199 }}\n    upstream: {{ bootstrap_servers: [\"h:1\"] }}\n    authorization: {authorization}\n")
        };
        let errors = errors_of(&cluster(
            r#"{ mode: allow_all, rules: [{ principal: "*", allow: [All], topic: "*" }] }"#,
        ));
        assert_eq!(
            errors,
            vec!["virtual_clusters[0].authorization.mode: allow_all takes no rules: remove the rules or the mode"]
        );
        let config = parse(&cluster("{ mode: allow_all }")).unwrap();
        assert_eq!(
            config.virtual_clusters[0]
                .authorization
                .as_ref()
                .unwrap()
                .mode,
            strait_authz::AuthorizationMode::AllowAll
        );
        // An empty block is the rules mode with no rule: everything denied.
        let config = parse(&cluster("{}")).unwrap();
        let authorization = config.virtual_clusters[0].authorization.as_ref().unwrap();
        assert_eq!(authorization.mode, strait_authz::AuthorizationMode::Rules);
        assert!(authorization.rules.is_empty());
    }
}
