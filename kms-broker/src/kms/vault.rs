//! Vault / OpenBao Transit provider: `transit/datakey/plaintext/<key>` to
//! generate, `transit/decrypt/<key>` to unwrap, `transit/encrypt/<key>` to
//! wrap an existing DEK, `transit/keys/<key>` to resolve, and
//! `transit/keys/<key>/config` + `DELETE transit/keys/<key>` to shred. One
//! instance talks to one address; several addresses are combined with
//! [`strait_kms_core::FailoverKms`].

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use strait_kms_core::{
    dek_from_slice, DekPair, KekRef, Kms, KmsError, Result, WrappedDek, DEK_LEN,
};
use vaultrs::api::transit::requests::{
    DataKeyType, EncryptDataRequest, UpdateKeyConfigurationRequest,
};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

pub struct VaultTransit {
    client: VaultClient,
    mount: String,
    address: String,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl VaultTransit {
    pub fn new(address: &str, token: &str, mount: &str, timeout: Duration) -> Result<Self> {
        let url = url_ok(address)?;
        let settings = VaultClientSettingsBuilder::default()
            .address(url)
            .token(token)
            .timeout(Some(timeout))
            .build()
            .map_err(|e| KmsError::Invalid(format!("vault settings: {e}")))?;
        let client = VaultClient::new(settings)
            .map_err(|e| KmsError::Invalid(format!("vault client: {e}")))?;
        Ok(Self {
            client,
            mount: mount.trim_matches('/').to_string(),
            address: address.to_string(),
        })
    }
}

fn url_ok(address: &str) -> Result<&str> {
    // vaultrs panics on an unparsable URL; check first.
    if (address.starts_with("http://") || address.starts_with("https://"))
        && address.len() > "https://".len()
    {
        Ok(address)
    } else {
        Err(KmsError::Invalid(format!(
            "invalid Vault address {address:?}"
        )))
    }
}

fn map_err(address: &str, key: &str, e: ClientError) -> KmsError {
    match e {
        ClientError::APIError { code, errors } => {
            let msg = format!("vault {address} ({code}): {}", errors.join("; "));
            let not_found = errors.iter().any(|m| {
                let m = m.to_ascii_lowercase();
                // The last: a DELETE of a key that is already gone.
                m.contains("key not found")
                    || m.contains("no existing key")
                    || m.contains("could not delete key; not found")
            });
            match code {
                404 => KmsError::NotFound(format!("{key}: {msg}")),
                400 if not_found => KmsError::NotFound(format!("{key}: {msg}")),
                401 | 403 => KmsError::Denied(msg),
                429 | 500..=599 => KmsError::Unavailable(msg),
                _ => KmsError::Invalid(msg),
            }
        }
        ClientError::RestClientError { source } => {
            KmsError::Unavailable(format!("vault {address}: {source}"))
        }
        other => KmsError::Invalid(format!("vault {address}: {other}")),
    }
}

/// `vault:v3:...` -> `"3"`.
fn ciphertext_version(ct: &str) -> Option<String> {
    let mut parts = ct.splitn(3, ':');
    let _prefix = parts.next()?;
    let v = parts.next()?.strip_prefix('v')?;
    v.parse::<u64>().ok().map(|n| n.to_string())
}

#[async_trait]
impl Kms for VaultTransit {
    async fn generate_dek(&self, kek: &KekRef) -> Result<DekPair> {
        let resp = vaultrs::transit::generate::data_key(
            &self.client,
            &self.mount,
            &kek.key_id,
            DataKeyType::Plaintext,
            None,
        )
        .await
        .map_err(|e| map_err(&self.address, &kek.key_id, e))?;
        let plain_b64 = resp
            .plaintext
            .ok_or_else(|| KmsError::Invalid("vault returned no plaintext DEK".into()))?;
        let plain = Zeroizing::new(
            B64.decode(plain_b64.as_bytes())
                .map_err(|e| KmsError::Invalid(format!("vault plaintext: {e}")))?,
        );
        let version = ciphertext_version(&resp.ciphertext);
        Ok(DekPair {
            plaintext: dek_from_slice(&plain)?,
            wrapped: resp.ciphertext.into_bytes(),
            kek: KekRef {
                key_id: kek.key_id.clone(),
                version,
            },
        })
    }

    async fn unwrap_dek(&self, kek: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
        let ct = std::str::from_utf8(wrapped)
            .map_err(|_| KmsError::Invalid("vault ciphertext is not UTF-8".into()))?;
        if !ct.starts_with("vault:v") {
            return Err(KmsError::Invalid("not a vault transit ciphertext".into()));
        }
        let resp =
            vaultrs::transit::data::decrypt(&self.client, &self.mount, &kek.key_id, ct, None)
                .await
                .map_err(|e| map_err(&self.address, &kek.key_id, e))?;
        let plain = Zeroizing::new(
            B64.decode(resp.plaintext.as_bytes())
                .map_err(|e| KmsError::Invalid(format!("vault plaintext: {e}")))?,
        );
        dek_from_slice(&plain)
    }

    async fn resolve_alias(&self, alias: &str) -> Result<KekRef> {
        let key = vaultrs::transit::key::read(&self.client, &self.mount, alias)
            .await
            .map_err(|e| map_err(&self.address, alias, e))?;
        if !key.supports_encryption {
            return Err(KmsError::Invalid(format!(
                "transit key {alias} does not support encryption"
            )));
        }
        Ok(KekRef::new(key.name))
    }

    async fn wrap_dek(&self, kek: &KekRef, plaintext: &[u8; DEK_LEN]) -> Result<WrappedDek> {
        // transit/encrypt creates a key it does not find (upsert) when the
        // token may create it: look first, so a wrap under a mistyped or
        // shredded key is NotFound instead of a fresh key nobody else
        // holds. (The token should also lack `create` on transit/encrypt/*,
        // which closes the gap between the two calls; see the README.)
        self.resolve_alias(&kek.key_id).await?;
        let key_version = kek
            .version
            .as_deref()
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| KmsError::Invalid(format!("vault key version {v:?}")))
            })
            .transpose()?;
        let plain_b64 = Zeroizing::new(B64.encode(plaintext));
        let mut opts = EncryptDataRequest::builder();
        if let Some(v) = key_version {
            opts.key_version(v);
        }
        let resp = vaultrs::transit::data::encrypt(
            &self.client,
            &self.mount,
            &kek.key_id,
            &plain_b64,
            Some(&mut opts),
        )
        .await
        .map_err(|e| map_err(&self.address, &kek.key_id, e))?;
        if !resp.ciphertext.starts_with("vault:v") {
            return Err(KmsError::Invalid(
                "vault returned no transit ciphertext".into(),
            ));
        }
        let version = ciphertext_version(&resp.ciphertext);
        Ok(WrappedDek {
            wrapped: resp.ciphertext.into_bytes(),
            kek: KekRef {
                key_id: kek.key_id.clone(),
                version,
            },
        })
    }

    async fn shred_kek(&self, kek: &KekRef) -> Result<()> {
        // Transit refuses to delete a key until its config allows it; both
        // steps are needed, and a key that is not there fails the first
        // (NotFound) rather than "succeeding" silently.
        let mut allow = UpdateKeyConfigurationRequest::builder();
        allow.deletion_allowed(true);
        vaultrs::transit::key::update(&self.client, &self.mount, &kek.key_id, Some(&mut allow))
            .await
            .map_err(|e| map_err(&self.address, &kek.key_id, e))?;
        vaultrs::transit::key::delete(&self.client, &self.mount, &kek.key_id)
            .await
            .map_err(|e| map_err(&self.address, &kek.key_id, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_ciphertext_version() {
        assert_eq!(
            super::ciphertext_version("vault:v12:abc").as_deref(),
            Some("12")
        );
        assert_eq!(super::ciphertext_version("garbage"), None);
    }
}
