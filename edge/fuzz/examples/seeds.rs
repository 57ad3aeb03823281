//! Turns captured client traffic (integration/scripts/fuzz_capture.py) into
//! the Kafka seed corpora of the fuzz targets: `make fuzz-corpus`.
//!
//! `seeds CAPTURE_DIR CORPUS_DIR` reads `CAPTURE_DIR/conn-*/<seq>-<req|resp>-
//! <key>-<version>.bin` and writes `CORPUS_DIR/<target>/<hash>` for the frame,
//! decoder, filter, record and cipher targets. Caps keep the corpora small:
//! a few frames per API key and version, sessions and records cut to size.
//! Encrypted seeds are made with the fuzz targets' own fixed keyring, so the
//! fetch path of `encryption_records` starts from ciphertext it can open.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use strait_encryption::testing::split_batches;
use strait_fuzz::{block_on, encode_steps, encryption, framed, Step};
use strait_kafka::codec::{decode_request, decode_response};
use strait_kafka::kafka_protocol::messages::{ApiKey, RequestKind, ResponseKind};

/// Frames of one API key and version kept for the decoder targets.
const PER_VERSION: usize = 4;
/// Largest frame, session or records field kept (libFuzzer's inputs stay short).
const MAX_SEED: usize = 6 * 1024;
/// Steps of a connection kept as one session seed.
const MAX_STEPS: usize = 24;

struct Frame {
    request: bool,
    api_key: i16,
    version: i16,
    body: Vec<u8>,
}

struct Corpus {
    root: PathBuf,
    written: HashSet<(String, u64)>,
}

impl Corpus {
    fn put(&mut self, target: &str, seed: &[u8]) {
        if seed.is_empty() || seed.len() > MAX_SEED {
            return;
        }
        let mut hasher = DefaultHasher::new();
        seed.hash(&mut hasher);
        let hash = hasher.finish();
        if !self.written.insert((target.to_owned(), hash)) {
            return;
        }
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("a corpus directory");
        std::fs::write(dir.join(format!("capture-{hash:016x}")), seed).expect("a seed written");
    }
}

fn connection_frames(dir: &Path) -> Vec<Frame> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("a capture connection directory")
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    names.sort();
    names
        .iter()
        .filter_map(|path| {
            let name = path.file_stem()?.to_str()?.to_owned();
            let mut parts = name.split('-').skip(1);
            let request = parts.next()? == "req";
            let api_key = parts.next()?.parse().ok()?;
            let version = parts.next()?.parse().ok()?;
            let body = std::fs::read(path).ok()?;
            Some(Frame {
                request,
                api_key,
                version,
                body,
            })
        })
        .collect()
}

fn records_fields(frame: &Frame) -> Vec<Bytes> {
    let Ok(key) = ApiKey::try_from(frame.api_key) else {
        return Vec::new();
    };
    if frame.request && key == ApiKey::Produce {
        if let Ok((_, _, RequestKind::Produce(produce))) = decode_request(framed(&frame.body)) {
            return produce
                .topic_data
                .iter()
                .flat_map(|t| &t.partition_data)
                .filter_map(|p| p.records.clone())
                .collect();
        }
    }
    if !frame.request && key == ApiKey::Fetch {
        if let Ok((_, ResponseKind::Fetch(fetch))) =
            decode_response(key, frame.version, framed(&frame.body))
        {
            return fetch
                .responses
                .iter()
                .flat_map(|t| &t.partitions)
                .filter_map(|p| p.records.clone())
                .filter(|r| !r.is_empty())
                .collect();
        }
    }
    Vec::new()
}

/// The records field encrypted as the edge would store it, and its values.
fn encrypted(records: &Bytes, strict: bool) -> Option<(Bytes, Vec<Bytes>)> {
    use strait_kafka::kafka_protocol::messages::produce_request::{
        PartitionProduceData, TopicProduceData,
    };
    use strait_kafka::kafka_protocol::messages::{ProduceRequest, TopicName};
    use strait_kafka::kafka_protocol::protocol::StrBytes;

    let engine = encryption(strict);
    let mut produce = ProduceRequest::default().with_topic_data(vec![TopicProduceData::default()
        .with_name(TopicName(StrBytes::from_static_str("secret-orders")))
        .with_partition_data(vec![
            PartitionProduceData::default().with_records(Some(records.clone()))
        ])]);
    block_on(engine.encrypt_produce(&mut produce, 9)).ok()?;
    let stored = produce.topic_data[0].partition_data[0].records.clone()?;
    let values = split_batches(&stored)
        .ok()?
        .iter()
        .filter_map(|batch| batch.records().ok())
        .flatten()
        .filter_map(|record| record.value)
        .collect();
    Some((stored, values))
}

/// The stream headers and answers one edge sends another (edge/mesh
/// `header.rs`): every target kind, both principal kinds, a refusal.
fn tunnel_seeds(corpus: &mut Corpus) {
    use strait_mesh::header::{
        Answer, ForwardedPrincipal, RefusalCode, StreamHeader, StreamTarget,
    };
    let named = ForwardedPrincipal::Named(strait_fuzz::ORDERS.to_owned());
    for (target, principal) in [
        (StreamTarget::Bootstrap, named.clone()),
        (StreamTarget::Broker(3), named),
        (StreamTarget::Broker(0), ForwardedPrincipal::Anonymous),
        (StreamTarget::Service, ForwardedPrincipal::Anonymous),
        (StreamTarget::Keepalive, ForwardedPrincipal::Anonymous),
    ] {
        let header = StreamHeader {
            name: "payments".to_owned(),
            target,
            principal,
        };
        corpus.put("tunnel_header", &header.encode().expect("a valid header"));
    }
    corpus.put("tunnel_header", &Answer::Accept.encode());
    let refusal = Answer::Refuse {
        code: RefusalCode::PrincipalNotAllowed,
        reason: "spiffe://example.org/ns/shop/sa/orders may not be asserted".to_owned(),
    };
    corpus.put("tunnel_header", &refusal.encode());
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(capture), Some(root)) = (args.next(), args.next()) else {
        eprintln!("usage: seeds CAPTURE_DIR CORPUS_DIR");
        std::process::exit(2);
    };
    let mut corpus = Corpus {
        root: PathBuf::from(root),
        written: HashSet::new(),
    };
    let mut connections: Vec<PathBuf> = std::fs::read_dir(&capture)
        .expect("the capture directory")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_dir())
        .collect();
    connections.sort();
    let mut per_version: BTreeMap<(bool, i16, i16), usize> = BTreeMap::new();
    for dir in &connections {
        let frames = connection_frames(dir);
        let mut steps = Vec::new();
        for frame in &frames {
            let seen = per_version
                .entry((frame.request, frame.api_key, frame.version))
                .or_default();
            *seen += 1;
            let framed_bytes = framed(&frame.body);
            if frame.request {
                if *seen <= PER_VERSION {
                    corpus.put("request_decode", &frame.body);
                    let mut prefix = (1u32 << 20).to_be_bytes().to_vec();
                    prefix.extend_from_slice(&framed_bytes[..framed_bytes.len().min(64)]);
                    corpus.put("frame_prefix", &prefix);
                }
                steps.push(Step::Request(&frame.body));
            } else {
                if *seen <= PER_VERSION {
                    let mut seed = frame.api_key.to_be_bytes().to_vec();
                    seed.extend_from_slice(&frame.version.to_be_bytes());
                    seed.extend_from_slice(&frame.body);
                    corpus.put("response_decode", &seed);
                }
                steps.push(Step::Response(&frame.body));
            }
            for records in records_fields(frame) {
                corpus.put("record_batch", &records);
                let mode = u8::from(!frame.request);
                for strict in [0u8, 2] {
                    let mut seed = vec![mode | strict];
                    seed.extend_from_slice(&records);
                    corpus.put("encryption_records", &seed);
                }
                for strict in [false, true] {
                    if let Some((stored, values)) = encrypted(&records, strict) {
                        let mut seed = vec![1 | if strict { 2 } else { 0 }];
                        seed.extend_from_slice(&stored);
                        corpus.put("encryption_records", &seed);
                        corpus.put("record_batch", &stored);
                        for value in values.iter().take(2) {
                            corpus.put("cipher_format", value);
                        }
                    }
                }
            }
        }
        // A session seed per connection, cut to fit, for each principal kind.
        let mut cut = steps.len().min(MAX_STEPS);
        while cut > 0 && encode_steps(&steps[..cut]).len() + 1 > MAX_SEED {
            cut -= 1;
        }
        if cut > 0 {
            let session = encode_steps(&steps[..cut]);
            for who in [0u8, 1, 3] {
                let mut seed = vec![who];
                seed.extend_from_slice(&session);
                corpus.put("authz_filter", &seed);
            }
            for who in [0u8, 4] {
                let mut seed = vec![who];
                seed.extend_from_slice(&session);
                corpus.put("filter_chain", &seed);
            }
        }
    }
    tunnel_seeds(&mut corpus);
    for (target, count) in
        corpus
            .written
            .iter()
            .fold(BTreeMap::<&str, usize>::new(), |mut acc, (t, _)| {
                *acc.entry(t.as_str()).or_default() += 1;
                acc
            })
    {
        println!("[seeds] {target}: {count}");
    }
}
