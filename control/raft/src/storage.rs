//! Durable Raft storage: raft-rs's `MemStorage` serves reads, every mutation
//! is first written to redb and committed with `Durability::Immediate`
//! (fsync) before the in-memory copy changes, so what raft-rs believes is
//! persisted really is.

use std::path::Path;
use std::sync::{Arc, RwLock};

use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_HARD_STATE: &str = "hard_state";
const KEY_SNAPSHOT: &str = "snapshot";
const KEY_BOOTSTRAP_CONF: &str = "bootstrap_conf_state";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    #[error("protobuf: {0}")]
    Protobuf(#[from] protobuf::ProtobufError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

fn redb_err<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Redb(e.into())
}

/// What was on disk at startup.
pub struct Loaded {
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub bootstrap_conf: Option<ConfState>,
}

pub struct DurableLog {
    db: Database,
}

impl DurableLog {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("raft.redb")).map_err(redb_err)?;
        let tx = db.begin_write().map_err(redb_err)?;
        tx.open_table(ENTRIES).map_err(redb_err)?;
        tx.open_table(META).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        Ok(Self { db })
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let meta = tx.open_table(META).map_err(redb_err)?;
        let get = |k: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta.get(k).map_err(redb_err)?.map(|v| v.value().to_vec()))
        };
        let snapshot = match get(KEY_SNAPSHOT)? {
            Some(b) => Some(Snapshot::parse_from_bytes(&b)?),
            None => None,
        };
        let hard_state = match get(KEY_HARD_STATE)? {
            Some(b) => Some(HardState::parse_from_bytes(&b)?),
            None => None,
        };
        let bootstrap_conf = match get(KEY_BOOTSTRAP_CONF)? {
            Some(b) => Some(ConfState::parse_from_bytes(&b)?),
            None => None,
        };
        let table = tx.open_table(ENTRIES).map_err(redb_err)?;
        let mut entries = Vec::new();
        for item in table.iter().map_err(redb_err)? {
            let (_, v) = item.map_err(redb_err)?;
            entries.push(Entry::parse_from_bytes(v.value())?);
        }
        Ok(Loaded {
            snapshot,
            entries,
            hard_state,
            bootstrap_conf,
        })
    }

    pub fn save_bootstrap(&self, cs: &ConfState) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        {
            let mut meta = tx.open_table(META).map_err(redb_err)?;
            meta.insert(KEY_BOOTSTRAP_CONF, cs.write_to_bytes()?.as_slice())
                .map_err(redb_err)?;
        }
        tx.commit().map_err(redb_err)?;
        Ok(())
    }

    /// One fsynced transaction per Ready: new entries (replacing any
    /// conflicting suffix), the hard state, and an installed snapshot.
    pub fn persist(
        &self,
        entries: &[Entry],
        hs: Option<&HardState>,
        snapshot: Option<&Snapshot>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        {
            let mut table = tx.open_table(ENTRIES).map_err(redb_err)?;
            let mut meta = tx.open_table(META).map_err(redb_err)?;
            if let Some(snap) = snapshot {
                // An installed snapshot replaces the whole log.
                table.retain(|_, _| false).map_err(redb_err)?;
                meta.insert(KEY_SNAPSHOT, snap.write_to_bytes()?.as_slice())
                    .map_err(redb_err)?;
            }
            if let Some(first) = entries.first() {
                table
                    .retain_in(first.index.., |_, _| false)
                    .map_err(redb_err)?;
                for e in entries {
                    table
                        .insert(e.index, e.write_to_bytes()?.as_slice())
                        .map_err(redb_err)?;
                }
            }
            if let Some(hs) = hs {
                meta.insert(KEY_HARD_STATE, hs.write_to_bytes()?.as_slice())
                    .map_err(redb_err)?;
            }
        }
        tx.commit().map_err(redb_err)?;
        Ok(())
    }

    /// Stores a locally taken snapshot and drops log entries before its index
    /// (the entry at the index stays so its term remains known).
    pub fn compact(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let idx = snap.get_metadata().index;
        let tx = self.db.begin_write().map_err(redb_err)?;
        {
            let mut meta = tx.open_table(META).map_err(redb_err)?;
            meta.insert(KEY_SNAPSHOT, snap.write_to_bytes()?.as_slice())
                .map_err(redb_err)?;
            let mut table = tx.open_table(ENTRIES).map_err(redb_err)?;
            table.retain_in(..idx, |_, _| false).map_err(redb_err)?;
        }
        tx.commit().map_err(redb_err)?;
        Ok(())
    }
}

/// The `Storage` raft-rs reads from. Entries and hard state come from
/// `MemStorage`; snapshots are the ones the node took or installed, with the
/// state machine's data (MemStorage only fabricates metadata).
#[derive(Clone)]
pub struct NodeStorage {
    pub mem: MemStorage,
    pub snapshot: Arc<RwLock<Option<Snapshot>>>,
    /// Set when a peer needs a snapshot the stored one cannot serve (taken
    /// before that peer joined); the ready loop then takes a fresh one.
    pub want_snapshot: Arc<std::sync::atomic::AtomicBool>,
}

impl NodeStorage {
    pub fn new() -> Self {
        Self {
            mem: MemStorage::new(),
            snapshot: Arc::new(RwLock::new(None)),
            want_snapshot: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot
            .read()
            .expect("snapshot lock")
            .as_ref()
            .map(|s| s.get_metadata().index)
            .unwrap_or(0)
    }
}

impl Default for NodeStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl Storage for NodeStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        match self.mem.term(idx) {
            Err(raft::Error::Store(raft::StorageError::Compacted)) => {
                let snap = self.snapshot.read().expect("snapshot lock");
                match snap.as_ref() {
                    Some(s) if s.get_metadata().index == idx => Ok(s.get_metadata().term),
                    _ => Err(raft::Error::Store(raft::StorageError::Compacted)),
                }
            }
            other => other,
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if let Some(s) = self.snapshot.read().expect("snapshot lock").as_ref() {
            let cs = s.get_metadata().get_conf_state();
            let knows_peer = cs.voters.contains(&to) || cs.learners.contains(&to);
            if knows_peer && s.get_metadata().index >= request_index {
                return Ok(s.clone());
            }
        }
        self.want_snapshot
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    #[test]
    fn persist_truncate_compact_reload() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = DurableLog::open(dir.path()).unwrap();
            log.persist(&[entry(1, 1), entry(2, 1), entry(3, 1)], None, None)
                .unwrap();
            // A new leader overwrites the conflicting suffix from index 2.
            let hs = HardState {
                term: 2,
                commit: 2,
                ..Default::default()
            };
            log.persist(&[entry(2, 2)], Some(&hs), None).unwrap();
        }
        let log = DurableLog::open(dir.path()).unwrap();
        let loaded = log.load().unwrap();
        let idx: Vec<(u64, u64)> = loaded.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(idx, vec![(1, 1), (2, 2)]);
        assert_eq!(loaded.hard_state.unwrap().term, 2);

        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 2;
        snap.mut_metadata().term = 2;
        snap.data = b"state".to_vec().into();
        log.compact(&snap).unwrap();
        let loaded = log.load().unwrap();
        assert_eq!(loaded.entries.len(), 1);
        assert_eq!(loaded.snapshot.unwrap().data.as_ref(), b"state");
    }
}
