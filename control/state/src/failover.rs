//! `Command::Failover`: which member of a FailoverGroup is active, decided
//! once, through Raft, with compare-and-set on the group's generation. Two
//! operators (or, later, two health checkers) racing get one winner and one
//! `GenerationConflict`; every edge then follows the same status.

use serde_json::Value;

use crate::spec::{
    FailoverEvent, FailoverGroupSpec, FailoverStatus, Fence, FenceAction, FAILOVER_HISTORY,
};
use crate::{
    typed, validate_name, Command, CommandError, Event, EventType, Kind, Outcome, Resource, State,
    ValidationError,
};

/// Reasons are for people, and every one is kept in the log and the history.
const MAX_REASON: usize = 1024;

/// The fields of `Command::Failover`, borrowed.
pub(crate) struct Request<'a> {
    group: &'a str,
    to: Option<&'a str>,
    expected_generation: Option<u64>,
    planned: bool,
    failback: bool,
    reason: Option<&'a str>,
    by: &'a str,
    at_unix_ms: u64,
    fence: FenceAction,
}

impl<'a> Request<'a> {
    pub(crate) fn of(cmd: &'a Command) -> Option<Request<'a>> {
        match cmd {
            Command::Failover {
                group,
                to,
                expected_generation,
                planned,
                failback,
                reason,
                by,
                at_unix_ms,
                fence,
            } => Some(Request {
                group,
                to: to.as_deref(),
                expected_generation: *expected_generation,
                planned: *planned,
                failback: *failback,
                reason: reason.as_deref(),
                by,
                at_unix_ms: *at_unix_ms,
                fence: *fence,
            }),
            _ => None,
        }
    }

    fn invalid(&self, errors: Vec<ValidationError>) -> CommandError {
        CommandError::Invalid {
            kind: Kind::FailoverGroup,
            name: self.group.to_string(),
            errors,
        }
    }

    /// What can be checked without the state (before proposing, too).
    pub(crate) fn validate(&self) -> Result<(), CommandError> {
        let mut errors = Vec::new();
        if let Err(m) = validate_name(self.group) {
            errors.push(ValidationError::new("group", m));
        }
        if let Some(to) = self.to {
            if let Err(m) = validate_name(to) {
                errors.push(ValidationError::new("to", m));
            }
        }
        if self.reason.is_some_and(|r| r.len() > MAX_REASON) {
            errors.push(ValidationError::new(
                "reason",
                format!("longer than {MAX_REASON} bytes"),
            ));
        }
        if self.by.trim().is_empty() {
            errors.push(ValidationError::new(
                "by",
                "the caller's identity is required",
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(self.invalid(errors))
        }
    }

    /// The member to switch to, or why there is none.
    fn target<'s>(&self, spec: &'s FailoverGroupSpec, active: &str) -> Result<&'s str, String> {
        let wanted = match (self.to, self.failback) {
            (Some(to), true) if to != spec.primary => {
                return Err(format!(
                    "a failback goes to the primary '{}', not '{to}'",
                    spec.primary
                ))
            }
            (Some(to), _) => to,
            (None, true) => &spec.primary,
            (None, false) => spec
                .standby
                .iter()
                .find(|s| *s != active)
                .ok_or_else(|| {
                    format!("no standby other than the active '{active}' (a failback returns to the primary)")
                })?,
        };
        let member = spec.members().find(|m| *m == wanted).ok_or_else(|| {
            format!(
                "'{wanted}' is not a member of the group (primary {}, standby {})",
                spec.primary,
                spec.standby.join(", ")
            )
        })?;
        if member == active {
            return Err(format!("'{member}' is already active"));
        }
        Ok(member)
    }
}

/// A new spec of an existing group must still list its active cluster:
/// otherwise edges would be left following a cluster the group no longer
/// has. Fail over first, then remove the old member.
pub(crate) fn check_spec_keeps_active(
    name: &str,
    current: &Resource,
    new_spec: &Value,
) -> Result<(), CommandError> {
    if current.status.is_null() {
        return Ok(());
    }
    // The new spec was validated already; the error is only for safety.
    let spec: FailoverGroupSpec = typed(new_spec).map_err(|e| CommandError::Invalid {
        kind: Kind::FailoverGroup,
        name: name.to_string(),
        errors: vec![e],
    })?;
    let Ok(status) = serde_json::from_value::<FailoverStatus>(current.status.clone()) else {
        return Ok(());
    };
    if spec.is_member(&status.active) {
        return Ok(());
    }
    Err(CommandError::Invalid {
        kind: Kind::FailoverGroup,
        name: name.to_string(),
        errors: vec![ValidationError::new(
            "spec",
            format!(
                "'{}' is the active cluster (generation {}) and must stay a member; fail over to another member first",
                status.active, status.generation
            ),
        )],
    })
}

impl State {
    pub(crate) fn do_failover(
        &mut self,
        req: &Request<'_>,
    ) -> Result<(Outcome, Option<Event>), CommandError> {
        let key = (Kind::FailoverGroup, req.group.to_string());
        let Some(r) = self.resources.get(&key) else {
            return Err(CommandError::NotFound {
                kind: Kind::FailoverGroup,
                name: req.group.to_string(),
            });
        };
        let spec: FailoverGroupSpec = typed(&r.spec).map_err(|e| req.invalid(vec![e]))?;
        let current = spec.in_force(&r.status);
        if let Some(expected) = req.expected_generation {
            if expected != current.generation {
                return Err(CommandError::GenerationConflict {
                    name: req.group.to_string(),
                    expected,
                    actual: current.generation,
                });
            }
        }
        let status = match req.fence {
            FenceAction::Switch => req.switched(&spec, current)?,
            FenceAction::Raise => {
                if let Some(f) = &current.fence {
                    return Err(req.invalid(vec![ValidationError::new(
                        "fence",
                        format!("already fenced for a switch to '{}' (by {}); finish or lift that one first", f.to, f.by),
                    )]));
                }
                let to = req
                    .target(&spec, &current.active)
                    .map_err(|m| req.invalid(vec![ValidationError::new("to", m)]))?
                    .to_string();
                FailoverStatus {
                    fence: Some(Fence {
                        to,
                        by: req.by.to_string(),
                        at_unix_ms: req.at_unix_ms,
                    }),
                    ..current
                }
            }
            FenceAction::Lift => {
                if current.fence.is_none() {
                    return Err(
                        req.invalid(vec![ValidationError::new("fence", "produce is not fenced")])
                    );
                }
                FailoverStatus {
                    fence: None,
                    ..current
                }
            }
        };
        self.put_failover_status(&key, req, &status)
    }

    fn put_failover_status(
        &mut self,
        key: &(Kind, String),
        req: &Request<'_>,
        status: &FailoverStatus,
    ) -> Result<(Outcome, Option<Event>), CommandError> {
        let status = serde_json::to_value(status)
            .map_err(|e| req.invalid(vec![ValidationError::new("status", e.to_string())]))?;
        let Some(r) = self.resources.get_mut(key) else {
            return Err(CommandError::NotFound {
                kind: Kind::FailoverGroup,
                name: req.group.to_string(),
            });
        };
        self.revision += 1;
        let revision = self.revision;
        r.status = status;
        r.revision = revision;
        let resource = r.clone();
        Ok((
            Outcome::StatusUpdated {
                resource: resource.clone(),
            },
            Some(Event {
                revision,
                event_type: EventType::Put,
                resource,
            }),
        ))
    }
}

impl Request<'_> {
    /// The status after a switch: a new generation, and no fence (the
    /// planned switch it prepared is this one, or a failover overtook it).
    fn switched(
        &self,
        spec: &FailoverGroupSpec,
        current: FailoverStatus,
    ) -> Result<FailoverStatus, CommandError> {
        let req = self;
        let to = req
            .target(spec, &current.active)
            .map_err(|m| req.invalid(vec![ValidationError::new("to", m)]))?
            .to_string();
        if let Some(f) = current.fence.as_ref().filter(|f| f.to != to && req.planned) {
            return Err(req.invalid(vec![ValidationError::new(
                "to",
                format!(
                    "produce is fenced for a planned switch to '{}', not '{to}'",
                    f.to
                ),
            )]));
        }
        let generation = current.generation + 1;
        let mut history = current.history;
        history.push(FailoverEvent {
            from: current.active.clone(),
            to: to.clone(),
            generation,
            planned: req.planned,
            by: req.by.to_string(),
            reason: req.reason.map(str::to_string),
            at_unix_ms: req.at_unix_ms,
        });
        let drop = history.len().saturating_sub(FAILOVER_HISTORY);
        history.drain(..drop);
        Ok(FailoverStatus {
            active: to,
            generation,
            previous: Some(current.active),
            planned: req.planned,
            reason: req.reason.map(str::to_string),
            by: req.by.to_string(),
            at_unix_ms: req.at_unix_ms,
            history,
            fence: None,
        })
    }
}
