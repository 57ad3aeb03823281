//! Sealing of CA private keys: what enters the Raft log and its snapshots
//! is only ever an AES-256-GCM ciphertext whose AAD binds the trust domain
//! and the CA generation (a sealed key copied to another domain or
//! generation does not open).
//!
//! Two sealers:
//! - [`FileSealer`]: a local 32-byte key file (development; every node needs
//!   the same file).
//! - [`KmsSealer`]: envelope encryption through the KMS seam
//!   ([`strait_kms_core::Kms`], the trait the edge's record encryption and
//!   the kms-broker already use): a fresh DEK per seal, generated and
//!   wrapped by the KMS under a named KEK; the wrapped DEK travels with the
//!   ciphertext and only the KMS can unwrap it. Vault, AWS KMS, the broker
//!   and the local keyring all work unchanged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use strait_kms_core::{KekRef, Kms};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("seal key file {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    #[error("KMS: {0}")]
    Kms(#[from] strait_kms_core::KmsError),
    #[error("sealed key is malformed: {0}")]
    Malformed(String),
    #[error("sealed by '{sealed_by}', but this node's sealer is '{ours}'")]
    WrongSealer { sealed_by: String, ours: String },
    #[error("the sealed key does not open (wrong seal key, or sealed for another trust domain or generation)")]
    Open,
}

/// What the seal is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealContext {
    pub trust_domain: String,
    pub generation: u64,
}

impl SealContext {
    fn aad(&self) -> Vec<u8> {
        format!("strait-ca-key/v1|{}|{}", self.trust_domain, self.generation).into_bytes()
    }
}

/// The stored form (JSON, then base64 in the CertificateAuthority spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    v: u8,
    /// [`Sealer::name`] of the sealer that made it.
    sealer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kek: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kek_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wrapped_dek: Option<String>,
    nonce: String,
    ciphertext: String,
}

impl Envelope {
    fn encode(&self) -> String {
        B64.encode(serde_json::to_vec(self).expect("envelope serializes"))
    }

    fn decode(s: &str) -> Result<Envelope, SealError> {
        let raw = B64
            .decode(s.trim())
            .map_err(|e| SealError::Malformed(format!("not base64: {e}")))?;
        let env: Envelope =
            serde_json::from_slice(&raw).map_err(|e| SealError::Malformed(e.to_string()))?;
        if env.v != 1 {
            return Err(SealError::Malformed(format!("unknown version {}", env.v)));
        }
        Ok(env)
    }

    fn b64(field: &str, s: &str) -> Result<Vec<u8>, SealError> {
        B64.decode(s)
            .map_err(|e| SealError::Malformed(format!("{field}: {e}")))
    }
}

fn encrypt(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> (Vec<u8>, [u8; 12]) {
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key));
    let nonce: [u8; 12] = rand::random();
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of a small buffer cannot fail");
    (ct, nonce)
}

fn decrypt(key: &[u8; 32], env: &Envelope, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let nonce = Envelope::b64("nonce", &env.nonce)?;
    if nonce.len() != 12 {
        return Err(SealError::Malformed("nonce must be 12 bytes".into()));
    }
    let ct = Envelope::b64("ciphertext", &env.ciphertext)?;
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key));
    cipher
        .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| SealError::Open)
}

/// Seals and unseals CA keys. Async because a KMS is a network service.
#[async_trait]
pub trait Sealer: Send + Sync {
    /// Stable description stored beside the sealed key (`file`,
    /// `kms:<kek>`), so a node configured differently says so clearly.
    fn name(&self) -> String;
    async fn seal(&self, key: &[u8], ctx: &SealContext) -> Result<String, SealError>;
    async fn unseal(
        &self,
        sealed: &str,
        ctx: &SealContext,
    ) -> Result<Zeroizing<Vec<u8>>, SealError>;
}

fn check_sealer(env: &Envelope, ours: String) -> Result<(), SealError> {
    if env.sealer != ours {
        return Err(SealError::WrongSealer {
            sealed_by: env.sealer.clone(),
            ours,
        });
    }
    Ok(())
}

/// DEVELOPMENT: a 32-byte key in a local file (mode 0600).
pub struct FileSealer {
    key: Zeroizing<[u8; 32]>,
}

impl FileSealer {
    /// Reads the key file; `create`: make a new random one (mode 0600) when
    /// it does not exist. A file of another length is an error.
    pub fn open(path: &Path, create: bool) -> Result<FileSealer, SealError> {
        let err = |message: String| SealError::KeyFile {
            path: path.to_path_buf(),
            message,
        };
        if create && !path.exists() {
            let key: Zeroizing<[u8; 32]> = Zeroizing::new(rand::random());
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
            f.write_all(&key[..])
                .and_then(|_| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            return Ok(FileSealer { key });
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
        if bytes.len() != 32 {
            return Err(err(format!(
                "must hold exactly 32 bytes, found {}",
                bytes.len()
            )));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&bytes);
        Ok(FileSealer { key })
    }

    pub fn from_key(key: [u8; 32]) -> FileSealer {
        FileSealer {
            key: Zeroizing::new(key),
        }
    }
}

#[async_trait]
impl Sealer for FileSealer {
    fn name(&self) -> String {
        "file".into()
    }

    async fn seal(&self, key: &[u8], ctx: &SealContext) -> Result<String, SealError> {
        let (ct, nonce) = encrypt(&self.key, key, &ctx.aad());
        Ok(Envelope {
            v: 1,
            sealer: self.name(),
            kek: None,
            kek_version: None,
            wrapped_dek: None,
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ct),
        }
        .encode())
    }

    async fn unseal(
        &self,
        sealed: &str,
        ctx: &SealContext,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let env = Envelope::decode(sealed)?;
        check_sealer(&env, self.name())?;
        decrypt(&self.key, &env, &ctx.aad())
    }
}

/// Envelope encryption under a KEK of a configured KMS.
pub struct KmsSealer {
    kms: Arc<dyn Kms>,
    kek: String,
}

impl KmsSealer {
    pub fn new(kms: Arc<dyn Kms>, kek: impl Into<String>) -> KmsSealer {
        KmsSealer {
            kms,
            kek: kek.into(),
        }
    }
}

#[async_trait]
impl Sealer for KmsSealer {
    fn name(&self) -> String {
        format!("kms:{}", self.kek)
    }

    async fn seal(&self, key: &[u8], ctx: &SealContext) -> Result<String, SealError> {
        let dek = self
            .kms
            .generate_dek(&KekRef::new(self.kek.clone()))
            .await?;
        let (ct, nonce) = encrypt(&dek.plaintext, key, &ctx.aad());
        Ok(Envelope {
            v: 1,
            sealer: self.name(),
            kek: Some(dek.kek.key_id.clone()),
            kek_version: dek.kek.version.clone(),
            wrapped_dek: Some(B64.encode(&dek.wrapped)),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ct),
        }
        .encode())
    }

    async fn unseal(
        &self,
        sealed: &str,
        ctx: &SealContext,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let env = Envelope::decode(sealed)?;
        check_sealer(&env, self.name())?;
        let kek = KekRef {
            key_id: env
                .kek
                .clone()
                .ok_or_else(|| SealError::Malformed("kek missing".into()))?,
            version: env.kek_version.clone(),
        };
        let wrapped = Envelope::b64(
            "wrapped_dek",
            env.wrapped_dek
                .as_deref()
                .ok_or_else(|| SealError::Malformed("wrapped_dek missing".into()))?,
        )?;
        let dek = self.kms.unwrap_dek(&kek, &wrapped).await?;
        decrypt(&dek, &env, &ctx.aad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_kms_core::local::LocalKeyring;

    fn ctx(td: &str, generation: u64) -> SealContext {
        SealContext {
            trust_domain: td.into(),
            generation,
        }
    }

    #[tokio::test]
    async fn file_sealer_round_trip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seal.key");
        let s = FileSealer::open(&path, true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let sealed = s.seal(b"secret key", &ctx("example.org", 1)).await.unwrap();
        assert!(!sealed.contains("secret"));
        let raw = String::from_utf8(B64.decode(&sealed).unwrap()).unwrap();
        assert!(!raw.contains("secret"), "{raw}");
        // The same file opened again (another node) unseals it.
        let s2 = FileSealer::open(&path, false).unwrap();
        let open = s2.unseal(&sealed, &ctx("example.org", 1)).await.unwrap();
        assert_eq!(&open[..], b"secret key");
        // Bound to trust domain and generation.
        assert!(matches!(
            s2.unseal(&sealed, &ctx("other.org", 1)).await,
            Err(SealError::Open)
        ));
        assert!(matches!(
            s2.unseal(&sealed, &ctx("example.org", 2)).await,
            Err(SealError::Open)
        ));
        // Another key does not open it.
        let other = FileSealer::from_key([7; 32]);
        assert!(matches!(
            other.unseal(&sealed, &ctx("example.org", 1)).await,
            Err(SealError::Open)
        ));
    }

    #[test]
    fn file_sealer_refuses_a_short_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.key");
        std::fs::write(&path, b"too short").unwrap();
        let e = FileSealer::open(&path, false).err().unwrap();
        assert!(
            e.to_string()
                .contains("must hold exactly 32 bytes, found 9"),
            "{e}"
        );
        let missing = FileSealer::open(&dir.path().join("none"), false)
            .err()
            .unwrap();
        assert!(
            missing.to_string().starts_with("seal key file"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn kms_sealer_wraps_through_the_kms_seam() {
        let dir = tempfile::tempdir().unwrap();
        let ring = dir.path().join("keys.json");
        let kms: Arc<dyn Kms> = Arc::new(LocalKeyring::create_file(&ring, &["ca-kek"]).unwrap());
        let s = KmsSealer::new(kms.clone(), "ca-kek");
        let sealed = match s.seal(b"ca private key", &ctx("example.org", 3)).await {
            Ok(v) => v,
            Err(e) => panic!("seal: {e}"),
        };
        let env = Envelope::decode(&sealed).unwrap();
        assert_eq!(env.sealer, "kms:ca-kek");
        assert!(env.wrapped_dek.is_some());
        let open = s.unseal(&sealed, &ctx("example.org", 3)).await.unwrap();
        assert_eq!(&open[..], b"ca private key");
        assert!(matches!(
            s.unseal(&sealed, &ctx("example.org", 4)).await,
            Err(SealError::Open)
        ));
        // A file sealer refuses a KMS-sealed key by name, not by a crypto error.
        let f = FileSealer::from_key([1; 32]);
        assert!(matches!(
            f.unseal(&sealed, &ctx("example.org", 3)).await,
            Err(SealError::WrongSealer { .. })
        ));
    }
}
