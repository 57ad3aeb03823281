//! Automatic failover, decided from health evidence (issue 14).
//!
//! Observers (every edge that serves a group, and the control plane's
//! leader) probe each member cluster and fold the results into a
//! [`ProbeCounter`]: a cluster goes down after `failure_threshold`
//! consecutive failures and comes back only after `recovery_threshold`
//! consecutive successes, so one lost probe, or one good one amid failures,
//! changes nothing. [`automatic_decision`] turns the observers' views into
//! at most one switch: pure, so it is tested alone and every leader decides
//! the same from the same evidence; the controller that gathers evidence
//! and proposes the switch (compare-and-set on the generation) is IO.

use serde::{Deserialize, Serialize};

use crate::spec::{FailoverGroupSpec, FailoverMode, FailoverStatus, HealthPolicy};

/// What an observer concludes about a member cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Not probed yet.
    #[default]
    Unknown,
    Up,
    Down,
}

/// Consecutive probe results with hysteresis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeCounter {
    pub state: HealthState,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

impl ProbeCounter {
    /// Folds one probe result in and returns the state after it. A cluster
    /// never seen down counts as up at its first success: a fresh observer
    /// must not hold a live standby back for `recovery_threshold` probes.
    pub fn observe(&mut self, ok: bool, policy: &HealthPolicy) -> HealthState {
        if ok {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
            let recovered = self.consecutive_successes >= policy.recovery_threshold;
            if self.state == HealthState::Unknown || recovered {
                self.state = HealthState::Up;
            }
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
            if self.consecutive_failures >= policy.failure_threshold {
                self.state = HealthState::Down;
            }
        }
        self.state
    }
}

/// One observer's view of one member (`EdgeStatus.health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterHealth {
    pub group: String,
    pub cluster: String,
    pub state: HealthState,
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default)]
    pub consecutive_successes: u32,
    /// Why the last failed probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the last probe ended (the observer's clock).
    pub checked_at_unix_ms: u64,
}

/// One observer's current view of one member, as the controller counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    /// `edge/<name>` or `control-plane`.
    pub observer: String,
    pub cluster: String,
    pub state: HealthState,
}

/// What the controller should do about one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do; the reason is for the log when it changes.
    Stay(String),
    /// Switch to `to` (compare-and-set on `from_generation`).
    Switch {
        to: String,
        from_generation: u64,
        failback: bool,
        reason: String,
    },
}

/// The observers' agreement on one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    pub observers: u32,
    pub up: u32,
    pub down: u32,
}

impl Tally {
    pub fn of(votes: &[Vote], cluster: &str) -> Tally {
        let mut t = Tally::default();
        for v in votes.iter().filter(|v| v.cluster == cluster) {
            t.observers += 1;
            match v.state {
                HealthState::Up => t.up += 1,
                HealthState::Down => t.down += 1,
                HealthState::Unknown => {}
            }
        }
        t
    }

    /// At least `quorum` agree, and they are a strict majority of those
    /// that report on the cluster (an observer with no view yet counts
    /// against both sides).
    fn agreed(self, count: u32, quorum: u32) -> bool {
        count >= quorum && count * 2 > self.observers
    }

    pub fn down(self, quorum: u32) -> bool {
        self.agreed(self.down, quorum)
    }

    pub fn up(self, quorum: u32) -> bool {
        self.agreed(self.up, quorum)
    }

    fn describe(self) -> String {
        format!(
            "{} down, {} up of {} observers",
            self.down, self.up, self.observers
        )
    }
}

/// The switch, if any, that the evidence calls for. `now_unix_ms` is the
/// controller's clock; `status` is the decision in force.
pub fn automatic_decision(
    spec: &FailoverGroupSpec,
    status: &FailoverStatus,
    votes: &[Vote],
    now_unix_ms: u64,
) -> Decision {
    if spec.mode != FailoverMode::Automatic {
        return Decision::Stay("mode is manual".into());
    }
    let policy = &spec.health;
    let since = now_unix_ms.saturating_sub(status.at_unix_ms);
    if status.generation > 0 && since < policy.hold_down_ms {
        return Decision::Stay(format!(
            "held down for {} ms after generation {}",
            policy.hold_down_ms - since,
            status.generation
        ));
    }
    let active = status.active.as_str();
    let active_tally = Tally::of(votes, active);
    let healthy = |m: &&str| *m != active && Tally::of(votes, m).up(policy.quorum);
    let decide = |to: &str, failback: bool, why: String| Decision::Switch {
        to: to.to_string(),
        from_generation: status.generation,
        failback,
        reason: why,
    };
    if active_tally.down(policy.quorum) {
        // The primary first if it is back, then the standbys in order.
        return match spec.members().find(healthy) {
            Some(to) => decide(
                to,
                to == spec.primary,
                format!(
                    "automatic: '{active}' is down ({}); '{to}' is up ({})",
                    active_tally.describe(),
                    Tally::of(votes, to).describe()
                ),
            ),
            None => Decision::Stay(format!(
                "'{active}' is down ({}) but no other member is up by quorum",
                active_tally.describe()
            )),
        };
    }
    let primary = spec.primary.as_str();
    if spec.failback == crate::spec::FailbackMode::Automatic
        && active != primary
        && Tally::of(votes, primary).up(policy.quorum)
    {
        return decide(
            primary,
            true,
            format!(
                "automatic failback: the primary '{primary}' is up again ({})",
                Tally::of(votes, primary).describe()
            ),
        );
    }
    Decision::Stay(format!(
        "'{active}' is serving ({})",
        active_tally.describe()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FailbackMode;

    fn spec(mode: FailoverMode) -> FailoverGroupSpec {
        serde_json::from_value(serde_json::json!({
            "primary": "east", "standby": ["west", "south"],
            "mode": mode, "health": {"failure_threshold": 2, "recovery_threshold": 3, "hold_down_ms": 10_000}
        }))
        .unwrap()
    }

    fn votes(list: &[(&str, &str, HealthState)]) -> Vec<Vote> {
        list.iter()
            .map(|(o, c, s)| Vote {
                observer: o.to_string(),
                cluster: c.to_string(),
                state: *s,
            })
            .collect()
    }

    use HealthState::{Down, Unknown, Up};

    #[test]
    fn the_counter_needs_consecutive_failures_to_go_down_and_successes_to_come_back() {
        let policy = spec(FailoverMode::Automatic).health;
        let mut c = ProbeCounter::default();
        assert_eq!(c.observe(true, &policy), Up, "first success: up at once");
        assert_eq!(c.observe(false, &policy), Up, "one failure is not enough");
        assert_eq!(c.observe(true, &policy), Up);
        assert_eq!(c.observe(false, &policy), Up);
        assert_eq!(c.observe(false, &policy), Down);
        assert_eq!(c.observe(true, &policy), Down, "hysteresis: one success");
        assert_eq!(c.observe(true, &policy), Down);
        assert_eq!(c.observe(false, &policy), Down, "a failure resets the run");
        for _ in 0..2 {
            assert_eq!(c.observe(true, &policy), Down);
        }
        assert_eq!(c.observe(true, &policy), Up, "three in a row");
        let mut fresh = ProbeCounter::default();
        assert_eq!(fresh.observe(false, &policy), Unknown);
        assert_eq!(fresh.observe(false, &policy), Down);
    }

    #[test]
    fn a_quorum_of_observers_switches_to_the_first_healthy_standby() {
        let s = spec(FailoverMode::Automatic);
        let status = s.in_force(&serde_json::Value::Null);
        let v = votes(&[
            ("edge/a", "east", Down),
            ("edge/b", "east", Down),
            ("control-plane", "east", Up),
            ("edge/a", "west", Down),
            ("edge/b", "west", Down),
            ("edge/a", "south", Up),
            ("edge/b", "south", Up),
        ]);
        match automatic_decision(&s, &status, &v, 1) {
            Decision::Switch {
                to,
                from_generation,
                failback,
                reason,
            } => {
                assert_eq!(to, "south");
                assert_eq!(from_generation, 0);
                assert!(!failback);
                assert!(reason.contains("2 down, 1 up of 3 observers"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_observer_or_a_split_never_switches() {
        let s = spec(FailoverMode::Automatic);
        let status = s.in_force(&serde_json::Value::Null);
        for v in [
            // An edge cut off from the primary, alone.
            votes(&[("edge/a", "east", Down), ("edge/a", "west", Up)]),
            // Two of four: not a strict majority.
            votes(&[
                ("edge/a", "east", Down),
                ("edge/b", "east", Down),
                ("edge/c", "east", Up),
                ("control-plane", "east", Up),
                ("edge/a", "west", Up),
                ("edge/b", "west", Up),
            ]),
            // Observers that have no view yet count against a switch.
            votes(&[
                ("edge/a", "east", Down),
                ("edge/b", "east", Down),
                ("edge/c", "east", Unknown),
                ("edge/d", "east", Unknown),
                ("edge/a", "west", Up),
                ("edge/b", "west", Up),
            ]),
        ] {
            assert!(
                matches!(automatic_decision(&s, &status, &v, 1), Decision::Stay(_)),
                "{v:?}"
            );
        }
    }

    #[test]
    fn no_healthy_standby_manual_mode_and_hold_down_keep_the_group() {
        let s = spec(FailoverMode::Automatic);
        let status = s.in_force(&serde_json::Value::Null);
        let down_everywhere = votes(&[
            ("edge/a", "east", Down),
            ("edge/b", "east", Down),
            ("edge/a", "west", Down),
            ("edge/b", "west", Down),
        ]);
        let Decision::Stay(why) = automatic_decision(&s, &status, &down_everywhere, 1) else {
            panic!("switched to a dead standby");
        };
        assert!(why.contains("no other member is up"), "{why}");

        let east_down = votes(&[
            ("edge/a", "east", Down),
            ("edge/b", "east", Down),
            ("edge/a", "west", Up),
            ("edge/b", "west", Up),
        ]);
        let manual = spec(FailoverMode::Manual);
        assert_eq!(
            automatic_decision(&manual, &status, &east_down, 1),
            Decision::Stay("mode is manual".into())
        );

        // Just switched to west (generation 1 at t=1000): west dies at once.
        let mut switched = status.clone();
        switched.active = "west".into();
        switched.generation = 1;
        switched.at_unix_ms = 1000;
        let west_down = votes(&[
            ("edge/a", "west", Down),
            ("edge/b", "west", Down),
            ("edge/a", "east", Up),
            ("edge/b", "east", Up),
        ]);
        assert!(matches!(
            automatic_decision(&s, &switched, &west_down, 5000),
            Decision::Stay(why) if why.contains("held down")
        ));
        match automatic_decision(&s, &switched, &west_down, 11_000) {
            Decision::Switch {
                to,
                failback,
                from_generation,
                ..
            } => {
                assert_eq!((to.as_str(), failback, from_generation), ("east", true, 1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failback_is_automatic_only_when_the_group_says_so() {
        let mut s = spec(FailoverMode::Automatic);
        let mut status = s.in_force(&serde_json::Value::Null);
        status.active = "west".into();
        status.generation = 1;
        let both_up = votes(&[
            ("edge/a", "east", Up),
            ("edge/b", "east", Up),
            ("edge/a", "west", Up),
            ("edge/b", "west", Up),
        ]);
        assert!(matches!(
            automatic_decision(&s, &status, &both_up, 60_000),
            Decision::Stay(_)
        ));
        s.failback = FailbackMode::Automatic;
        assert!(matches!(
            automatic_decision(&s, &status, &both_up, 60_000),
            Decision::Switch { ref to, failback: true, .. } if to == "east"
        ));
    }
}
