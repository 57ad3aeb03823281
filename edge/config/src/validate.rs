//! Raw configuration to validated configuration, collecting every error.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::raw::{RawConfig, RawVirtualCluster};
use crate::{
    BrokerAddressing, Config, ConfigError, ConfigErrors, HostPort, Limits, Shutdown, Upstream,
    VirtualCluster, DEFAULT_MAX_FRAME_BYTES,
};

#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Validates a raw configuration, reporting every error found.
pub fn validate(raw: &RawConfig) -> Result<Config, ConfigErrors> {
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

    if raw.virtual_clusters.is_empty() {
        errors.push(
            "virtual_clusters",
            "at least one virtual cluster is required",
        );
    }
    let mut virtual_clusters = Vec::new();
    for (index, vc) in raw.virtual_clusters.iter().enumerate() {
        if let Some(vc) =
            validate_virtual_cluster(vc, &format!("virtual_clusters[{index}]"), &mut errors)
        {
            virtual_clusters.push(vc);
        }
    }
    check_cross_cluster(&virtual_clusters, admin, &mut errors);

    if errors.0.is_empty() {
        Ok(Config {
            admin,
            virtual_clusters,
            limits: Limits {
                max_frame_bytes,
                filter_timeout,
            },
            shutdown: Shutdown {
                drain_timeout: raw
                    .shutdown
                    .drain_timeout
                    .unwrap_or(Duration::from_secs(10)),
            },
        })
    } else {
        Err(ConfigErrors(errors.0))
    }
}

fn validate_virtual_cluster(
    raw: &RawVirtualCluster,
    path: &str,
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

    if raw.brokers.advertised_host.trim().is_empty() {
        errors.push(
            format!("{path}.brokers.advertised_host"),
            "must not be empty",
        );
    }
    let port_range = parse_port_range(&raw.brokers.port_range)
        .map_err(|message| errors.push(format!("{path}.brokers.port_range"), message))
        .ok();
    if let (Some(range), Some(bootstrap)) = (&port_range, bootstrap) {
        if range.contains(&bootstrap.port()) {
            errors.push(
                format!("{path}.brokers.port_range"),
                format!("contains the bootstrap port {}", bootstrap.port()),
            );
        }
    }
    let bind_address = match &raw.brokers.bind_address {
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

    let upstream_path = format!("{path}.upstream.bootstrap_servers");
    if raw.upstream.bootstrap_servers.is_empty() {
        errors.push(&upstream_path, "at least one bootstrap server is required");
    }
    let mut bootstrap_servers = Vec::new();
    for (index, server) in raw.upstream.bootstrap_servers.iter().enumerate() {
        match parse_host_port(server) {
            Ok(hp) => bootstrap_servers.push(hp),
            Err(message) => errors.push(format!("{upstream_path}[{index}]"), message),
        }
    }
    let connect_timeout = raw
        .upstream
        .connect_timeout
        .unwrap_or(Duration::from_secs(10));
    if connect_timeout.is_zero() {
        errors.push(
            format!("{path}.upstream.connect_timeout"),
            "must be greater than 0",
        );
    }

    if errors.0.len() != before {
        return None;
    }
    Some(VirtualCluster {
        name: raw.name.clone(),
        bootstrap: bootstrap?,
        brokers: BrokerAddressing {
            advertised_host: raw.brokers.advertised_host.clone(),
            port_range: port_range?,
            bind_address: bind_address?,
        },
        upstream: Upstream {
            bootstrap_servers,
            connect_timeout,
        },
    })
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
            if a.bootstrap.port() == b.bootstrap.port() {
                errors.push(
                    format!("virtual_clusters[{j}].bootstrap"),
                    format!(
                        "port {} is already used by virtual_clusters[{i}]",
                        b.bootstrap.port()
                    ),
                );
            }
            let (ra, rb) = (&a.brokers.port_range, &b.brokers.port_range);
            if ra.start() <= rb.end() && rb.start() <= ra.end() {
                errors.push(
                    format!("virtual_clusters[{j}].brokers.port_range"),
                    format!("overlaps the port range of virtual_clusters[{i}]"),
                );
            }
            if ra.contains(&b.bootstrap.port()) {
                errors.push(
                    format!("virtual_clusters[{j}].bootstrap"),
                    format!(
                        "port {} is inside the port range of virtual_clusters[{i}]",
                        b.bootstrap.port()
                    ),
                );
            }
            if rb.contains(&a.bootstrap.port()) {
                errors.push(
                    format!("virtual_clusters[{i}].bootstrap"),
                    format!(
                        "port {} is inside the port range of virtual_clusters[{j}]",
                        a.bootstrap.port()
                    ),
                );
            }
        }
    }
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("'{text}' is not a socket address (expected IP:PORT, e.g. 127.0.0.1:19092)")
    })
}

fn parse_host_port(text: &str) -> Result<HostPort, String> {
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
    use crate::parse;

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
        assert_eq!(local.brokers.port_range, 19100..=19199);
        assert_eq!(local.brokers.bind_address.to_string(), "127.0.0.1");
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
}
