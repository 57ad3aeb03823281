//! Protects the cipher-record parsers of record encryption (edge/encryption
//! `format.rs`): the encrypted value (`version | KEK ref | wrapped DEK |
//! realms | nonce | ciphertext`) is read from whatever a topic holds, so a
//! forged or truncated value must be an error. What the encoder writes must
//! parse back to what it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_encryption::format::{
    dek_ref, encode_prefix_for, parse, parse_locator, parse_realms, KekLocator,
};
use strait_kms_core::KekRef;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = parse(data) {
        assert!(parsed.prefix.len() + parsed.nonce.len() + parsed.sealed.len() == data.len());
        let _ = parse_locator(parsed.prefix);
        let _ = parse_realms(parsed.prefix);
        let _ = dek_ref(parsed.prefix);
    }
    let _ = parse_locator(data);
    let _ = parse_realms(data);

    // Encoder round trip, its fields cut from the input.
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{0}');
    let (Some(kms), Some(key_id), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let realms: Vec<String> = parts.map(str::to_owned).collect();
    let locator = KekLocator {
        kms: kms.to_owned(),
        kek: KekRef {
            key_id: key_id.to_owned(),
            version: (!version.is_empty()).then(|| version.to_owned()),
        },
    };
    let wrapped = data.get(..data.len().min(64)).unwrap_or_default();
    let Ok(prefix) = encode_prefix_for(&locator, wrapped, &realms) else {
        return;
    };
    assert_eq!(parse_locator(&prefix).expect("an encoded prefix"), locator);
    assert_eq!(parse_realms(&prefix).expect("an encoded prefix"), realms);
    let mut value = prefix.to_vec();
    value.extend_from_slice(&[0u8; 12 + 16]);
    let parsed = parse(&value).expect("an encoded prefix with nonce and tag");
    assert_eq!(parsed.prefix, &prefix[..]);
    assert_eq!(parsed.wrapped, wrapped);
});
