//! The audit log: one JSON line per authorization decision, written by a
//! background task so the data path never waits on disk.
//!
//! Trade-off when the writer falls behind (its bounded channel is full):
//! allow lines are dropped and counted in `authz_audit_lines_dropped_total{decision="allow"}`;
//! deny lines make the request wait up to [`DENY_WAIT`] for room, so a deny
//! is only lost if the disk is stalled for that long (then it is counted with
//! `decision="deny"` and logged through `tracing`). Denied requests are cheap
//! for the edge (never forwarded), so slowing a client that is being denied
//! is an acceptable price for a complete record of denials.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use strait_kafka::api_keys::api_key_name;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::config::{AuditConfig, Operation, ResourceType};
use crate::metrics::AuthzMetrics;
use crate::rules::MatchedRule;

/// Lines buffered between the data path and the writer task.
pub const AUDIT_CHANNEL_CAPACITY: usize = 16 * 1024;
/// How long a deny line may wait for room in a full channel.
pub const DENY_WAIT: Duration = Duration::from_secs(1);

/// One authorization decision.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub time: SystemTime,
    pub principal: Arc<str>,
    pub client_addr: SocketAddr,
    /// The peer edge that forwarded the principal through a tunnel.
    pub via_peer: Option<Arc<str>>,
    pub virtual_cluster: Arc<str>,
    pub api_key: i16,
    pub resource_type: ResourceType,
    pub resource_name: String,
    pub operation: Operation,
    pub allowed: bool,
    pub rule: Option<MatchedRule>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum RuleField<'a> {
    Matched { index: usize, principal: &'a str },
    Default(&'static str),
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    principal: &'a str,
    client_address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    via_peer: Option<&'a str>,
    virtual_cluster: &'a str,
    api_key: String,
    resource_type: &'static str,
    resource_name: &'a str,
    operation: &'static str,
    decision: &'static str,
    rule: RuleField<'a>,
}

impl AuditRecord {
    /// The JSON line (without the newline).
    pub fn to_json(&self) -> String {
        let time = OffsetDateTime::from(self.time)
            .format(&Rfc3339)
            .unwrap_or_else(|_| "invalid-time".into());
        let line = Line {
            time,
            principal: &self.principal,
            client_address: self.client_addr.to_string(),
            via_peer: self.via_peer.as_deref(),
            virtual_cluster: &self.virtual_cluster,
            api_key: api_key_name(self.api_key),
            resource_type: self.resource_type.as_str(),
            resource_name: &self.resource_name,
            operation: self.operation.as_str(),
            decision: if self.allowed { "allow" } else { "deny" },
            rule: match &self.rule {
                Some(rule) => RuleField::Matched {
                    index: rule.index,
                    principal: &rule.principal,
                },
                None => RuleField::Default("default-deny"),
            },
        };
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string(&line).unwrap_or_default()
    }
}

struct Inner {
    tx: mpsc::Sender<AuditRecord>,
    sample_allows: f64,
    metrics: AuthzMetrics,
}

/// Where decisions go. Cheap to clone; [`AuditSink::disabled`] drops everything.
#[derive(Clone, Default)]
pub struct AuditSink {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl AuditSink {
    /// No audit log (no `audit:` block).
    pub fn disabled() -> AuditSink {
        AuditSink { inner: None }
    }

    /// Opens the file (append, created if missing) or stdout and starts the
    /// writer task on the current Tokio runtime. The task ends, after flushing,
    /// when every clone of the sink is dropped.
    pub fn spawn(
        config: &AuditConfig,
        metrics: AuthzMetrics,
    ) -> io::Result<(AuditSink, tokio::task::JoinHandle<()>)> {
        if config.path == "-" {
            return Ok(Self::spawn_with_writer(
                tokio::io::stdout(),
                config.sample_allows,
                metrics,
            ));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)?;
        Ok(Self::spawn_with_writer(
            tokio::fs::File::from_std(file),
            config.sample_allows,
            metrics,
        ))
    }

    /// Like [`AuditSink::spawn`] with any writer.
    pub fn spawn_with_writer<W>(
        writer: W,
        sample_allows: f64,
        metrics: AuthzMetrics,
    ) -> (AuditSink, tokio::task::JoinHandle<()>)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(AUDIT_CHANNEL_CAPACITY);
        let task = tokio::spawn(write_lines(rx, writer, metrics.clone()));
        let sink = AuditSink {
            inner: Some(Arc::new(Inner {
                tx,
                sample_allows: sample_allows.clamp(0.0, 1.0),
                metrics,
            })),
        };
        (sink, task)
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether this allow decision should be written (sampling). Call before
    /// building the record so unsampled allows cost nothing.
    #[inline]
    pub fn sample_allow(&self) -> bool {
        match &self.inner {
            None => false,
            Some(inner) if inner.sample_allows >= 1.0 => true,
            Some(inner) if inner.sample_allows <= 0.0 => false,
            Some(inner) => rand::random::<f64>() < inner.sample_allows,
        }
    }

    /// Queues an allow line; drops (and counts) it if the writer is behind.
    pub fn record_allow(&self, record: AuditRecord) {
        let Some(inner) = &self.inner else { return };
        if inner.tx.try_send(record).is_err() {
            inner.metrics.audit_dropped(true);
        }
    }

    /// Queues a deny line, waiting up to [`DENY_WAIT`] for room.
    pub async fn record_deny(&self, record: AuditRecord) {
        let Some(inner) = &self.inner else { return };
        let record = match inner.tx.try_send(record) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(record)) => record,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inner.metrics.audit_dropped(false);
                return;
            }
        };
        if let Err(err) = inner.tx.send_timeout(record, DENY_WAIT).await {
            inner.metrics.audit_dropped(false);
            let record = match err {
                mpsc::error::SendTimeoutError::Timeout(r)
                | mpsc::error::SendTimeoutError::Closed(r) => r,
            };
            tracing::error!(line = %record.to_json(), "audit writer stalled; deny line not written to the audit log");
        }
    }
}

async fn write_lines<W>(mut rx: mpsc::Receiver<AuditRecord>, writer: W, metrics: AuthzMetrics)
where
    W: AsyncWrite + Unpin,
{
    let mut out = BufWriter::with_capacity(64 * 1024, writer);
    let mut line = String::with_capacity(512);
    while let Some(first) = rx.recv().await {
        let mut batch = 0u64;
        let mut next = Some(first);
        let mut failed = false;
        while let Some(record) = next {
            line.clear();
            line.push_str(&record.to_json());
            line.push('\n');
            if !failed {
                if let Err(err) = out.write_all(line.as_bytes()).await {
                    tracing::error!(error = %err, "cannot write the audit log");
                    failed = true;
                }
            }
            if failed {
                metrics.audit_dropped(record.allowed);
            } else {
                batch += 1;
            }
            // Drain what is already queued before flushing: one flush per burst.
            next = rx.try_recv().ok();
        }
        if let Err(err) = out.flush().await {
            tracing::error!(error = %err, "cannot flush the audit log");
        }
        metrics.audit_written().inc_by(batch);
    }
    let _ = out.flush().await;
}
