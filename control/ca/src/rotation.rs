//! CA generations and their rotation with overlap, as pure functions of the
//! stored generations and the clock:
//!
//! ```text
//! Prepared --(activate_at reached)--> Active --(a newer one activates)--> Retiring
//!   --(retire_after reached: every certificate it signed has expired)--> Retired
//! ```
//! A Prepared root is already in the trust bundle, so by the time it signs,
//! every peer has had `publish_delay` to learn it. A Retiring root stays in
//! the bundle until the last certificate it signed has expired.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CaState {
    Prepared,
    Active,
    Retiring,
    Retired,
}

impl CaState {
    pub fn as_str(self) -> &'static str {
        match self {
            CaState::Prepared => "prepared",
            CaState::Active => "active",
            CaState::Retiring => "retiring",
            CaState::Retired => "retired",
        }
    }
}

/// What rotation needs to know of one generation (the CertificateAuthority
/// resource without its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub generation: u64,
    pub state: CaState,
    pub cert_pem: String,
    pub not_after_unix: i64,
    /// Prepared: when it starts signing.
    pub activate_at_unix: Option<i64>,
    /// Retiring: when it leaves the bundle.
    pub retire_after_unix: Option<i64>,
}

impl Generation {
    /// The state at `now`, counting transitions that are due but not yet
    /// recorded (so every node answers the same between two leader ticks).
    pub fn state_at(&self, now: i64) -> CaState {
        match self.state {
            CaState::Prepared if self.activate_at_unix.is_some_and(|t| t <= now) => CaState::Active,
            CaState::Retiring if self.retire_after_unix.is_none_or(|t| t <= now) => {
                CaState::Retired
            }
            s => s,
        }
    }
}

/// Roots to trust at `now`: every generation not yet Retired and not
/// expired, oldest first.
pub fn bundle(gens: &[Generation], now: i64) -> Vec<&Generation> {
    let mut out: Vec<&Generation> = gens
        .iter()
        .filter(|g| g.state_at(now) != CaState::Retired && g.not_after_unix > now)
        .collect();
    out.sort_by_key(|g| g.generation);
    out
}

/// The generation that signs at `now`: the newest Active one that has not
/// expired.
pub fn signer(gens: &[Generation], now: i64) -> Option<&Generation> {
    gens.iter()
        .filter(|g| g.state_at(now) == CaState::Active && g.not_after_unix > now)
        .max_by_key(|g| g.generation)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Validity of each root.
    pub validity: Duration,
    /// Start a new generation when the signing one has less than this left.
    pub rotate_before: Duration,
    /// How long a new root sits in bundles before it signs.
    pub publish_delay: Duration,
    /// Longest certificate lifetime the CA signs (see `Lifetimes::longest`).
    pub longest_leaf: Duration,
}

impl RotationPolicy {
    /// A policy whose steps fit into a root's life: the new root must be
    /// published and the old one's certificates must run out before it
    /// expires.
    pub fn validate(&self) -> Result<(), String> {
        let need = self.publish_delay + self.longest_leaf;
        if self.rotate_before <= need {
            return Err(format!(
                "rotate-before ({}s) must exceed publish delay + longest certificate lifetime ({}s)",
                self.rotate_before.as_secs(),
                need.as_secs()
            ));
        }
        if self.validity <= self.rotate_before {
            return Err(format!(
                "CA validity ({}s) must exceed rotate-before ({}s)",
                self.validity.as_secs(),
                self.rotate_before.as_secs()
            ));
        }
        Ok(())
    }
}

/// One change the leader records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Make generation `generation`; Active at once when nothing signs yet
    /// (`activate_at_unix` None), otherwise Prepared until then.
    Generate {
        generation: u64,
        activate_at_unix: Option<i64>,
    },
    Activate {
        generation: u64,
    },
    Retire {
        generation: u64,
        retire_after_unix: i64,
    },
    Retired {
        generation: u64,
    },
}

/// The transitions due at `now`. `last_issued_not_after(g)`: the latest
/// expiry among certificates generation `g` signed (issuance records).
/// `force`: start a new generation now (an operator's rotation).
pub fn plan(
    gens: &[Generation],
    now: i64,
    policy: &RotationPolicy,
    last_issued_not_after: impl Fn(u64) -> Option<i64>,
    force: bool,
) -> Vec<Transition> {
    let mut out = Vec::new();
    let next_gen = gens.iter().map(|g| g.generation).max().unwrap_or(0) + 1;
    let current = signer(gens, now);
    let prepared = gens
        .iter()
        .any(|g| g.state == CaState::Prepared && g.state_at(now) == CaState::Prepared);
    match current {
        None if !prepared => out.push(Transition::Generate {
            generation: next_gen,
            activate_at_unix: None,
        }),
        Some(cur)
            if !prepared
                && (force || cur.not_after_unix - now <= policy.rotate_before.as_secs() as i64) =>
        {
            out.push(Transition::Generate {
                generation: next_gen,
                activate_at_unix: Some(now + policy.publish_delay.as_secs() as i64),
            })
        }
        _ => {}
    }
    for g in gens {
        match (g.state, g.state_at(now)) {
            (CaState::Prepared, CaState::Active) => out.push(Transition::Activate {
                generation: g.generation,
            }),
            (CaState::Active, CaState::Active)
                if current.is_some_and(|c| c.generation > g.generation) =>
            {
                // A certificate may still be signed by this generation on
                // a node that has not seen the switch: wait for the longest
                // lifetime too, not only the recorded issuances.
                let recorded = last_issued_not_after(g.generation).unwrap_or(now);
                let after = recorded
                    .max(now + policy.longest_leaf.as_secs() as i64)
                    .min(g.not_after_unix);
                out.push(Transition::Retire {
                    generation: g.generation,
                    retire_after_unix: after,
                });
            }
            (CaState::Retiring, CaState::Retired) => out.push(Transition::Retired {
                generation: g.generation,
            }),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600;

    fn policy() -> RotationPolicy {
        RotationPolicy {
            validity: Duration::from_secs(100 * H as u64),
            rotate_before: Duration::from_secs(30 * H as u64),
            publish_delay: Duration::from_secs(H as u64),
            longest_leaf: Duration::from_secs(24 * H as u64),
        }
    }

    fn generation(n: u64, state: CaState, not_after: i64) -> Generation {
        Generation {
            generation: n,
            state,
            cert_pem: format!("root{n}"),
            not_after_unix: not_after,
            activate_at_unix: None,
            retire_after_unix: None,
        }
    }

    /// Applies transitions the way the leader records them.
    fn apply(gens: &mut Vec<Generation>, ts: &[Transition], now: i64, p: &RotationPolicy) {
        for t in ts {
            match *t {
                Transition::Generate {
                    generation,
                    activate_at_unix,
                } => gens.push(Generation {
                    activate_at_unix,
                    ..generation_at(generation, activate_at_unix, now, p)
                }),
                Transition::Activate { generation } => {
                    let g = gens
                        .iter_mut()
                        .find(|g| g.generation == generation)
                        .unwrap();
                    g.state = CaState::Active;
                }
                Transition::Retire {
                    generation,
                    retire_after_unix,
                } => {
                    let g = gens
                        .iter_mut()
                        .find(|g| g.generation == generation)
                        .unwrap();
                    g.state = CaState::Retiring;
                    g.retire_after_unix = Some(retire_after_unix);
                }
                Transition::Retired { generation } => {
                    let g = gens
                        .iter_mut()
                        .find(|g| g.generation == generation)
                        .unwrap();
                    g.state = CaState::Retired;
                }
            }
        }
    }

    fn generation_at(n: u64, act: Option<i64>, now: i64, p: &RotationPolicy) -> Generation {
        generation(
            n,
            if act.is_some() {
                CaState::Prepared
            } else {
                CaState::Active
            },
            now + p.validity.as_secs() as i64,
        )
    }

    fn names(v: Vec<&Generation>) -> Vec<u64> {
        v.into_iter().map(|g| g.generation).collect()
    }

    #[test]
    fn policy_must_fit_in_a_root_life() {
        assert!(policy().validate().is_ok());
        let tight = RotationPolicy {
            rotate_before: Duration::from_secs(25 * H as u64),
            ..policy()
        };
        assert!(tight
            .validate()
            .unwrap_err()
            .contains("must exceed publish delay"));
    }

    #[test]
    fn full_rotation_with_overlap() {
        let p = policy();
        let mut gens = Vec::new();
        // Bootstrap: nothing exists, generation 1 signs at once.
        let t = plan(&gens, 0, &p, |_| None, false);
        assert_eq!(
            t,
            vec![Transition::Generate {
                generation: 1,
                activate_at_unix: None
            }]
        );
        apply(&mut gens, &t, 0, &p);
        assert_eq!(signer(&gens, 0).unwrap().generation, 1);
        assert_eq!(names(bundle(&gens, 0)), vec![1]);
        // Mid-life: nothing to do.
        assert!(plan(&gens, 50 * H, &p, |_| None, false).is_empty());
        // 30 h before expiry: generation 2 is prepared and published, gen 1 still signs.
        let now = 70 * H;
        let t = plan(&gens, now, &p, |_| None, false);
        assert_eq!(
            t,
            vec![Transition::Generate {
                generation: 2,
                activate_at_unix: Some(now + H)
            }]
        );
        apply(&mut gens, &t, now, &p);
        assert_eq!(signer(&gens, now).unwrap().generation, 1);
        assert_eq!(names(bundle(&gens, now)), vec![1, 2]);
        assert!(plan(&gens, now + 10, &p, |_| None, false).is_empty());
        // After the publication delay, every node already signs with gen 2
        // (even before the leader records it), and gen 1 retires once its
        // last certificate (recorded at now + 2 h) and the longest lifetime pass.
        let now = now + H;
        assert_eq!(signer(&gens, now).unwrap().generation, 2);
        let t = plan(&gens, now, &p, |g| (g == 1).then_some(now + 2 * H), false);
        assert_eq!(
            t,
            vec![
                Transition::Retire {
                    generation: 1,
                    retire_after_unix: now + 24 * H
                },
                Transition::Activate { generation: 2 },
            ]
        );
        apply(&mut gens, &t, now, &p);
        assert_eq!(names(bundle(&gens, now + 24 * H - 1)), vec![1, 2]);
        assert_eq!(names(bundle(&gens, now + 24 * H)), vec![2]);
        let t = plan(&gens, now + 24 * H, &p, |_| None, false);
        assert_eq!(t, vec![Transition::Retired { generation: 1 }]);
        apply(&mut gens, &t, now + 24 * H, &p);
        assert_eq!(gens[0].state, CaState::Retired);
        assert!(plan(&gens, now + 24 * H, &p, |_| None, false).is_empty());
    }

    #[test]
    fn retire_waits_for_the_latest_recorded_certificate_but_not_past_expiry() {
        let p = policy();
        let mut old = generation(1, CaState::Active, 90 * H);
        let mut new = generation(2, CaState::Prepared, 170 * H);
        new.activate_at_unix = Some(70 * H);
        let gens = vec![old.clone(), new.clone()];
        let t = plan(&gens, 70 * H, &p, |_| Some(95 * H), false);
        assert!(t.contains(&Transition::Retire {
            generation: 1,
            retire_after_unix: 90 * H
        }));
        // An expired generation is never in the bundle nor signs.
        old.state = CaState::Active;
        new.state = CaState::Active;
        let gens = vec![old, new];
        assert_eq!(names(bundle(&gens, 91 * H)), vec![2]);
        assert_eq!(signer(&gens, 91 * H).unwrap().generation, 2);
    }

    #[test]
    fn forced_rotation_and_no_second_prepared() {
        let p = policy();
        let gens = vec![generation(1, CaState::Active, 100 * H)];
        let t = plan(&gens, H, &p, |_| None, true);
        assert_eq!(
            t,
            vec![Transition::Generate {
                generation: 2,
                activate_at_unix: Some(2 * H)
            }]
        );
        let mut g2 = generation(2, CaState::Prepared, 101 * H);
        g2.activate_at_unix = Some(2 * H);
        let gens = vec![gens[0].clone(), g2];
        assert!(plan(&gens, H + 1, &p, |_| None, true).is_empty());
    }
}
