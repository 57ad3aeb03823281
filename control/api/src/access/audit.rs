//! The audit trail of the control-plane API: every write and every refusal,
//! with the caller's identity. Always a tracing event on target
//! `strait_control::audit`; with `--audit-log FILE` also one JSON object
//! per line (`time`, `caller`, `operation`, `kind`, `name`, `outcome`,
//! `reason`).

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;

use super::identity::Caller;
use super::policy::Access;

pub const TARGET: &str = "strait_control::audit";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// An authorized write that took effect.
    Ok,
    /// An authorized write that failed (invalid, conflict, no leader...).
    Failed,
    /// PERMISSION_DENIED.
    Denied,
    /// UNAUTHENTICATED.
    Unauthenticated,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    caller: String,
    operation: &'a str,
    kind: &'a str,
    name: &'a str,
    outcome: AuditOutcome,
    reason: &'a str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(thiserror::Error, Debug)]
#[error("--audit-log {path}: {source}")]
pub struct AuditOpenError {
    path: String,
    source: std::io::Error,
}

pub struct Audit {
    file: Option<Mutex<std::fs::File>>,
    denied: Family<OperationLabel, Counter>,
}

impl Audit {
    /// `file`: appended to (created with mode 0600). Registers
    /// `strait_control_requests_denied_total{operation}`.
    pub fn new(
        file: Option<&Path>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Audit, AuditOpenError> {
        let file = match file {
            Some(p) => {
                let mut o = std::fs::OpenOptions::new();
                o.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
                Some(Mutex::new(o.open(p).map_err(|source| AuditOpenError {
                    path: p.display().to_string(),
                    source,
                })?))
            }
            None => None,
        };
        let denied = Family::<OperationLabel, Counter>::default();
        registry.register(
            "strait_control_requests_denied",
            "Control-plane calls refused (UNAUTHENTICATED or PERMISSION_DENIED), by operation",
            denied.clone(),
        );
        Ok(Audit { file, denied })
    }

    pub fn record(
        &self,
        caller: &Caller,
        access: &Access<'_>,
        outcome: AuditOutcome,
        reason: &str,
    ) {
        let kind = access.kind.map(|k| k.as_str()).unwrap_or("");
        let name = access.name.unwrap_or("");
        let operation = access.op.as_str();
        match outcome {
            AuditOutcome::Denied | AuditOutcome::Unauthenticated => {
                self.denied
                    .get_or_create(&OperationLabel {
                        operation: operation.to_string(),
                    })
                    .inc();
                tracing::warn!(target: TARGET, caller = %caller, operation, kind, name, ?outcome, reason, "refused");
            }
            // Heartbeats write the status every few seconds: keep them out
            // of the default log level (they stay in the audit file).
            AuditOutcome::Ok if access.op.as_str() == "Control/UpdateStatus" => {
                tracing::debug!(target: TARGET, caller = %caller, operation, kind, name, ?outcome, "write");
            }
            AuditOutcome::Ok | AuditOutcome::Failed => {
                tracing::info!(target: TARGET, caller = %caller, operation, kind, name, ?outcome, reason, "write");
            }
        }
        let Some(file) = &self.file else { return };
        let line = Line {
            time: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            caller: caller.to_string(),
            operation,
            kind,
            name,
            outcome,
            reason,
        };
        let mut text = serde_json::to_string(&line).expect("audit line serializes");
        text.push('\n');
        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(text.as_bytes()) {
            tracing::error!(target: TARGET, error = %e, "cannot write the audit log");
        }
    }
}
