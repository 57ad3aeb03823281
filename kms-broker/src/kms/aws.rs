//! AWS KMS provider: GenerateDataKey (AES_256), Decrypt, Encrypt (wrap an
//! existing DEK), DescribeKey, and DisableKey + ScheduleKeyDeletion (shred).
//! Credentials come from the usual AWS environment/provider chain. One
//! instance per endpoint; several are combined with
//! [`strait_kms_core::FailoverKms`]. The SDK's own retries are disabled:
//! [`strait_kms_core::RetryingKms`] retries, so attempts are counted once.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyState};
use strait_kms_core::{
    dek_from_slice, DekPair, KekRef, Kms, KmsError, Result, WrappedDek, DEK_LEN,
};
use zeroize::Zeroizing;

pub struct AwsKms {
    client: aws_sdk_kms::Client,
    endpoint: String,
}

impl AwsKms {
    /// `endpoint`: an override (moto, VPC endpoint) or `None` for AWS's own.
    pub async fn new(endpoint: Option<&str>, region: &str, timeout: Duration) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(timeout)
                    .connect_timeout(timeout)
                    .build(),
            );
        if let Some(ep) = endpoint {
            loader = loader.endpoint_url(ep);
        }
        let conf = loader.load().await;
        Self {
            client: aws_sdk_kms::Client::new(&conf),
            endpoint: endpoint.unwrap_or("aws-default").to_string(),
        }
    }
}

/// The shortest time AWS lets a key wait before it is deleted; a shred
/// asks for it (the key is disabled at once, so nothing decrypts meanwhile).
pub const MIN_PENDING_WINDOW_DAYS: i32 = 7;

/// Key ids, ARNs and `alias/...` pass as they are; a bare name is taken as
/// an alias, so a rule can say `kek: "kek-$(topic)"` for both Vault and AWS.
/// Every operation applies it, so a `KekRef` a wrap returned unwraps as is.
pub fn aws_key_id(name: &str) -> String {
    let is_uuid = name.len() == 36 && name.chars().filter(|c| *c == '-').count() == 4;
    if name.starts_with("arn:") || name.starts_with("alias/") || is_uuid || name.starts_with("mrk-")
    {
        name.to_string()
    } else {
        format!("alias/{name}")
    }
}

fn map_err<E, R>(endpoint: &str, key: &str, e: SdkError<E, R>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            let code = err.code().unwrap_or("Unknown").to_string();
            let msg = format!(
                "aws kms {endpoint}: {code}: {}",
                err.message().unwrap_or_default()
            );
            match code.as_str() {
                "NotFoundException" => KmsError::NotFound(format!("{key}: {msg}")),
                "AccessDeniedException"
                | "DisabledException"
                | "KMSInvalidStateException"
                | "IncorrectKeyException"
                | "UnrecognizedClientException" => KmsError::Denied(msg),
                "KMSInternalException"
                | "DependencyTimeoutException"
                | "ThrottlingException"
                | "LimitExceededException"
                | "InternalFailure"
                | "ServiceUnavailable" => KmsError::Unavailable(msg),
                _ if format!("{:?}", se.raw()).contains("status: StatusCode(5") => {
                    KmsError::Unavailable(msg)
                }
                _ => KmsError::Invalid(msg),
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            KmsError::Unavailable(format!("aws kms {endpoint}: {}", display_chain(&e)))
        }
        _ => KmsError::Invalid(format!("aws kms {endpoint}: {}", display_chain(&e))),
    }
}

fn display_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[async_trait]
impl Kms for AwsKms {
    async fn generate_dek(&self, kek: &KekRef) -> Result<DekPair> {
        let out = self
            .client
            .generate_data_key()
            .key_id(aws_key_id(&kek.key_id))
            .key_spec(DataKeySpec::Aes256)
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, &kek.key_id, e))?;
        let plain = out
            .plaintext()
            .ok_or_else(|| KmsError::Invalid("AWS returned no plaintext DEK".into()))?;
        let wrapped = out
            .ciphertext_blob()
            .ok_or_else(|| KmsError::Invalid("AWS returned no ciphertext blob".into()))?;
        Ok(DekPair {
            plaintext: dek_from_slice(plain.as_ref())?,
            wrapped: wrapped.as_ref().to_vec(),
            kek: KekRef {
                key_id: kek.key_id.clone(),
                version: None,
            },
        })
    }

    async fn unwrap_dek(&self, kek: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>> {
        let out = self
            .client
            .decrypt()
            .key_id(aws_key_id(&kek.key_id))
            .ciphertext_blob(Blob::new(wrapped.to_vec()))
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, &kek.key_id, e))?;
        let plain = out
            .plaintext()
            .ok_or_else(|| KmsError::Invalid("AWS returned no plaintext".into()))?;
        dek_from_slice(plain.as_ref())
    }

    async fn resolve_alias(&self, alias: &str) -> Result<KekRef> {
        let id = aws_key_id(alias);
        let out = self
            .client
            .describe_key()
            .key_id(&id)
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, &id, e))?;
        let meta = out
            .key_metadata()
            .ok_or_else(|| KmsError::Invalid("DescribeKey returned no metadata".into()))?;
        if !meta.enabled() {
            return Err(KmsError::Denied(format!("key {id} is disabled")));
        }
        Ok(KekRef::new(meta.key_id()))
    }

    async fn wrap_dek(&self, kek: &KekRef, plaintext: &[u8; DEK_LEN]) -> Result<WrappedDek> {
        let id = aws_key_id(&kek.key_id);
        let out = self
            .client
            .encrypt()
            .key_id(&id)
            .plaintext(Blob::new(plaintext.to_vec()))
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, &id, e))?;
        let wrapped = out
            .ciphertext_blob()
            .ok_or_else(|| KmsError::Invalid("AWS returned no ciphertext blob".into()))?;
        // As generate: the key version is inside the blob.
        Ok(WrappedDek {
            wrapped: wrapped.as_ref().to_vec(),
            kek: KekRef::new(kek.key_id.clone()),
        })
    }

    async fn shred_kek(&self, kek: &KekRef) -> Result<()> {
        // Disable/ScheduleKeyDeletion want the key itself, not an alias.
        let id = aws_key_id(&kek.key_id);
        let key_id = match self.key_state(&id).await? {
            // A repeat (a retried attempt that had acted): already shredded.
            (_, Some(KeyState::PendingDeletion)) => return Ok(()),
            (key_id, _) => key_id,
        };
        // Disabled first: from this call on nothing encrypts or decrypts
        // under the key, though its deletion waits out the pending window.
        self.client
            .disable_key()
            .key_id(&key_id)
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, &id, e))?;
        let scheduled = self
            .client
            .schedule_key_deletion()
            .key_id(&key_id)
            .pending_window_in_days(MIN_PENDING_WINDOW_DAYS)
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, &id, e));
        match scheduled {
            Ok(_) => Ok(()),
            // Scheduled meanwhile by someone else: the key is shredded.
            Err(e) => match self.key_state(&key_id).await {
                Ok((_, Some(KeyState::PendingDeletion))) => Ok(()),
                _ => Err(e),
            },
        }
    }
}

impl AwsKms {
    /// The key id behind `id` (an alias, ARN or key id) and its state.
    async fn key_state(&self, id: &str) -> Result<(String, Option<KeyState>)> {
        let out = self
            .client
            .describe_key()
            .key_id(id)
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, id, e))?;
        let meta = out
            .key_metadata()
            .ok_or_else(|| KmsError::Invalid("DescribeKey returned no metadata".into()))?;
        Ok((meta.key_id().to_string(), meta.key_state().cloned()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bare_names_become_aliases() {
        assert_eq!(super::aws_key_id("kek-a"), "alias/kek-a");
        assert_eq!(super::aws_key_id("alias/x"), "alias/x");
        assert_eq!(
            super::aws_key_id("1234abcd-12ab-34cd-56ef-1234567890ab"),
            "1234abcd-12ab-34cd-56ef-1234567890ab"
        );
    }
}
