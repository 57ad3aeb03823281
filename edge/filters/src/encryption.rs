//! Record encryption on the data path: produce requests of topics with an
//! encryption rule are encrypted before they reach the broker, fetch
//! responses are decrypted before they reach the client.
//!
//! A produce request is decoded (the filter has to read its topic names),
//! but it is re-encoded only when one of its topics has a rule, so traffic to
//! unencrypted topics leaves with its original bytes.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use strait_encryption::{ProduceRejection, RecordEncryption};
use strait_filter::{
    ApiKeySet, ConnectionInfo, Filter, FilterContext, FilterFactory, RequestFrame, RequestVerdict,
    ResponseFrame, ResponseVerdict,
};
use strait_kafka::kafka_protocol::messages::{ApiKey, RequestKind, ResponseKind};

/// Builds an [`EncryptionFilter`] per connection; the encryption core (and
/// its DEK caches) is shared by every connection of the virtual cluster.
pub struct EncryptionFilterFactory {
    core: Arc<RecordEncryption>,
}

impl EncryptionFilterFactory {
    pub fn new(core: Arc<RecordEncryption>) -> Self {
        EncryptionFilterFactory { core }
    }
}

impl FilterFactory for EncryptionFilterFactory {
    fn create(&self, _connection: &ConnectionInfo) -> Box<dyn Filter> {
        Box::new(EncryptionFilter {
            core: self.core.clone(),
            rejected: HashMap::new(),
        })
    }
}

pub struct EncryptionFilter {
    core: Arc<RecordEncryption>,
    /// Partitions refused on produce, by correlation id, to merge into the
    /// broker's answer for the rest of the request.
    rejected: HashMap<i32, ProduceRejection>,
}

#[async_trait]
impl Filter for EncryptionFilter {
    fn name(&self) -> &'static str {
        "record-encryption"
    }

    fn request_keys(&self) -> ApiKeySet {
        if self.core.has_rules() {
            ApiKeySet::of(&[ApiKey::Produce])
        } else {
            ApiKeySet::EMPTY
        }
    }

    fn response_keys(&self) -> ApiKeySet {
        if self.core.has_rules() {
            // Metadata teaches topic ids, which Produce/Fetch v13+ use instead of names.
            ApiKeySet::of(&[ApiKey::Produce, ApiKey::Fetch, ApiKey::Metadata])
        } else {
            ApiKeySet::EMPTY
        }
    }

    async fn on_request(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut RequestFrame,
    ) -> RequestVerdict {
        let RequestKind::Produce(request) = frame.body() else {
            return RequestVerdict::Forward;
        };
        if !self
            .core
            .needs_produce(request.topic_data.iter().map(|t| t.name.0.as_str()))
        {
            return RequestVerdict::Forward;
        }
        let (version, correlation_id) = (frame.version(), frame.correlation_id());
        let RequestKind::Produce(request) = frame.body_mut() else {
            return RequestVerdict::Forward;
        };
        match self.core.encrypt_produce(request, version).await {
            Ok(()) => RequestVerdict::Forward,
            Err(rejection) => {
                let nothing_left = request
                    .topic_data
                    .iter()
                    .all(|topic| topic.partition_data.is_empty());
                if nothing_left {
                    RequestVerdict::Respond(Box::new(ResponseKind::Produce(
                        rejection.to_response(),
                    )))
                } else {
                    request
                        .topic_data
                        .retain(|topic| !topic.partition_data.is_empty());
                    self.rejected.insert(correlation_id, rejection);
                    RequestVerdict::Forward
                }
            }
        }
    }

    async fn on_response(
        &mut self,
        _ctx: &FilterContext<'_>,
        frame: &mut ResponseFrame,
    ) -> ResponseVerdict {
        let correlation_id = frame.correlation_id();
        match frame.body() {
            ResponseKind::Produce(_) => {
                if let Some(rejection) = self.rejected.remove(&correlation_id) {
                    if let ResponseKind::Produce(response) = frame.body_mut() {
                        rejection.merge_into(response);
                    }
                }
            }
            ResponseKind::Metadata(response) => {
                self.core
                    .learn_topic_ids(response.topics.iter().filter_map(|topic| {
                        topic
                            .name
                            .as_ref()
                            .map(|name| (topic.topic_id, name.0.as_str().to_owned()))
                    }));
            }
            ResponseKind::Fetch(response) => {
                // Topics named by id (v13+) may be encrypted: let the core look them up.
                let maybe_encrypted = response
                    .responses
                    .iter()
                    .any(|t| t.topic.0.is_empty() || self.core.needs_fetch(t.topic.0.as_str()));
                if maybe_encrypted {
                    let version = frame.version();
                    if let ResponseKind::Fetch(response) = frame.body_mut() {
                        let report = self.core.decrypt_fetch(response, version).await;
                        for failure in &report.failed_partitions {
                            tracing::warn!(
                                topic = failure.topic.0.as_str(),
                                topic_id = %failure.topic_id,
                                partition = failure.partition,
                                error = %failure.error,
                                "records withheld from the client"
                            );
                        }
                    }
                }
            }
            _ => {}
        }
        ResponseVerdict::Forward
    }
}
