//! Cipher record format v3 (federated DEKs) and v2, and v1 for reading (see
//! FORMAT.md).
//!
//! value = prefix | nonce (12) | ciphertext + tag (16), where
//! prefix = version (1) | u16 kek_ref_len | kek_ref | u16 wrapped_len | wrapped_dek
//!          [v3: u8 realm_count | realm_count x (u8 len | realm name)]
//! kek_ref = u8 kms_len | kms | u16 key_id_len | key_id | u8 version_len | version
//! v2: key = HKDF-SHA256(DEK, info = prefix); AAD none for a record value,
//!     0x01 | header key for a header value.
//! v1: key = DEK; AAD = version | purpose | SHA-256(prefix), purpose = 0x00
//!     for a record value; 0x01 followed by the header key for a header value.

use bytes::{BufMut, Bytes, BytesMut};
use strait_kms_core::KekRef;

/// Written until 2026-11-30: the prefix is bound through a 34-byte AAD.
pub const FORMAT_V1: u8 = 1;
/// Written now: the prefix is bound through the derived key; no AAD.
pub const FORMAT_V2: u8 = 2;
/// Written for federated DEKs: v2 plus the names of the other realms the
/// DEK is wrapped for (their wraps live in the keys topic, not the record).
pub const FORMAT_V3: u8 = 3;
/// The version this edge writes for a DEK of one realm. Every version up to
/// [`FORMAT_V3`] is read.
pub const FORMAT_CURRENT: u8 = FORMAT_V2;
/// Length of a DEK reference (see [`dek_ref`]).
pub const DEK_REF_LEN: usize = 16;

/// Whether this edge reads values of format version `v`.
pub fn is_known_version(v: u8) -> bool {
    matches!(v, FORMAT_V1 | FORMAT_V2 | FORMAT_V3)
}
/// Header marking an encrypted record. Value: `[version, flags]`.
pub const MARKER_HEADER: &str = "strait.enc";
pub const FLAG_VALUE: u8 = 0x01;
pub const FLAG_HEADERS: u8 = 0x02;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const PURPOSE_VALUE: u8 = 0x00;
pub const PURPOSE_HEADER: u8 = 0x01;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("malformed encrypted value: {0}")]
pub struct FormatError(pub &'static str);

/// The KEK a DEK was wrapped under, including which configured KMS holds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KekLocator {
    pub kms: String,
    pub kek: KekRef,
}

/// Build the per-DEK prefix shared by every value encrypted under one DEK.
pub fn encode_prefix(loc: &KekLocator, wrapped: &[u8]) -> Result<Bytes, FormatError> {
    encode_prefix_for(loc, wrapped, &[])
}

/// The prefix of a DEK also wrapped for `other_realms` (format v3; v2 when
/// there are none).
pub fn encode_prefix_for(
    loc: &KekLocator,
    wrapped: &[u8],
    other_realms: &[String],
) -> Result<Bytes, FormatError> {
    if other_realms.len() > u8::MAX as usize
        || other_realms.iter().any(|r| r.len() > u8::MAX as usize)
    {
        return Err(FormatError("too many or too long realm names"));
    }
    let version = loc.kek.version.as_deref().unwrap_or("");
    if loc.kms.len() > u8::MAX as usize
        || version.len() > u8::MAX as usize
        || loc.kek.key_id.len() > u16::MAX as usize
        || wrapped.len() > u16::MAX as usize
    {
        return Err(FormatError("KEK reference or wrapped DEK too long"));
    }
    let kek_len = 1 + loc.kms.len() + 2 + loc.kek.key_id.len() + 1 + version.len();
    if kek_len > u16::MAX as usize {
        return Err(FormatError("KEK reference too long"));
    }
    let mut b = BytesMut::with_capacity(1 + 2 + kek_len + 2 + wrapped.len());
    b.put_u8(if other_realms.is_empty() {
        FORMAT_CURRENT
    } else {
        FORMAT_V3
    });
    b.put_u16(kek_len as u16);
    b.put_u8(loc.kms.len() as u8);
    b.put_slice(loc.kms.as_bytes());
    b.put_u16(loc.kek.key_id.len() as u16);
    b.put_slice(loc.kek.key_id.as_bytes());
    b.put_u8(version.len() as u8);
    b.put_slice(version.as_bytes());
    b.put_u16(wrapped.len() as u16);
    b.put_slice(wrapped);
    if !other_realms.is_empty() {
        b.put_u8(other_realms.len() as u8);
        for r in other_realms {
            b.put_u8(r.len() as u8);
            b.put_slice(r.as_bytes());
        }
    }
    Ok(b.freeze())
}

/// The reference of the DEK a prefix belongs to: the first 16 bytes of
/// SHA-256(prefix). Derived rather than carried, so it costs no record
/// bytes and exists for records of every version (a realm added later can
/// still be given wraps of DEKs written before it joined).
pub fn dek_ref(prefix: &[u8]) -> [u8; DEK_REF_LEN] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(prefix);
    let mut out = [0u8; DEK_REF_LEN];
    out.copy_from_slice(&digest[..DEK_REF_LEN]);
    out
}

/// The other realms a v3 prefix names (none for v1/v2).
pub fn parse_realms(prefix: &[u8]) -> Result<Vec<String>, FormatError> {
    if prefix.first() != Some(&FORMAT_V3) {
        return Ok(Vec::new());
    }
    let mut b = &prefix[1..];
    let kl = take(&mut b, 2)?;
    take(&mut b, u16::from_be_bytes([kl[0], kl[1]]) as usize)?;
    let wl = take(&mut b, 2)?;
    take(&mut b, u16::from_be_bytes([wl[0], wl[1]]) as usize)?;
    let n = take(&mut b, 1)?[0] as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let l = take(&mut b, 1)?[0] as usize;
        let name = std::str::from_utf8(take(&mut b, l)?)
            .map_err(|_| FormatError("realm name not UTF-8"))?;
        out.push(name.to_string());
    }
    Ok(out)
}

/// A parsed encrypted value, borrowing from the record.
pub struct Parsed<'a> {
    /// version .. end of wrapped DEK: the DEK cache key and the AAD prefix.
    pub prefix: &'a [u8],
    pub wrapped: &'a [u8],
    pub nonce: &'a [u8],
    /// ciphertext followed by the tag.
    pub sealed: &'a [u8],
}

#[inline]
fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], FormatError> {
    if b.len() < n {
        return Err(FormatError("truncated"));
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

#[inline]
pub fn parse(value: &[u8]) -> Result<Parsed<'_>, FormatError> {
    let mut b = value;
    let v = take(&mut b, 1)?[0];
    if !is_known_version(v) {
        return Err(FormatError("unsupported format version"));
    }
    let kl = take(&mut b, 2)?;
    let kl = u16::from_be_bytes([kl[0], kl[1]]) as usize;
    take(&mut b, kl)?;
    let wl = take(&mut b, 2)?;
    let wl = u16::from_be_bytes([wl[0], wl[1]]) as usize;
    let wrapped = take(&mut b, wl)?;
    if v == FORMAT_V3 {
        let n = take(&mut b, 1)?[0];
        if n == 0 {
            return Err(FormatError("v3 value names no other realm"));
        }
        for _ in 0..n {
            let l = take(&mut b, 1)?[0] as usize;
            take(&mut b, l)?;
        }
    }
    let prefix_len = value.len() - b.len();
    let nonce = take(&mut b, NONCE_LEN)?;
    if b.len() < TAG_LEN {
        return Err(FormatError("ciphertext shorter than the tag"));
    }
    Ok(Parsed {
        prefix: &value[..prefix_len],
        wrapped,
        nonce,
        sealed: b,
    })
}

/// Decode the KEK locator of a prefix.
pub fn parse_locator(prefix: &[u8]) -> Result<KekLocator, FormatError> {
    let mut b = prefix;
    take(&mut b, 3)?;
    let n = take(&mut b, 1)?[0] as usize;
    let kms =
        std::str::from_utf8(take(&mut b, n)?).map_err(|_| FormatError("KMS name not UTF-8"))?;
    let n = take(&mut b, 2)?;
    let n = u16::from_be_bytes([n[0], n[1]]) as usize;
    let key_id =
        std::str::from_utf8(take(&mut b, n)?).map_err(|_| FormatError("key id not UTF-8"))?;
    let n = take(&mut b, 1)?[0] as usize;
    let version =
        std::str::from_utf8(take(&mut b, n)?).map_err(|_| FormatError("key version not UTF-8"))?;
    Ok(KekLocator {
        kms: kms.to_string(),
        kek: KekRef {
            key_id: key_id.to_string(),
            version: (!version.is_empty()).then(|| version.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trip() {
        let loc = KekLocator {
            kms: "vault".into(),
            kek: KekRef::with_version("kek-a", "3"),
        };
        let p = encode_prefix(&loc, b"wrapped!").unwrap();
        let mut v = p.to_vec();
        v.extend_from_slice(&[9u8; NONCE_LEN]);
        v.extend_from_slice(&[7u8; TAG_LEN + 5]);
        let parsed = parse(&v).unwrap();
        assert_eq!(parsed.prefix, &p[..]);
        assert_eq!(parsed.wrapped, b"wrapped!");
        assert_eq!(parsed.nonce, &[9u8; NONCE_LEN]);
        assert_eq!(parsed.sealed.len(), TAG_LEN + 5);
        assert_eq!(parse_locator(parsed.prefix).unwrap(), loc);
        assert!(parse(&v[..p.len() + 3]).is_err());
        assert_eq!(parsed.prefix[0], FORMAT_CURRENT);
        let mut older = v.clone();
        older[0] = FORMAT_V1;
        assert_eq!(parse(&older).unwrap().prefix[0], FORMAT_V1);
        let mut unknown = v.clone();
        unknown[0] = 4;
        assert!(parse(&unknown).is_err());
        // A v2 value relabelled v3 lacks the realm list where its nonce is.
        let mut relabelled = v.clone();
        relabelled[0] = FORMAT_V3;
        let as_v3 = parse(&relabelled).map(|p| p.prefix.len());
        assert_ne!(as_v3, Ok(p.len()));
    }

    #[test]
    fn v3_prefix_names_its_other_realms() {
        let loc = KekLocator {
            kms: "vault-east".into(),
            kek: KekRef::with_version("kek-orders", "1"),
        };
        let realms = vec!["aws-west".to_string(), "gcp-north".to_string()];
        let p = encode_prefix_for(&loc, b"vault:v1:abc", &realms).unwrap();
        assert_eq!(p[0], FORMAT_V3);
        assert_eq!(parse_realms(&p).unwrap(), realms);
        assert_eq!(parse_locator(&p).unwrap(), loc);
        let mut v = p.to_vec();
        v.extend_from_slice(&[1u8; NONCE_LEN]);
        v.extend_from_slice(&[2u8; TAG_LEN]);
        let parsed = parse(&v).unwrap();
        assert_eq!(parsed.prefix, &p[..]);
        assert_eq!(parsed.wrapped, b"vault:v1:abc");
        // Exactly the realm bytes more than the v2 prefix of the same DEK.
        let v2 = encode_prefix(&loc, b"vault:v1:abc").unwrap();
        assert_eq!(p.len() - v2.len(), 1 + 1 + 8 + 1 + 9);
        assert_ne!(dek_ref(&p), dek_ref(&v2));
        assert_eq!(encode_prefix_for(&loc, b"vault:v1:abc", &[]).unwrap(), v2);
    }
}
