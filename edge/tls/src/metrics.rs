//! TLS metrics; the registry is passed in.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    virtual_cluster: String,
    result: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpiryLabels {
    virtual_cluster: String,
    certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    virtual_cluster: String,
    result: String,
}

#[derive(Clone, Default)]
pub struct TlsMetrics {
    handshakes: Family<HandshakeLabels, Counter>,
    expiry: Family<ExpiryLabels, Gauge>,
    reloads: Family<ReloadLabels, Counter>,
}

impl TlsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = TlsMetrics::default();
        registry.register(
            "tls_handshakes",
            "Client TLS handshakes, by result and failure reason",
            metrics.handshakes.clone(),
        );
        registry.register(
            "tls_certificate_expiry_seconds",
            "Seconds until the served certificate (or the first trust bundle certificate) expires",
            metrics.expiry.clone(),
        );
        registry.register(
            "tls_credential_reloads",
            "Credential reloads after a file change, by result",
            metrics.reloads.clone(),
        );
        metrics
    }

    pub fn handshake(&self, virtual_cluster: &str, reason: Option<&str>) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                virtual_cluster: virtual_cluster.to_owned(),
                result: if reason.is_some() { "failed" } else { "ok" }.to_owned(),
                reason: reason.unwrap_or("").to_owned(),
            })
            .inc();
    }

    pub(crate) fn expiry(&self, virtual_cluster: &str, certificate: &str, seconds: i64) {
        self.expiry
            .get_or_create(&ExpiryLabels {
                virtual_cluster: virtual_cluster.to_owned(),
                certificate: certificate.to_owned(),
            })
            .set(seconds);
    }

    pub(crate) fn reload(&self, virtual_cluster: &str, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                virtual_cluster: virtual_cluster.to_owned(),
                result: if ok { "ok" } else { "rejected" }.to_owned(),
            })
            .inc();
    }
}
