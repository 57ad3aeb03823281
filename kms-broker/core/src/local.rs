//! DEVELOPMENT ONLY: a KEK keyring kept in a plain JSON file.
//!
//! The KEKs sit unprotected on disk, so anyone who can read the file can
//! decrypt every record. Use it for laptops, unit tests and demos; use Vault
//! or AWS KMS (directly or through the broker) for anything else.
//!
//! File format:
//! ```json
//! { "keys": { "kek-orders": ["<base64 32-byte key v1>", "<base64 v2>"] } }
//! ```
//! The last entry of a key's list is its current version (versions count from
//! 1). Wrapped DEK = `u32 BE version | 12-byte nonce | AES-256-GCM(dek) + tag`,
//! with the key name as AAD.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{dek_from_slice, DekPair, KekRef, Kms, KmsError, Result, WrappedDek, DEK_LEN};

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    keys: BTreeMap<String, Vec<String>>,
}

/// The development-only keyring. See the module docs.
pub struct LocalKeyring {
    path: Option<PathBuf>,
    keys: RwLock<BTreeMap<String, Vec<Zeroizing<[u8; DEK_LEN]>>>>,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl LocalKeyring {
    /// Load a keyring file. Logs a warning: this provider is not for production.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| KmsError::Invalid(format!("reading keyring {}: {e}", path.display())))?;
        let file: KeyringFile = serde_json::from_str(&text)
            .map_err(|e| KmsError::Invalid(format!("parsing keyring {}: {e}", path.display())))?;
        let mut keys = BTreeMap::new();
        for (name, versions) in file.keys {
            if versions.is_empty() {
                return Err(KmsError::Invalid(format!("key {name} has no versions")));
            }
            let mut decoded = Vec::with_capacity(versions.len());
            for v in versions {
                let raw = Zeroizing::new(
                    B64.decode(v.as_bytes())
                        .map_err(|e| KmsError::Invalid(format!("key {name}: {e}")))?,
                );
                decoded.push(dek_from_slice(&raw)?);
            }
            keys.insert(name, decoded);
        }
        tracing::warn!(
            path = %path.display(),
            "local KMS keyring in use: KEKs are stored in plain text; development only, never production"
        );
        Ok(Self {
            path: Some(path.to_path_buf()),
            keys: RwLock::new(keys),
        })
    }

    /// An empty in-memory keyring (tests).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            keys: RwLock::new(BTreeMap::new()),
        }
    }

    /// Create a keyring file holding one random key per name.
    pub fn create_file(path: impl AsRef<Path>, names: &[&str]) -> Result<Self> {
        let ring = Self {
            path: Some(path.as_ref().to_path_buf()),
            keys: RwLock::new(BTreeMap::new()),
        };
        for name in names {
            ring.rotate_key(name)?;
        }
        Ok(ring)
    }

    /// Add a new version of `name` (creating the key if needed) and persist
    /// the file. Returns the new version number.
    pub fn rotate_key(&self, name: &str) -> Result<u32> {
        let mut key = Zeroizing::new([0u8; DEK_LEN]);
        rand::rng().fill_bytes(&mut key[..]);
        let version = {
            let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
            let list = keys.entry(name.to_string()).or_default();
            list.push(key);
            list.len() as u32
        };
        self.persist()?;
        Ok(version)
    }

    /// Remove a key entirely (tests of unknown-KEK handling).
    pub fn delete_key(&self, name: &str) -> Result<()> {
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.persist()
    }

    fn persist(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            KeyringFile {
                keys: keys
                    .iter()
                    .map(|(n, vs)| (n.clone(), vs.iter().map(|k| B64.encode(&k[..])).collect()))
                    .collect(),
            }
        };
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| KmsError::Invalid(format!("serialising keyring: {e}")))?;
        // Written beside and renamed over the file: a crash mid-write (say,
        // during a shred) leaves the old or the new keyring, never a torn
        // one that loses every other key. The old file's mode is kept.
        let failed = |e: std::io::Error| {
            KmsError::Invalid(format!("writing keyring {}: {e}", path.display()))
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, text).map_err(failed)?;
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions()).map_err(failed)?;
        }
        std::fs::rename(&tmp, path).map_err(failed)
    }

    /// `u32 BE version | nonce | AES-256-GCM(dek)` under `name` (its
    /// `version`, else the current one), the key name as AAD.
    fn seal(
        &self,
        name: &str,
        version: Option<u32>,
        dek: &[u8; DEK_LEN],
    ) -> Result<(Vec<u8>, u32)> {
        let (version, cipher) = self.key(name, version)?;
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &dek[..],
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| KmsError::Invalid("local wrap failed".into()))?;
        let mut wrapped = Vec::with_capacity(4 + 12 + ct.len());
        wrapped.extend_from_slice(&version.to_be_bytes());
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(&ct);
        Ok((wrapped, version))
    }

    fn key(&self, name: &str, version: Option<u32>) -> Result<(u32, Aes256Gcm)> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let list = keys
            .get(name)
            .ok_or_else(|| KmsError::NotFound(name.to_string()))?;
        let version = version.unwrap_or(list.len() as u32);
        let idx = version
            .checked_sub(1)
            .map(|v| v as usize)
            .filter(|&v| v < list.len())
            .ok_or_else(|| KmsError::NotFound(format!("{name} version {version}")))?;
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&list[idx][..]));
        Ok((version, cipher))
    }
}

#[async_trait]
impl Kms for LocalKeyring {
    async fn generate_dek(&self, kek: &KekRef) -> Result<DekPair> {
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        rand::rng().fill_bytes(&mut dek[..]);
        let (wrapped, version) = self.seal(&kek.key_id, None, &dek)?;
        Ok(DekPair {
            plaintext: dek,
            wrapped,
            kek: KekRef::with_version(kek.key_id.clone(), version.to_string()),
        })
    }

    async fn unwrap_dek(&self, kek: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
        if wrapped.len() != 4 + 12 + DEK_LEN + 16 {
            return Err(KmsError::Invalid("wrapped DEK has the wrong length".into()));
        }
        let version = u32::from_be_bytes([wrapped[0], wrapped[1], wrapped[2], wrapped[3]]);
        let (_, cipher) = self.key(&kek.key_id, Some(version))?;
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    Nonce::from_slice(&wrapped[4..16]),
                    Payload {
                        msg: &wrapped[16..],
                        aad: kek.key_id.as_bytes(),
                    },
                )
                .map_err(|_| KmsError::Invalid("wrapped DEK failed authentication".into()))?,
        );
        dek_from_slice(&plain)
    }

    async fn resolve_alias(&self, alias: &str) -> Result<KekRef> {
        self.key(alias, None)?;
        Ok(KekRef::new(alias))
    }

    async fn wrap_dek(&self, kek: &KekRef, plaintext: &[u8; DEK_LEN]) -> Result<WrappedDek> {
        let version = kek
            .version
            .as_deref()
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| KmsError::Invalid(format!("local key version {v:?}")))
            })
            .transpose()?;
        let (wrapped, version) = self.seal(&kek.key_id, version, plaintext)?;
        Ok(WrappedDek {
            wrapped,
            kek: KekRef::with_version(kek.key_id.clone(), version.to_string()),
        })
    }

    /// Removes every version of the key and rewrites the file, so neither
    /// this process nor a later one can unwrap under it again.
    async fn shred_kek(&self, kek: &KekRef) -> Result<()> {
        let removed = self
            .keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&kek.key_id);
        if removed.is_none() {
            return Err(KmsError::NotFound(kek.key_id.clone()));
        }
        self.persist()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_rotation_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let ring = LocalKeyring::create_file(&path, &["a"]).unwrap();
        let kek = ring.resolve_alias("a").await.unwrap();
        let d1 = ring.generate_dek(&kek).await.unwrap();
        assert_eq!(d1.kek.version.as_deref(), Some("1"));
        assert_eq!(ring.rotate_key("a").unwrap(), 2);
        let d2 = ring.generate_dek(&kek).await.unwrap();
        assert_eq!(d2.kek.version.as_deref(), Some("2"));
        let reopened = LocalKeyring::open(&path).unwrap();
        assert_eq!(
            *reopened.unwrap_dek(&d1.kek, &d1.wrapped).await.unwrap(),
            *d1.plaintext
        );
        assert_eq!(
            *reopened.unwrap_dek(&d2.kek, &d2.wrapped).await.unwrap(),
            *d2.plaintext
        );
        assert!(matches!(
            ring.resolve_alias("nope").await,
            Err(KmsError::NotFound(_))
        ));
        let mut bad = d1.wrapped.clone();
        bad[20] ^= 1;
        assert!(matches!(
            ring.unwrap_dek(&d1.kek, &bad).await,
            Err(KmsError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn wrap_under_another_kek_then_shred_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let ring = LocalKeyring::create_file(&path, &["a", "b"]).unwrap();
        ring.rotate_key("b").unwrap();
        let d = ring.generate_dek(&KekRef::new("a")).await.unwrap();
        let w = ring
            .wrap_dek(&KekRef::new("b"), &d.plaintext)
            .await
            .unwrap();
        assert_eq!(w.kek, KekRef::with_version("b", "2"));
        let old = ring
            .wrap_dek(&KekRef::with_version("b", "1"), &d.plaintext)
            .await
            .unwrap();
        assert_eq!(old.kek, KekRef::with_version("b", "1"));
        for (kek, wrapped) in [
            (&d.kek, &d.wrapped),
            (&w.kek, &w.wrapped),
            (&old.kek, &old.wrapped),
        ] {
            assert_eq!(*ring.unwrap_dek(kek, wrapped).await.unwrap(), *d.plaintext);
        }
        // The AAD binds a wrap to its key name: b's wrap is not a's.
        assert!(ring
            .unwrap_dek(&KekRef::new("a"), &w.wrapped)
            .await
            .is_err());
        assert!(matches!(
            ring.wrap_dek(&KekRef::new("nope"), &d.plaintext).await,
            Err(KmsError::NotFound(_))
        ));

        ring.shred_kek(&KekRef::new("b")).await.unwrap();
        assert!(matches!(
            ring.unwrap_dek(&w.kek, &w.wrapped).await,
            Err(KmsError::NotFound(_))
        ));
        // Gone from the file too; a's DEKs are untouched.
        let reopened = LocalKeyring::open(&path).unwrap();
        assert!(matches!(
            reopened.unwrap_dek(&w.kek, &w.wrapped).await,
            Err(KmsError::NotFound(_))
        ));
        assert_eq!(
            *reopened.unwrap_dek(&d.kek, &d.wrapped).await.unwrap(),
            *d.plaintext
        );
        assert!(matches!(
            ring.shred_kek(&KekRef::new("b")).await,
            Err(KmsError::NotFound(_))
        ));
    }
}
