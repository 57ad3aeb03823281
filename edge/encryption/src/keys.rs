//! The keys topic: every realm's wrap of every federated DEK, stored once per
//! (DEK, realm) in a compacted topic of the cluster that holds the data, so
//! the wraps travel with the records through whatever copies the cluster
//! (MirrorMaker 2, Cluster Linking, a re-producing tool).
//!
//! Record key: `dek/<32 hex digits of the DEK reference>/<realm>` (UTF-8), so
//! compaction keeps one wrap per DEK and realm. Record value (see FORMAT.md,
//! "Keys topic"):
//!
//! ```text
//! u8 version = 1 | u8 kind (0 origin, 1 wrap)
//! u16 len | KEK reference (as in a value prefix: u8 kms, u16 key id, u8 version)
//! u16 len | wrapped DEK
//! origin only: u8 n | n x (u8 len realm | u16 len KEK name): the realms the
//!              DEK must also be wrapped for, and under which KEK there;
//!              u16 len | the topic the DEK was made for
//! ```
//!
//! This module holds the codec and the in-memory index; the IO (producing to
//! and fetching from the topic) belongs to the edge behind [`KeyLog`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use strait_kms_core::KekRef;
use tokio::sync::watch;

use crate::format::{FormatError, KekLocator, DEK_REF_LEN};

pub type DekRef = [u8; DEK_REF_LEN];

const VALUE_VERSION: u8 = 1;
const KIND_ORIGIN: u8 = 0;
const KIND_WRAP: u8 = 1;

/// One DEK wrapped in one realm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wrap {
    /// The realm (`kms[].name`, global across sites) and its exact KEK.
    pub locator: KekLocator,
    pub wrapped: Vec<u8>,
}

/// A realm a DEK must also be wrapped for, and the KEK name there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Wanted {
    pub realm: String,
    pub kek: String,
}

/// A keys-topic entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyEntry {
    /// Written by the edge that made the DEK: its own realm's wrap, the
    /// realms it is owed to, and the topic it was made for (so that a realm
    /// added to that topic's rule later is owed a wrap too).
    Origin {
        wrap: Wrap,
        wanted: Vec<Wanted>,
        topic: String,
    },
    /// The DEK's wrap in another realm.
    Wrapped(Wrap),
}

impl KeyEntry {
    pub fn wrap(&self) -> &Wrap {
        match self {
            KeyEntry::Origin { wrap, .. } | KeyEntry::Wrapped(wrap) => wrap,
        }
    }
}

pub fn hex(r: &DekRef) -> String {
    r.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<DekRef> {
    if s.len() != DEK_REF_LEN * 2 {
        return None;
    }
    let mut out = [0u8; DEK_REF_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The record key of a DEK's wrap in `realm`.
pub fn record_key(dek: &DekRef, realm: &str) -> Bytes {
    Bytes::from(format!("dek/{}/{realm}", hex(dek)))
}

/// The DEK reference and realm of a record key; `None` for keys that are
/// not ours (ignored, so the topic can evolve).
pub fn parse_record_key(key: &[u8]) -> Option<(DekRef, String)> {
    let s = std::str::from_utf8(key).ok()?;
    let rest = s.strip_prefix("dek/")?;
    let (r, realm) = rest.split_once('/')?;
    (!realm.is_empty()).then_some(())?;
    Some((unhex(r)?, realm.to_string()))
}

fn put_str8(b: &mut BytesMut, s: &str) -> Result<(), FormatError> {
    let n = u8::try_from(s.len()).map_err(|_| FormatError("name longer than 255 bytes"))?;
    b.put_u8(n);
    b.put_slice(s.as_bytes());
    Ok(())
}

fn put_bytes16(b: &mut BytesMut, s: &[u8]) -> Result<(), FormatError> {
    let n = u16::try_from(s.len()).map_err(|_| FormatError("field longer than 65535 bytes"))?;
    b.put_u16(n);
    b.put_slice(s);
    Ok(())
}

fn locator_bytes(loc: &KekLocator) -> Result<BytesMut, FormatError> {
    let mut b = BytesMut::new();
    put_str8(&mut b, &loc.kms)?;
    put_bytes16(&mut b, loc.kek.key_id.as_bytes())?;
    put_str8(&mut b, loc.kek.version.as_deref().unwrap_or(""))?;
    Ok(b)
}

/// Encode an entry as a keys-topic record value.
pub fn encode_value(entry: &KeyEntry) -> Result<Bytes, FormatError> {
    let wrap = entry.wrap();
    let mut b = BytesMut::with_capacity(64 + wrap.wrapped.len());
    b.put_u8(VALUE_VERSION);
    b.put_u8(match entry {
        KeyEntry::Origin { .. } => KIND_ORIGIN,
        KeyEntry::Wrapped(_) => KIND_WRAP,
    });
    put_bytes16(&mut b, &locator_bytes(&wrap.locator)?)?;
    put_bytes16(&mut b, &wrap.wrapped)?;
    if let KeyEntry::Origin { wanted, topic, .. } = entry {
        let n = u8::try_from(wanted.len()).map_err(|_| FormatError("too many realms"))?;
        b.put_u8(n);
        for w in wanted {
            put_str8(&mut b, &w.realm)?;
            put_bytes16(&mut b, w.kek.as_bytes())?;
        }
        put_bytes16(&mut b, topic.as_bytes())?;
    }
    Ok(b.freeze())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.0.len() < n {
            return Err(FormatError("truncated keys-topic value"));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn bytes16(&mut self) -> Result<&'a [u8], FormatError> {
        let n = self.take(2)?;
        self.take(u16::from_be_bytes([n[0], n[1]]) as usize)
    }
    fn str8(&mut self) -> Result<&'a str, FormatError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| FormatError("name not UTF-8"))
    }
    fn str16(&mut self) -> Result<&'a str, FormatError> {
        std::str::from_utf8(self.bytes16()?).map_err(|_| FormatError("name not UTF-8"))
    }
}

/// Decode a keys-topic record value.
pub fn decode_value(value: &[u8]) -> Result<KeyEntry, FormatError> {
    let mut r = Reader(value);
    if r.u8()? != VALUE_VERSION {
        return Err(FormatError("unknown keys-topic value version"));
    }
    let kind = r.u8()?;
    let mut loc = Reader(r.bytes16()?);
    let kms = loc.str8()?.to_string();
    let key_id = loc.str16()?.to_string();
    let version = loc.str8()?;
    let wrap = Wrap {
        locator: KekLocator {
            kms,
            kek: KekRef {
                key_id,
                version: (!version.is_empty()).then(|| version.to_string()),
            },
        },
        wrapped: r.bytes16()?.to_vec(),
    };
    match kind {
        KIND_WRAP => Ok(KeyEntry::Wrapped(wrap)),
        KIND_ORIGIN => {
            let n = r.u8()?;
            let mut wanted = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let realm = r.str8()?.to_string();
                let kek = r.str16()?.to_string();
                wanted.push(Wanted { realm, kek });
            }
            let topic = r.str16()?.to_string();
            Ok(KeyEntry::Origin {
                wrap,
                wanted,
                topic,
            })
        }
        _ => Err(FormatError("unknown keys-topic entry kind")),
    }
}

/// A record read from a keys topic: offset, key, value.
pub type ReadRecord = (i64, Option<Bytes>, Option<Bytes>);

/// The records of a Fetch response's record set (any codec; control batches
/// and a trailing partial batch skipped), with their offsets.
pub fn read_records(records: &Bytes) -> Result<Vec<ReadRecord>, String> {
    let mut out = Vec::new();
    for b in crate::batch::split_batches(records).map_err(|e| e.0)? {
        if b.magic() != 2 || b.is_control() {
            continue;
        }
        let base = i64::from_be_bytes(b.bytes[..8].try_into().map_err(|_| "short batch")?);
        for r in b.records().map_err(|e| e.0)? {
            out.push((base + i64::from(r.offset_delta), r.key, r.value));
        }
    }
    Ok(out)
}

/// The last data record of a record set (control batches skipped): its
/// offset, timestamp, key and value, what replication tools copy as they
/// are (MirrorMaker 2 keeps timestamps).
pub type LastRecord = (i64, i64, Option<Bytes>, Option<Bytes>);

pub fn last_record(records: &Bytes) -> Result<Option<LastRecord>, String> {
    let mut last = None;
    for b in crate::batch::split_batches(records).map_err(|e| e.0)? {
        if b.magic() != 2 || b.is_control() {
            continue;
        }
        let base = i64::from_be_bytes(b.bytes[..8].try_into().map_err(|_| "short batch")?);
        let base_ts = i64::from_be_bytes(b.bytes[27..35].try_into().map_err(|_| "short batch")?);
        if let Some(r) = b.records().map_err(|e| e.0)?.pop() {
            last = Some((
                base + i64::from(r.offset_delta),
                base_ts + r.timestamp_delta,
                r.key,
                r.value,
            ));
        }
    }
    Ok(last)
}

/// The offset after the last batch of a record set, so a reader moves past
/// batches it skips (control batches, compacted-away records).
pub fn next_offset(records: &Bytes) -> Option<i64> {
    let batches = crate::batch::split_batches(records).ok()?;
    let last = batches.last()?;
    if last.magic() != 2 {
        return None;
    }
    let base = i64::from_be_bytes(last.bytes[..8].try_into().ok()?);
    let delta = i32::from_be_bytes(last.bytes[23..27].try_into().ok()?);
    Some(base + i64::from(delta) + 1)
}

/// Writes entries to this virtual cluster's keys topic (the edge's Kafka IO).
#[async_trait::async_trait]
pub trait KeyLog: Send + Sync {
    /// Append `(key, value)` records (acks=all); a `None` value deletes.
    async fn publish(&self, records: Vec<(Bytes, Option<Bytes>)>) -> Result<(), String>;
}

#[derive(Default)]
struct DekWraps {
    /// realm -> its wrap; the origin's realm included.
    wraps: BTreeMap<String, Wrap>,
    /// From the origin entry: the realms owed a wrap.
    wanted: Vec<Wanted>,
    origin_realm: Option<String>,
    topic: Option<String>,
    /// Whether the origin entry came from this edge's own keys topic (only
    /// those are this edge's to complete).
    own: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RealmLabel {
    realm: String,
}

/// Everything read from the keys topics, by DEK reference.
pub struct KeyIndex {
    inner: Mutex<Inner>,
    caught_up: watch::Sender<bool>,
    pending: Family<RealmLabel, Gauge>,
}

struct Inner {
    deks: HashMap<DekRef, DekWraps>,
    /// Topics not yet read up to the end they had when reading began.
    behind: HashSet<String>,
    realms_seen: HashSet<String>,
}

/// A DEK of this cluster's own keys topic, as far as federation cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnDek {
    pub dek: DekRef,
    pub origin: Wrap,
    pub topic: String,
    /// Realms owed a wrap by the origin entry that have none yet.
    pub missing: Vec<Wanted>,
    /// Realms with a wrap.
    pub present: Vec<String>,
}

impl KeyIndex {
    /// An index that waits for `topics` to be read to their end before it
    /// reports [`KeyIndex::is_caught_up`]. `pending_wraps` is registered
    /// as `federation_pending_wraps{realm}`.
    pub fn new(topics: impl IntoIterator<Item = String>, registry: &mut Registry) -> Self {
        let behind: HashSet<String> = topics.into_iter().collect();
        let pending = Family::<RealmLabel, Gauge>::default();
        registry.register(
            "federation_pending_wraps",
            "Federated DEKs (in the keys topics read here) still missing their wrap for a realm",
            pending.clone(),
        );
        let (caught_up, _) = watch::channel(behind.is_empty());
        Self {
            inner: Mutex::new(Inner {
                deks: HashMap::new(),
                behind,
                realms_seen: HashSet::new(),
            }),
            caught_up,
            pending,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply one record read from `topic` (`own`: this edge's own keys topic).
    /// Unknown keys are ignored; a malformed value is skipped with a WARN.
    pub fn apply(&self, own: bool, key: &[u8], value: Option<&[u8]>) {
        let Some((dek, realm)) = parse_record_key(key) else {
            return;
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        match value {
            None => {
                if let Some(d) = inner.deks.get_mut(&dek) {
                    d.wraps.remove(&realm);
                }
            }
            Some(v) => match decode_value(v) {
                Ok(entry) => {
                    let d = inner.deks.entry(dek).or_default();
                    if let KeyEntry::Origin { wanted, topic, .. } = &entry {
                        d.wanted = wanted.clone();
                        d.topic = Some(topic.clone());
                        d.origin_realm = Some(realm.clone());
                        d.own |= own;
                    }
                    d.wraps.insert(realm, entry.wrap().clone());
                    for w in &d.wanted {
                        inner.realms_seen.insert(w.realm.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!(dek = %hex(&dek), %realm, error = %e, "skipping a malformed keys-topic record");
                }
            },
        }
        drop(guard);
        self.update_pending();
    }

    /// Record that `topic` was read to the end it had when reading began
    /// (or does not exist yet).
    pub fn mark_caught_up(&self, topic: &str) {
        let mut inner = self.lock();
        if inner.behind.remove(topic) && inner.behind.is_empty() {
            self.caught_up.send_replace(true);
        }
    }

    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Wait until every keys topic was read to its end, at most `timeout`.
    pub async fn wait_caught_up(&self, timeout: std::time::Duration) -> bool {
        let mut rx = self.caught_up.subscribe();
        let caught_up = tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok());
        caught_up
    }

    /// The DEK's wrap in `realm`, if one was read.
    pub fn wrap_for(&self, dek: &DekRef, realm: &str) -> Option<Wrap> {
        self.lock().deks.get(dek)?.wraps.get(realm).cloned()
    }

    /// The realms the DEK is known to be wrapped for.
    pub fn realms_of(&self, dek: &DekRef) -> Vec<String> {
        self.lock()
            .deks
            .get(dek)
            .map(|d| d.wraps.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The DEKs read from this cluster's own keys topic.
    pub fn own_deks(&self) -> Vec<OwnDek> {
        let inner = self.lock();
        inner
            .deks
            .iter()
            .filter(|(_, d)| d.own)
            .filter_map(|(dek, d)| {
                let origin = d.wraps.get(d.origin_realm.as_ref()?)?.clone();
                Some(OwnDek {
                    dek: *dek,
                    origin,
                    topic: d.topic.clone().unwrap_or_default(),
                    missing: d
                        .wanted
                        .iter()
                        .filter(|w| !d.wraps.contains_key(&w.realm))
                        .cloned()
                        .collect(),
                    present: d.wraps.keys().cloned().collect(),
                })
            })
            .collect()
    }

    /// DEKs read from this cluster's own keys topic still owed a wrap.
    pub fn owed(&self) -> Vec<OwnDek> {
        self.own_deks()
            .into_iter()
            .filter(|d| !d.missing.is_empty())
            .collect()
    }

    /// How many DEKs still miss their wrap for `realm`.
    pub fn pending(&self, realm: &str) -> usize {
        let inner = self.lock();
        inner
            .deks
            .values()
            .filter(|d| d.wanted.iter().any(|w| w.realm == realm) && !d.wraps.contains_key(realm))
            .count()
    }

    fn update_pending(&self) {
        let realms: Vec<String> = self.lock().realms_seen.iter().cloned().collect();
        for realm in realms {
            let n = self.pending(&realm) as i64;
            self.pending.get_or_create(&RealmLabel { realm }).set(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(kms: &str, version: Option<&str>, bytes: &[u8]) -> Wrap {
        Wrap {
            locator: KekLocator {
                kms: kms.into(),
                kek: KekRef {
                    key_id: format!("kek-{kms}"),
                    version: version.map(str::to_string),
                },
            },
            wrapped: bytes.to_vec(),
        }
    }

    #[test]
    fn values_round_trip() {
        let origin = KeyEntry::Origin {
            wrap: wrap("vault-east", Some("2"), b"vault:v2:xyz"),
            wanted: vec![Wanted {
                realm: "aws-west".into(),
                kek: "alias/kek-orders".into(),
            }],
            topic: "orders".into(),
        };
        assert_eq!(
            decode_value(&encode_value(&origin).unwrap()).unwrap(),
            origin
        );
        let w = KeyEntry::Wrapped(wrap("aws-west", None, &[0, 1, 2, 255]));
        assert_eq!(decode_value(&encode_value(&w).unwrap()).unwrap(), w);
        let bytes = encode_value(&w).unwrap();
        for n in 0..bytes.len() {
            assert!(decode_value(&bytes[..n]).is_err(), "truncated at {n}");
        }
    }

    #[test]
    fn record_keys_round_trip_and_foreign_keys_are_ignored() {
        let dek = [0xabu8; DEK_REF_LEN];
        let key = record_key(&dek, "aws-west");
        assert_eq!(parse_record_key(&key), Some((dek, "aws-west".into())));
        assert_eq!(parse_record_key(b"something-else"), None);
        assert_eq!(parse_record_key(b"dek/zz/aws"), None);
        assert_eq!(
            parse_record_key(format!("dek/{}/", hex(&dek)).as_bytes()),
            None
        );
    }

    #[test]
    fn index_tracks_what_is_owed_until_the_wrap_arrives() {
        let mut reg = Registry::default();
        let index = KeyIndex::new(["strait.keys".to_string()], &mut reg);
        assert!(!index.is_caught_up());
        let dek = [7u8; DEK_REF_LEN];
        let origin = KeyEntry::Origin {
            wrap: wrap("vault-east", Some("1"), b"w1"),
            wanted: vec![Wanted {
                realm: "aws-west".into(),
                kek: "alias/k".into(),
            }],
            topic: "t".into(),
        };
        index.apply(
            true,
            &record_key(&dek, "vault-east"),
            Some(&encode_value(&origin).unwrap()),
        );
        assert_eq!(index.pending("aws-west"), 1);
        let owed = index.owed();
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].missing[0].realm, "aws-west");
        let w = KeyEntry::Wrapped(wrap("aws-west", None, b"w2"));
        index.apply(
            false,
            &record_key(&dek, "aws-west"),
            Some(&encode_value(&w).unwrap()),
        );
        assert_eq!(index.pending("aws-west"), 0);
        assert!(index.owed().is_empty());
        assert_eq!(index.wrap_for(&dek, "aws-west").unwrap().wrapped, b"w2");
        index.apply(false, &record_key(&dek, "aws-west"), None);
        assert_eq!(index.pending("aws-west"), 1);
        index.mark_caught_up("strait.keys");
        assert!(index.is_caught_up());
    }

    #[test]
    fn entries_from_another_sites_topic_are_not_this_edges_to_complete() {
        let mut reg = Registry::default();
        let index = KeyIndex::new(Vec::new(), &mut reg);
        assert!(index.is_caught_up());
        let dek = [9u8; DEK_REF_LEN];
        let origin = KeyEntry::Origin {
            wrap: wrap("vault-east", Some("1"), b"w1"),
            wanted: vec![Wanted {
                realm: "aws-west".into(),
                kek: "k".into(),
            }],
            topic: "t".into(),
        };
        index.apply(
            false,
            &record_key(&dek, "vault-east"),
            Some(&encode_value(&origin).unwrap()),
        );
        assert!(index.owed().is_empty());
        assert_eq!(index.pending("aws-west"), 1);
    }
}
