//! Protects the control plane's spec validation and state machine
//! (control/state `lib.rs`, `spec.rs`, `mesh_spec.rs`, `failover*.rs`): every
//! spec an admin applies is JSON of any shape, checked by `validate_command`
//! before it is proposed and again by `apply` on every replica, which must
//! refuse or apply it, never panic (a panic there would stop every replica).
//! The state after a run must survive the snapshot round trip unchanged.
//!
//! Input: JSON lines, each a `Command` as Raft stores it, or a manifest
//! (`{"kind", "name", "labels", "spec"}`) as `straitctl apply` sends it.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use strait_control_state::{validate_command, Command, Kind, State};

fn command(line: &str) -> Option<Command> {
    if let Ok(command) = serde_json::from_str::<Command>(line) {
        return Some(command);
    }
    let manifest: Value = serde_json::from_str(line).ok()?;
    let kind = Kind::parse(manifest.get("kind")?.as_str()?).ok()?;
    let labels: BTreeMap<String, String> = manifest
        .get("labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    Some(Command::Apply {
        kind,
        name: manifest.get("name")?.as_str()?.to_owned(),
        labels,
        spec: manifest.get("spec").cloned().unwrap_or(Value::Null),
        expected_revision: None,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut state = State::new(4);
    for line in text.lines() {
        let Some(command) = command(line) else {
            continue;
        };
        let checked = validate_command(&command);
        let (applied, _events) = state.apply(&command);
        if checked.is_err() {
            assert!(applied.is_err(), "apply took what validation refused");
        }
    }
    let snapshot = serde_json::to_vec(&state).expect("a state serializes");
    let restored: State = serde_json::from_slice(&snapshot).expect("a snapshot restores");
    assert_eq!(restored, state, "the snapshot round trip changed the state");
});
