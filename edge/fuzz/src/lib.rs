//! Shared pieces of the fuzz targets (`fuzz_targets/`): the input framing that
//! turns one fuzz input into a sequence of Kafka frames, the runtime the async
//! filters run on, and the fixed fixtures (rules, keyring) they are built with.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use strait_filter::{ConnectionInfo, Endpoint, Principal};

/// One step of a sequence input: a request from the client, or the broker's
/// answer to the oldest request still waiting for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    Request(&'a [u8]),
    Response(&'a [u8]),
}

/// Splits a fuzz input into steps: `kind: u8` (even: request, odd: response),
/// `len: u16` big-endian, then `len` bytes of a frame without its length
/// field. A short tail is one last step of whatever is left, so every input
/// means something and a mutation of a length field does not waste the rest.
pub fn steps(mut data: &[u8]) -> impl Iterator<Item = Step<'_>> {
    std::iter::from_fn(move || {
        let (&kind, rest) = data.split_first()?;
        let (body, tail) = match rest {
            [hi, lo, rest @ ..] => {
                let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
                rest.split_at(len)
            }
            _ => (rest, &[][..]),
        };
        data = tail;
        Some(if kind & 1 == 0 {
            Step::Request(body)
        } else {
            Step::Response(body)
        })
    })
}

/// Encodes steps in the format [`steps`] reads (for writing seeds).
pub fn encode_steps(steps: &[Step<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for step in steps {
        let (kind, body) = match step {
            Step::Request(body) => (0u8, body),
            Step::Response(body) => (1u8, body),
        };
        let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
        out.push(kind);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body[..usize::from(len)]);
    }
    out
}

/// `body` with its 4-byte length field in front, as a frame travels.
pub fn framed(body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as i32).to_be_bytes());
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// Runs a future to completion on one shared current-thread runtime (the
/// filters use Tokio timers and locks; a runtime per input would dominate).
pub fn block_on<F: Future>(future: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a current-thread runtime")
        })
        .block_on(future)
}

/// The decision time of every filter call: fixed, so an input that crashes
/// once crashes again, and inside the leases of [`AUTHZ_RULES`].
pub fn now() -> SystemTime {
    // 2026-11-22T08:00:00Z
    UNIX_EPOCH + Duration::from_secs(1_795_334_400)
}

pub const ORDERS: &str = "spiffe://example.org/ns/shop/sa/orders";

/// A connection of `principal` to the bootstrap of virtual cluster `fuzz`.
pub fn connection(principal: Principal) -> ConnectionInfo {
    ConnectionInfo {
        virtual_cluster: "fuzz".into(),
        client_addr: "127.0.0.1:40000".parse().expect("an address"),
        endpoint: Endpoint::Bootstrap,
        principal,
        via_peer: None,
    }
}

/// Rules touching every resource type the filter checks, one with a lease
/// (`not_after`) and one for a wildcard principal, so both the allowed and
/// the denied branch of every API are reachable.
pub const AUTHZ_RULES: &str = r#"
rules:
  - principal: "spiffe://example.org/ns/shop/sa/orders"
    allow: [Write, Describe, Create, Delete, Alter, DescribeConfigs, AlterConfigs]
    topic: "orders-*"
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read, Describe]
    topic: "*"
    not_after: "2026-12-01T00:00:00Z"
  - principal: "spiffe://example.org/ns/shop/sa/*"
    allow: [Read, Describe, Delete]
    group: "shop-*"
  - principal: "spiffe://example.org/**"
    allow: [Describe, IdempotentWrite]
    cluster: true
  - principal: "spiffe://example.org/ns/shop/sa/orders"
    allow: [Write, Describe]
    transactional_id: "orders-tx-*"
"#;

/// A development keyring with fixed keys (never used anywhere else), so an
/// input that encrypts and decrypts behaves the same in every run.
pub const KEYRING: &str = r#"{ "keys": {
  "kek-fuzz": ["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="],
  "kek-old": ["ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=", "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8="]
} }"#;

/// The encryption core as a virtual cluster configures it, over [`KEYRING`]:
/// `secret-*` under `kek-fuzz`, `old-*` under the two-version `kek-old`.
/// `strict` also encrypts headers and refuses plaintext in encrypted topics.
pub fn encryption(strict: bool) -> strait_encryption::RecordEncryption {
    use strait_encryption::{
        DekConfig, EncryptionConfig, OnMissingKey, OnPlaintextFetch, RecordEncryption, TopicRule,
    };
    use strait_kms_core::KmsSet;

    let rule = |topic: &str, kek: &str| TopicRule {
        topic: topic.into(),
        kms: "dev".into(),
        kek: kek.into(),
        also_wrap_for: Vec::new(),
    };
    let config = EncryptionConfig {
        rules: vec![rule("secret-*", "kek-fuzz"), rule("old-*", "kek-old")],
        on_missing_key: OnMissingKey::Reject,
        on_plaintext_fetch: if strict {
            OnPlaintextFetch::Reject
        } else {
            OnPlaintextFetch::Pass
        },
        encrypt_headers: strict,
        dek: DekConfig::default(),
        keys_topic: None,
        shredded_keks: Vec::new(),
    };
    let kms = KmsSet::new().with("dev", keyring());
    RecordEncryption::new(
        config,
        kms,
        &mut prometheus_client::registry::Registry::default(),
    )
    .expect("a valid encryption config")
}

/// [`KEYRING`], loaded once per process.
pub fn keyring() -> std::sync::Arc<strait_kms_core::local::LocalKeyring> {
    static KEYRING_CELL: OnceLock<std::sync::Arc<strait_kms_core::local::LocalKeyring>> =
        OnceLock::new();
    KEYRING_CELL
        .get_or_init(|| {
            let path = std::env::temp_dir()
                .join(format!("strait-fuzz-keyring-{}.json", std::process::id()));
            std::fs::write(&path, KEYRING).expect("the keyring written to the temp dir");
            let keyring =
                strait_kms_core::local::LocalKeyring::open(&path).expect("the fixed keyring");
            let _ = std::fs::remove_file(&path);
            std::sync::Arc::new(keyring)
        })
        .clone()
}

/// Plays one connection through `chain` as the proxy does (edge/proxy
/// `connection.rs`): a request the chain wants is decoded, filtered and
/// re-encoded; a forwarded request that expects an answer waits for the next
/// response step, which is decoded for its key and version (when the chain
/// wants it), filtered and re-encoded. An answer a filter makes itself must
/// encode, and a client must be able to decode it.
pub async fn run_session(
    chain: &mut strait_filter::FilterChain,
    connection: &ConnectionInfo,
    data: &[u8],
) {
    use std::collections::VecDeque;
    use strait_filter::{FilterContext, RequestFrame, RequestVerdict, ResponseFrame};
    use strait_kafka::codec::decode_response_frame;
    use strait_kafka::kafka_protocol::messages::{ApiKey, RequestKind};

    let ctx = FilterContext {
        connection,
        now: now(),
    };
    let mut pending: VecDeque<(ApiKey, i16, i32)> = VecDeque::new();
    for step in steps(data) {
        match step {
            Step::Request(body) => {
                let Ok(mut request) = RequestFrame::decode(framed(body)) else {
                    continue;
                };
                let (key, version) = (request.api_key(), request.version());
                let verdict = if chain.wants_request(key as i16) {
                    chain.on_request(&ctx, &mut request).await
                } else {
                    RequestVerdict::Forward
                };
                let answered = !matches!(request.body(), RequestKind::Produce(p) if p.acks == 0);
                match verdict {
                    RequestVerdict::Forward => {
                        let correlation_id = request.correlation_id();
                        // Re-encoding may fail (the connection closes); it must not panic.
                        if request.into_bytes().is_ok() && answered {
                            pending.push_back((key, version, correlation_id));
                        }
                    }
                    RequestVerdict::Respond(body) => {
                        let bytes = ResponseFrame::answering(&request, *body)
                            .into_bytes()
                            .unwrap_or_else(|err| {
                                panic!("the edge's own {key:?} v{version} answer: {err}")
                            });
                        if let Err(err) = decode_response_frame(key, version, bytes) {
                            panic!("a client cannot decode the edge's {key:?} v{version} answer: {err}");
                        }
                    }
                    RequestVerdict::Close(_) => return,
                }
            }
            Step::Response(body) => {
                let Some((key, version, correlation_id)) = pending.pop_front() else {
                    continue;
                };
                if !chain.wants_response(key as i16, version) {
                    continue;
                }
                // The broker answers the request it was sent: same correlation id.
                let mut body = body.to_vec();
                if let Some(id) = body.get_mut(..4) {
                    id.copy_from_slice(&correlation_id.to_be_bytes());
                }
                let Ok(mut response) = ResponseFrame::decode(key, version, framed(&body)) else {
                    continue;
                };
                if let strait_filter::ResponseVerdict::Close(_) =
                    chain.on_response(&ctx, &mut response).await
                {
                    return;
                }
                let _ = response.into_bytes();
            }
        }
    }
}
