//! FailoverGroup: the Failover command, its compare-and-set, and who may
//! write the status.

use super::*;
use crate::spec::FailoverStatus;
use serde_json::json;

fn group(standby: &[&str]) -> Command {
    group_with("a", standby)
}

fn group_with(primary: &str, standby: &[&str]) -> Command {
    Command::Apply {
        kind: Kind::FailoverGroup,
        name: "g".into(),
        labels: BTreeMap::new(),
        spec: json!({ "primary": primary, "standby": standby }),
        expected_revision: None,
    }
}

fn failover(to: Option<&str>, expected: Option<u64>, failback: bool) -> Command {
    Command::Failover {
        group: "g".into(),
        to: to.map(str::to_string),
        expected_generation: expected,
        planned: false,
        failback,
        reason: Some("east is down".into()),
        by: "spiffe://d/admin/ops".into(),
        at_unix_ms: 1_700_000_000_000,
        fence: Default::default(),
    }
}

/// The status the command wrote, or the error's first path.
fn run(st: &mut State, cmd: &Command) -> Result<FailoverStatus, String> {
    match st.apply(cmd).0 {
        Ok(Outcome::StatusUpdated { resource }) => {
            Ok(serde_json::from_value(resource.status).expect("a FailoverStatus"))
        }
        Err(CommandError::Invalid { errors, .. }) => Err(errors[0].path.clone()),
        Err(e) => Err(e.to_string()),
        Ok(other) => panic!("unexpected {other:?}"),
    }
}

fn status_of(st: &State) -> Value {
    st.get(Kind::FailoverGroup, "g").unwrap().status.clone()
}

#[test]
fn failover_moves_the_active_cluster_and_bumps_the_generation() {
    let mut st = State::new(100);
    st.apply(&group(&["b", "c"])).0.unwrap();
    // No status yet: the primary at generation 0; no target = first standby.
    let s = run(&mut st, &failover(None, Some(0), false)).unwrap();
    assert_eq!(
        (s.active.as_str(), s.generation, s.previous.as_deref()),
        ("b", 1, Some("a"))
    );
    assert_eq!(s.by, "spiffe://d/admin/ops");
    assert_eq!(s.at_unix_ms, 1_700_000_000_000);
    assert_eq!(s.reason.as_deref(), Some("east is down"));
    assert_eq!(st.get(Kind::FailoverGroup, "g").unwrap().revision, 2);
    // The first standby that is not active.
    let s = run(&mut st, &failover(None, Some(1), false)).unwrap();
    assert_eq!((s.active.as_str(), s.generation), ("c", 2));
    // A failback without a target goes to the primary.
    let s = run(&mut st, &failover(None, None, true)).unwrap();
    assert_eq!(
        (s.active.as_str(), s.generation, s.previous.as_deref()),
        ("a", 3, Some("c"))
    );
    let moves: Vec<(&str, &str, u64)> = s
        .history
        .iter()
        .map(|e| (e.from.as_str(), e.to.as_str(), e.generation))
        .collect();
    assert_eq!(moves, vec![("a", "b", 1), ("b", "c", 2), ("c", "a", 3)]);
    // An explicit target.
    let s = run(&mut st, &failover(Some("c"), Some(3), false)).unwrap();
    assert_eq!((s.active.as_str(), s.generation), ("c", 4));
}

#[test]
fn a_stale_generation_is_a_conflict_and_changes_nothing() {
    let mut st = State::new(100);
    st.apply(&group(&["b"])).0.unwrap();
    run(&mut st, &failover(Some("b"), Some(0), false)).unwrap();
    let before = (st.revision(), status_of(&st));
    let (out, events) = st.apply(&failover(Some("a"), Some(0), true));
    let err = out.unwrap_err();
    assert_eq!(
        err,
        CommandError::GenerationConflict {
            name: "g".into(),
            expected: 0,
            actual: 1
        }
    );
    assert_eq!(
        err.to_string(),
        "FailoverGroup 'g': generation 0 expected, 1 found"
    );
    assert!(events.is_empty());
    assert_eq!((st.revision(), status_of(&st)), before);
    // The generation is checked before the target: a caller with a stale
    // view learns that first.
    assert!(run(&mut st, &failover(Some("b"), Some(7), false))
        .unwrap_err()
        .contains("generation 7 expected, 1 found"));
}

#[test]
fn failover_targets_are_checked_against_the_group() {
    let mut st = State::new(100);
    let missing = run(&mut st, &failover(None, None, false)).unwrap_err();
    assert_eq!(missing, "FailoverGroup 'g' not found");
    st.apply(&group(&["b"])).0.unwrap();
    let rev = st.revision();
    for (cmd, want) in [
        // Not a member.
        (failover(Some("zz"), None, false), "to"),
        // Already active.
        (failover(Some("a"), None, false), "to"),
        (failover(None, None, true), "to"),
        // A failback names the primary or nothing.
        (failover(Some("b"), None, true), "to"),
    ] {
        assert_eq!(run(&mut st, &cmd).unwrap_err(), want, "{cmd:?}");
    }
    run(&mut st, &failover(None, None, false)).unwrap();
    // The only standby is active: no target is left but the primary.
    let (out, _) = st.apply(&failover(None, None, false));
    let Err(CommandError::Invalid { errors, .. }) = out else {
        panic!("{out:?}")
    };
    assert!(
        errors[0]
            .message
            .contains("no standby other than the active 'b'"),
        "{errors:?}"
    );
    assert_eq!(st.revision(), rev + 1);
}

#[test]
fn failover_commands_are_validated_before_the_state() {
    let mut cmd = failover(Some("Bad_Name"), None, false);
    if let Command::Failover {
        group, by, reason, ..
    } = &mut cmd
    {
        *group = "also bad".into();
        by.clear();
        *reason = Some("x".repeat(2000));
    }
    let Err(CommandError::Invalid { errors, .. }) = validate_command(&cmd) else {
        panic!("invalid")
    };
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["group", "to", "reason", "by"]);
}

#[test]
fn the_status_of_a_failover_group_has_one_writer() {
    let mut st = State::new(100);
    st.apply(&group(&["b"])).0.unwrap();
    let update = Command::UpdateStatus {
        kind: Kind::FailoverGroup,
        name: "g".into(),
        status: json!({"active": "b", "generation": 99, "by": "me", "at_unix_ms": 1}),
    };
    let (out, events) = st.apply(&update);
    let Err(CommandError::Invalid { errors, .. }) = out else {
        panic!("{out:?}")
    };
    assert_eq!(errors[0].path, "status");
    assert!(events.is_empty());
    assert!(status_of(&st).is_null());
}

#[test]
fn a_spec_must_keep_the_active_cluster_and_re_applying_keeps_the_status() {
    let mut st = State::new(100);
    st.apply(&group(&["b", "c"])).0.unwrap();
    // Before any failover the primary may change freely.
    st.apply(&group_with("x", &["b", "c"])).0.unwrap();
    st.apply(&group(&["b", "c"])).0.unwrap();
    run(&mut st, &failover(Some("b"), None, false)).unwrap();
    let status = status_of(&st);
    // Dropping the active standby is refused.
    let (out, _) = st.apply(&group(&["c"]));
    let Err(CommandError::Invalid { errors, .. }) = out else {
        panic!("{out:?}")
    };
    assert_eq!(errors[0].path, "spec");
    assert!(
        errors[0].message.contains("'b' is the active cluster"),
        "{errors:?}"
    );
    // Dropping another member is fine, and keeps the decision.
    assert!(matches!(
        st.apply(&group(&["b"])).0,
        Ok(Outcome::Applied { changed: true, .. })
    ));
    assert_eq!(status_of(&st), status);
    // So does making the active cluster the primary.
    st.apply(&group_with("b", &["a"])).0.unwrap();
    assert_eq!(status_of(&st), status);
    assert!(matches!(
        st.apply(&group_with("b", &["a"])).0,
        Ok(Outcome::Applied { changed: false, .. })
    ));
}

#[test]
fn the_history_keeps_the_last_twenty_switches() {
    let mut st = State::new(10);
    st.apply(&group(&["b"])).0.unwrap();
    for i in 0..25u64 {
        let cmd = failover(None, Some(i), i % 2 == 1);
        run(&mut st, &cmd).unwrap();
    }
    let s: FailoverStatus = serde_json::from_value(status_of(&st)).unwrap();
    assert_eq!(s.generation, 25);
    assert_eq!(s.history.len(), 20);
    assert_eq!(s.history[0].generation, 6);
    assert_eq!(s.history[19].generation, 25);
    assert_eq!(s.active, "b");
}

#[test]
fn failover_is_deterministic_and_survives_a_snapshot() {
    let cmds = vec![
        group(&["b", "c"]),
        failover(None, Some(0), false),
        failover(Some("c"), Some(0), false),
        failover(Some("c"), Some(1), false),
    ];
    let mut r1 = State::new(10);
    let mut r2 = State::new(10);
    for c in &cmds {
        assert_eq!(r1.apply(c), r2.apply(c));
    }
    // Commands travel through the Raft log as JSON.
    for c in &cmds {
        let back: Command = serde_json::from_slice(&serde_json::to_vec(c).unwrap()).unwrap();
        assert_eq!(&back, c);
    }
    let restored: State = serde_json::from_slice(&serde_json::to_vec(&r1).unwrap()).unwrap();
    assert_eq!(restored, r1);
    assert_eq!(status_of(&restored)["active"], "c");
    assert_eq!(status_of(&restored)["generation"], 2);
}

#[test]
fn failover_group_and_virtual_cluster_specs() {
    let vc = |upstream: Value| {
        let mut v = json!({"edge": "e", "bootstrap": "h:1",
                           "brokers": {"advertised_host": "h", "port_range": "100-110"}});
        for (k, x) in upstream.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let cases: Vec<(Kind, Value, Option<&str>)> = vec![
        (
            Kind::FailoverGroup,
            json!({"primary": "a", "standby": ["b"], "failback": "automatic",
                   "health": {"interval_ms": 500, "failure_threshold": 2, "recovery_threshold": 5},
                   "replication": {"kind": "mirrormaker2", "source_alias": "east",
                                   "checkpoints_topic": "east.checkpoints.internal"}}),
            None,
        ),
        (
            Kind::FailoverGroup,
            json!({"primary": "a", "standby": ["b"], "health": {"recovery_threshold": 0}}),
            Some("spec.health.recovery_threshold"),
        ),
        (
            Kind::FailoverGroup,
            json!({"primary": "a", "standby": ["b", "b"]}),
            Some("spec.standby[1]"),
        ),
        (
            Kind::FailoverGroup,
            json!({"primary": "a", "standby": ["b"], "failback": "sometimes"}),
            Some("spec.failback"),
        ),
        (
            Kind::FailoverGroup,
            json!({"primary": "a", "standby": ["b"],
                   "replication": {"kind": "replicator", "source_alias": "east"}}),
            Some("spec.replication.kind"),
        ),
        (
            Kind::FailoverGroup,
            json!({"primary": "a", "standby": ["b"],
                   "replication": {"kind": "mirrormaker2", "source_alias": "east.1"}}),
            Some("spec.replication.source_alias"),
        ),
        (
            Kind::FailoverGroup,
            json!({"primary": "a", "standby": ["b"],
                   "replication": {"kind": "mirrormaker2", "source_alias": "east",
                                   "checkpoints_topic": "no spaces"}}),
            Some("spec.replication.checkpoints_topic"),
        ),
        (
            Kind::VirtualCluster,
            vc(json!({"failover_group": "orders"})),
            None,
        ),
        (
            Kind::VirtualCluster,
            vc(json!({"failover_group": "orders", "cluster": "east"})),
            Some("spec"),
        ),
        (
            Kind::VirtualCluster,
            vc(json!({"failover_group": "orders",
                      "remote": {"peer": "p", "virtual_cluster": "v"}})),
            Some("spec"),
        ),
        (
            Kind::VirtualCluster,
            vc(json!({"failover_group": "Orders"})),
            Some("spec.failover_group"),
        ),
        (Kind::VirtualCluster, vc(json!({})), Some("spec.cluster")),
    ];
    for (kind, spec, want) in cases {
        let got = kind.validate_spec(&spec);
        match (want, &got) {
            (None, Ok(())) => {}
            (Some(p), Err(errs)) if errs.iter().any(|e| e.path == p) => {}
            _ => panic!("{kind} {spec}: got {got:?}, want error at {want:?}"),
        }
    }
    let spec: crate::spec::FailoverGroupSpec =
        serde_json::from_value(json!({"primary": "a", "standby": ["b"]})).unwrap();
    assert_eq!(spec.health.recovery_threshold, 3);
    assert_eq!(spec.failback, crate::spec::FailbackMode::Manual);
    assert_eq!(spec.replication, None);
}

fn with_fence(mut cmd: Command, action: crate::spec::FenceAction) -> Command {
    if let Command::Failover { fence, planned, .. } = &mut cmd {
        *fence = action;
        *planned = true;
    }
    cmd
}

#[test]
fn a_planned_switch_raises_a_fence_that_the_switch_clears() {
    use crate::spec::FenceAction::{Lift, Raise};
    let mut st = State::new(100);
    st.apply(&group(&["b", "c"])).0.unwrap();
    // Raising keeps the generation and the active cluster; it names the target.
    let fenced = run(
        &mut st,
        &with_fence(failover(Some("c"), Some(0), false), Raise),
    )
    .unwrap();
    assert_eq!((fenced.active.as_str(), fenced.generation), ("a", 0));
    let fence = fenced.fence.expect("fenced");
    assert_eq!(
        (fence.to.as_str(), fence.by.as_str()),
        ("c", "spiffe://d/admin/ops")
    );
    // One fence at a time.
    let again = run(
        &mut st,
        &with_fence(failover(Some("b"), Some(0), false), Raise),
    );
    assert_eq!(again.unwrap_err(), "fence");
    // A planned switch to another member than the fence's target is refused.
    let other = run(
        &mut st,
        &with_fence(failover(Some("b"), Some(0), false), Default::default()),
    );
    assert_eq!(other.unwrap_err(), "to");
    // The switch: a new generation, no fence left.
    let switched = run(
        &mut st,
        &with_fence(failover(Some("c"), Some(0), false), Default::default()),
    )
    .unwrap();
    assert_eq!(
        (
            switched.active.as_str(),
            switched.generation,
            switched.fence
        ),
        ("c", 1, None)
    );
    // Lifting needs a fence; a raise-then-lift leaves the decision as it was.
    assert_eq!(
        run(&mut st, &with_fence(failover(None, Some(1), true), Lift)).unwrap_err(),
        "fence"
    );
    run(&mut st, &with_fence(failover(None, Some(1), true), Raise)).unwrap();
    let lifted = run(&mut st, &with_fence(failover(None, Some(1), true), Lift)).unwrap();
    assert_eq!(
        (lifted.active.as_str(), lifted.generation, lifted.fence),
        ("c", 1, None)
    );
    // Compare-and-set applies to fences too.
    let stale = st
        .apply(&with_fence(failover(None, Some(0), true), Raise))
        .0;
    assert!(
        matches!(
            stale,
            Err(CommandError::GenerationConflict {
                expected: 0,
                actual: 1,
                ..
            })
        ),
        "{stale:?}"
    );
}
