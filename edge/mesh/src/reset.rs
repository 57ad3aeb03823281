//! Stateless-reset keys that survive a restart.
//!
//! A QUIC endpoint that receives a packet for a connection it does not know
//! answers with a stateless reset, which the peer accepts only if its token
//! matches the one issued for that connection: an HMAC of the connection ID
//! under the endpoint's reset key. quinn draws that key at random, so an
//! edge that was killed and restarted cannot reset its peers' old
//! connections, and they wait out the idle timeout. Derived from a secret
//! that outlives the process (the identity's key file, or a seed kept in
//! the edge's cache directory when its identity is an in-memory SVID), the
//! restarted edge resets them at once and they redial.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use ring::{hkdf, hmac};

const LABEL: &[u8] = b"strait-mesh stateless reset v1";

/// The endpoint configuration: a reset key from `seed`, or quinn's random
/// one without.
/// The connection IDs too must be recognisable across the restart: quinn
/// answers only packets whose ID its generator validates (a keyed hash in
/// the ID), so the generator's key comes from the seed as well.
pub(crate) fn endpoint_config(seed: Option<&[u8]>) -> quinn::EndpointConfig {
    let Some(seed) = seed else {
        return quinn::EndpointConfig::default();
    };
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key(seed)));
    let cid_key = cid_key(seed);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

fn prk(seed: &[u8]) -> hkdf::Prk {
    // HKDF with its own label: the keys say nothing about the seed, and the
    // seed (a TLS private key, say) is used for nothing else through them.
    hkdf::Salt::new(hkdf::HKDF_SHA256, LABEL).extract(seed)
}

fn reset_key(seed: &[u8]) -> hmac::Key {
    prk(seed)
        .expand(&[b"reset key"], hmac::HMAC_SHA256)
        .expect("one HMAC-SHA256 key is a valid HKDF output length")
        .into()
}

struct Eight;

impl hkdf::KeyType for Eight {
    fn len(&self) -> usize {
        8
    }
}

fn cid_key(seed: &[u8]) -> u64 {
    let mut key = [0u8; 8];
    prk(seed)
        .expand(&[b"connection id key"], Eight)
        .and_then(|okm| okm.fill(&mut key))
        .expect("8 bytes are a valid HKDF output length");
    u64::from_le_bytes(key)
}

/// The seed kept in `dir` (32 random bytes, owner-only), created on first
/// use.
pub fn seed_in(dir: &Path) -> std::io::Result<Vec<u8>> {
    let path = dir.join("mesh-reset-seed");
    match std::fs::read(&path) {
        Ok(seed) if seed.len() == 32 => return Ok(seed),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a 32-byte seed", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    let seed: [u8; 32] = rand::random();
    let tmp = dir.join(".mesh-reset-seed.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(&tmp)?.write_all(&seed)?;
    std::fs::rename(&tmp, &path)?;
    Ok(seed.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_one_key_and_the_seed_file_is_kept() {
        let tag = |seed: &[u8]| {
            hmac::sign(&reset_key(seed), b"connection id")
                .as_ref()
                .to_vec()
        };
        assert_eq!(tag(b"seed-a"), tag(b"seed-a"));
        assert_ne!(tag(b"seed-a"), tag(b"seed-b"));
        let dir = std::env::temp_dir().join(format!("strait-reset-{}", std::process::id()));
        let first = seed_in(&dir).unwrap();
        assert_eq!(seed_in(&dir).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("mesh-reset-seed"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
