//! Protects the edge configuration parser and its validation (edge/config
//! `lib.rs`, `raw.rs`, `validate.rs` and the mesh, SASL and probe blocks):
//! a file or a control-plane push is YAML of any shape, and must become a
//! config or a non-empty list of errors with paths, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = strait_edge_config::parse_raw(text) else {
        return;
    };
    if let Err(errors) = strait_edge_config::validate(&raw) {
        assert!(!errors.0.is_empty(), "a refused config names its errors");
    }
    // What the control-plane source validates with: no virtual cluster yet is fine.
    let _ = strait_edge_config::validate_with(&raw, true);
});
