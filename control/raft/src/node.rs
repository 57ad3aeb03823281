use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use protobuf::Message as PbMessage;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, HardState, Message, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use strait_control_state::{Command, CommandError, Event, Outcome, State};
use tokio::sync::{broadcast, oneshot, watch};

use crate::metrics::RaftMetrics;
use crate::storage::{DurableLog, NodeStorage, StoreError};
use crate::transport::{RaftService, Transport};

/// How this node connects to its peers over TLS: a function giving the
/// client configuration for the next connection, so that the certificate
/// it presents and the roots it verifies peers against (bootstrap CA plus
/// the CA's bundle) can change while the node runs.
#[derive(Clone)]
pub struct TlsClientConfig(pub Arc<dyn Fn() -> Arc<rustls::ClientConfig> + Send + Sync>);

impl std::fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClientConfig")
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u64,
    /// Address peers use to reach this node.
    pub advertise_addr: String,
    pub data_dir: PathBuf,
    /// Initial members (id -> address). Used to bootstrap an empty store
    /// unless `join` is set.
    pub peers: BTreeMap<u64, String>,
    /// Start empty and wait to be added by the existing cluster.
    pub join: bool,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log every this many applied entries.
    pub snapshot_threshold: u64,
    /// Watch events kept for resumption.
    pub watch_history: usize,
    pub proposal_timeout: Duration,
    pub tls: Option<TlsClientConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("no leader is known right now; retry")]
    NoLeader,
    #[error("timed out waiting for the proposal to commit (outcome unknown)")]
    Timeout,
    #[error("membership change rejected: {0}")]
    Membership(String),
    #[error("node is shutting down")]
    Shutdown,
    #[error("the leader changed while the proposal was pending (outcome unknown); retry")]
    LeaderChanged,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub role: String,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub first_log_index: u64,
    pub snapshots_installed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub addr: String,
    pub is_voter: bool,
}

/// What watchers receive. `Reset` means the local state jumped (a snapshot was
/// installed): resume from the last seen revision.
#[derive(Clone, Debug)]
pub enum WatchSignal {
    Event(Arc<Event>),
    Reset,
}

pub(crate) enum Input {
    Peer {
        from_id: u64,
        from_addr: String,
        msgs: Vec<Message>,
    },
    Propose {
        cmd: Vec<u8>,
        reply: oneshot::Sender<Result<Outcome, ProposeError>>,
    },
    ConfChange {
        cc: ConfChange,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    Unreachable(u64),
    SnapshotStatus(u64, bool),
    Shutdown,
}

pub(crate) struct Shared {
    pub(crate) partitioned: AtomicBool,
    state: RwLock<State>,
    events: broadcast::Sender<WatchSignal>,
    status: Mutex<NodeStatus>,
    members: RwLock<BTreeMap<u64, String>>,
    voters: RwLock<Vec<u64>>,
    applied: watch::Sender<u64>,
}

/// Handle to a running node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    id: u64,
    shared: Arc<Shared>,
    inbox: std::sync::mpsc::Sender<Input>,
    proposal_timeout: Duration,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    state: State,
    members: BTreeMap<u64, String>,
}

enum Waiter {
    Cmd(oneshot::Sender<Result<Outcome, ProposeError>>),
    Conf(oneshot::Sender<Result<(), ProposeError>>),
}

fn ctx_bytes(node: u64, seq: u64) -> Vec<u8> {
    let mut v = node.to_be_bytes().to_vec();
    v.extend_from_slice(&seq.to_be_bytes());
    v
}

fn parse_ctx(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() != 16 {
        return None;
    }
    let node = u64::from_be_bytes(b[..8].try_into().ok()?);
    let seq = u64::from_be_bytes(b[8..].try_into().ok()?);
    Some((node, seq))
}

impl Node {
    /// Opens (or bootstraps) the store under `cfg.data_dir` and starts the
    /// ready loop. Must be called inside a tokio runtime (transport tasks).
    pub fn start(cfg: NodeConfig, metrics: RaftMetrics) -> Result<(Node, RaftService), StoreError> {
        let log = DurableLog::open(&cfg.data_dir)?;
        let mut loaded = log.load()?;
        let storage = NodeStorage::new();
        let mut state = State::new(cfg.watch_history);
        let mut members = cfg.peers.clone();
        let mut applied = 0;
        let fresh = loaded.snapshot.is_none()
            && loaded.entries.is_empty()
            && loaded.hard_state.is_none()
            && loaded.bootstrap_conf.is_none();
        if fresh && !cfg.join {
            // Bootstrap as an installed snapshot at index 1 (as raft-rs's own
            // examples do) rather than a bare conf state: the initial voters
            // and their addresses then reach every later member through a
            // snapshot, whether or not the log was ever compacted.
            let data = serde_json::to_vec(&SnapshotDataRef {
                state: &state,
                members: &cfg.peers,
            })
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
            let mut snap = Snapshot {
                data: data.into(),
                ..Default::default()
            };
            let meta = snap.mut_metadata();
            meta.index = 1;
            meta.term = 1;
            meta.mut_conf_state().voters = cfg.peers.keys().copied().collect();
            log.persist(&[], None, Some(&snap))?;
            loaded.snapshot = Some(snap);
        } else if let Some(cs) = loaded.bootstrap_conf.clone() {
            if loaded.snapshot.is_none() {
                storage.mem.initialize_with_conf_state(cs);
            }
        }
        let mut snap_index = 0;
        if let Some(snap) = loaded.snapshot.clone() {
            snap_index = snap.get_metadata().index;
            let data: SnapshotData = serde_json::from_slice(&snap.data)
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
            state = data.state;
            state.set_history_limit(cfg.watch_history);
            members.extend(data.members);
            applied = snap_index;
            storage.mem.wl().apply_snapshot(snap.clone())?;
            *storage.snapshot.write().expect("snapshot lock") = Some(snap);
        }
        let entries: Vec<Entry> = loaded
            .entries
            .into_iter()
            .filter(|e| e.index > snap_index)
            .collect();
        storage.mem.wl().append(&entries)?;
        if let Some(mut hs) = loaded.hard_state {
            hs.commit = hs.commit.max(snap_index);
            storage.mem.wl().set_hardstate(hs);
        }

        let mut rcfg = raft::Config::new(cfg.id);
        rcfg.election_tick = cfg.election_ticks;
        rcfg.heartbeat_tick = cfg.heartbeat_ticks;
        rcfg.applied = applied;
        rcfg.pre_vote = true;
        rcfg.check_quorum = true;
        rcfg.max_size_per_msg = 1024 * 1024;
        rcfg.max_inflight_msgs = 256;
        rcfg.max_committed_size_per_ready = 16 * 1024 * 1024;
        rcfg.validate()?;
        let logger = crate::logger::raft_logger(cfg.id);
        let raw = RawNode::new(&rcfg, storage.clone(), &logger)?;

        let (events, _) = broadcast::channel(16 * 1024);
        let (applied_tx, _) = watch::channel(applied);
        let shared = Arc::new(Shared {
            partitioned: AtomicBool::new(false),
            state: RwLock::new(state),
            events,
            status: Mutex::new(NodeStatus {
                id: cfg.id,
                ..NodeStatus::default()
            }),
            members: RwLock::new(members.clone()),
            voters: RwLock::new(raw.raft.prs().conf().voters().ids().iter().collect()),
            applied: applied_tx,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let transport = Transport::new(
            cfg.id,
            cfg.advertise_addr.clone(),
            tokio::runtime::Handle::current(),
            cfg.tls.clone(),
            tx.clone(),
            shared.clone(),
        );
        for (id, addr) in &members {
            transport.set_addr(*id, addr);
        }
        let mut lp = Loop {
            cfg: cfg.clone(),
            raw,
            storage,
            log,
            shared: shared.clone(),
            transport,
            waiters: HashMap::new(),
            reads: HashMap::new(),
            seq: 0,
            snapshot_index: snap_index,
            snapshots_installed: 0,
            ticks: 0,
            removed_self: false,
            metrics,
        };
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}", cfg.id))
            .spawn(move || lp.run(rx))
            .map_err(StoreError::Io)?;
        let node = Node {
            id: cfg.id,
            shared: shared.clone(),
            inbox: tx.clone(),
            proposal_timeout: cfg.proposal_timeout,
            thread: Arc::new(Mutex::new(Some(thread))),
        };
        let svc = RaftService { inbox: tx, shared };
        Ok((node, svc))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Replicates `cmd` and returns its outcome once applied locally.
    pub async fn propose(&self, cmd: &Command) -> Result<Outcome, ProposeError> {
        strait_control_state::validate_command(cmd)?;
        let data = serde_json::to_vec(cmd).expect("commands serialize");
        let (reply, rx) = oneshot::channel();
        self.inbox
            .send(Input::Propose { cmd: data, reply })
            .map_err(|_| ProposeError::Shutdown)?;
        match tokio::time::timeout(self.proposal_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Shutdown),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// Linearizable read barrier (ReadIndex): returns once this replica has
    /// applied everything committed before the call.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + self.proposal_timeout;
        let (reply, rx) = oneshot::channel();
        self.inbox
            .send(Input::ReadIndex { reply })
            .map_err(|_| ProposeError::Shutdown)?;
        let index = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(ProposeError::Shutdown),
            Err(_) => return Err(ProposeError::Timeout),
        };
        let mut applied = self.shared.applied.subscribe();
        let res = tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= index))
            .await
            .map(|r| r.map(|_| ()));
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ProposeError::Shutdown),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// Read access to the local replica. Subscribe to events while holding
    /// the guard to get a gap-free list-then-watch.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        self.shared.state.read().expect("state lock")
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WatchSignal> {
        self.shared.events.subscribe()
    }

    pub fn status(&self) -> NodeStatus {
        self.shared.status.lock().expect("status lock").clone()
    }

    pub fn members(&self) -> Vec<MemberInfo> {
        let voters = self.shared.voters.read().expect("voters lock").clone();
        let members = self.shared.members.read().expect("members lock");
        let mut out: Vec<MemberInfo> = voters
            .iter()
            .map(|id| MemberInfo {
                id: *id,
                addr: members.get(id).cloned().unwrap_or_default(),
                is_voter: true,
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }

    pub fn leader_addr(&self) -> Option<String> {
        let leader = self.status().leader_id;
        self.shared
            .members
            .read()
            .expect("members lock")
            .get(&leader)
            .cloned()
    }

    pub async fn add_member(&self, id: u64, addr: &str) -> Result<(), ProposeError> {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = id;
        cc.context = addr.as_bytes().to_vec().into();
        self.conf_change(cc).await
    }

    pub async fn remove_member(&self, id: u64) -> Result<(), ProposeError> {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::RemoveNode);
        cc.node_id = id;
        self.conf_change(cc).await
    }

    async fn conf_change(&self, cc: ConfChange) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.inbox
            .send(Input::ConfChange { cc, reply })
            .map_err(|_| ProposeError::Shutdown)?;
        match tokio::time::timeout(self.proposal_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Shutdown),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// Test hook: drop all Raft traffic of this node.
    pub fn set_partitioned(&self, on: bool) {
        self.shared.partitioned.store(on, Ordering::Relaxed);
    }

    pub fn shutdown(&self) {
        let _ = self.inbox.send(Input::Shutdown);
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

struct Loop {
    cfg: NodeConfig,
    raw: RawNode<NodeStorage>,
    storage: NodeStorage,
    log: DurableLog,
    shared: Arc<Shared>,
    transport: Transport,
    waiters: HashMap<u64, Waiter>,
    reads: HashMap<Vec<u8>, oneshot::Sender<Result<u64, ProposeError>>>,
    seq: u64,
    snapshot_index: u64,
    snapshots_installed: u64,
    ticks: u64,
    removed_self: bool,
    metrics: RaftMetrics,
}

static READ_SEQ: AtomicU64 = AtomicU64::new(1);

impl Loop {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<Input>) {
        let single = self.raw.raft.prs().conf().voters().ids().len() == 1
            && self.raw.raft.prs().conf().voters().contains(self.cfg.id);
        if single {
            // A one-node group elects itself without waiting for a timeout.
            let _ = self.raw.campaign();
        }
        let mut next_tick = Instant::now() + self.cfg.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(input) => {
                    if !self.handle(input) {
                        break;
                    }
                    let mut n = 0;
                    while n < 4096 {
                        match rx.try_recv() {
                            Ok(input) => {
                                if !self.handle(input) {
                                    return;
                                }
                            }
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.ticks += 1;
                if self.ticks.is_multiple_of(64) {
                    // Callers give up after their timeout; forget proposals
                    // and reads nobody waits for any more (e.g. forwarded to
                    // a leader that died).
                    self.waiters.retain(|_, w| match w {
                        Waiter::Cmd(r) => !r.is_closed(),
                        Waiter::Conf(r) => !r.is_closed(),
                    });
                    self.reads.retain(|_, r| !r.is_closed());
                }
                self.raw.tick();
                next_tick += self.cfg.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.cfg.tick;
                }
            }
            if let Err(e) = self.on_ready().and_then(|_| self.maybe_compact()) {
                // Losing durability is not recoverable: stop rather than
                // acknowledge writes that are not on disk.
                tracing::error!(error = %e, "raft storage failure; stopping node");
                std::process::exit(70);
            }
        }
    }

    fn next_ctx(&mut self) -> (u64, Vec<u8>) {
        self.seq += 1;
        (self.seq, ctx_bytes(self.cfg.id, self.seq))
    }

    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Peer {
                from_id,
                from_addr,
                msgs,
            } => {
                if self.shared.partitioned.load(Ordering::Relaxed) {
                    return true;
                }
                self.transport.learn_addr(from_id, &from_addr);
                for m in msgs {
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(error = %e, "step failed");
                    }
                }
            }
            Input::Propose { cmd, reply } => {
                let (seq, ctx) = self.next_ctx();
                self.metrics.proposals.inc();
                match self.raw.propose(ctx, cmd) {
                    Ok(()) => {
                        self.waiters.insert(seq, Waiter::Cmd(reply));
                    }
                    Err(_) => {
                        self.metrics.proposals_dropped.inc();
                        let _ = reply.send(Err(ProposeError::NoLeader));
                    }
                }
            }
            Input::ConfChange { cc, reply } => {
                let (seq, ctx) = self.next_ctx();
                match self.raw.propose_conf_change(ctx, cc) {
                    Ok(()) => {
                        self.waiters.insert(seq, Waiter::Conf(reply));
                    }
                    Err(e) => {
                        let err = match e {
                            raft::Error::ProposalDropped => ProposeError::NoLeader,
                            other => ProposeError::Membership(other.to_string()),
                        };
                        let _ = reply.send(Err(err));
                    }
                }
            }
            Input::ReadIndex { reply } => {
                if self.raw.raft.leader_id == raft::INVALID_ID {
                    let _ = reply.send(Err(ProposeError::NoLeader));
                } else {
                    // The leader keys pending reads by context and drops a
                    // duplicate, so contexts must be unique across nodes.
                    let seq = READ_SEQ.fetch_add(1, Ordering::Relaxed);
                    let ctx = ctx_bytes(self.cfg.id, seq);
                    self.raw.read_index(ctx.clone());
                    self.reads.insert(ctx, reply);
                }
            }
            Input::Unreachable(id) => self.raw.report_unreachable(id),
            Input::SnapshotStatus(id, ok) => {
                let st = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(id, st);
            }
            Input::Shutdown => return false,
        }
        true
    }

    fn on_ready(&mut self) -> Result<(), StoreError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            let prev_leader = self.shared.status.lock().expect("status lock").leader_id;
            if ss.leader_id != prev_leader {
                self.metrics.leader_changes.inc();
            }
            if ss.leader_id != prev_leader && prev_leader != raft::INVALID_ID {
                // Proposals forwarded to the old leader may be lost; answer
                // now instead of letting callers wait for their timeout.
                // Membership changes keep waiting: they are rare and slow.
                let cmds: Vec<u64> = self
                    .waiters
                    .iter()
                    .filter(|(_, w)| matches!(w, Waiter::Cmd(_)))
                    .map(|(k, _)| *k)
                    .collect();
                for k in cmds {
                    if let Some(Waiter::Cmd(r)) = self.waiters.remove(&k) {
                        let _ = r.send(Err(ProposeError::LeaderChanged));
                    }
                }
            }
            let mut st = self.shared.status.lock().expect("status lock");
            st.leader_id = ss.leader_id;
            st.role = format!("{:?}", ss.raft_state);
            if ss.raft_state != StateRole::Leader {
                // Reads queued on a former leader will never be answered.
                for (_, r) in self.reads.drain() {
                    let _ = r.send(Err(ProposeError::NoLeader));
                }
            }
        }
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        let snapshot = if !ready.snapshot().is_empty() {
            Some(ready.snapshot().clone())
        } else {
            None
        };
        let entries = ready.take_entries();
        let hs: Option<HardState> = ready.hs().cloned();
        if snapshot.is_some() || !entries.is_empty() || hs.is_some() {
            let t0 = Instant::now();
            self.log.persist(&entries, hs.as_ref(), snapshot.as_ref())?;
            self.metrics
                .persist_seconds
                .observe(t0.elapsed().as_secs_f64());
            if !entries.is_empty() {
                self.metrics.entries_per_ready.observe(entries.len() as f64);
            }
        }
        if let Some(snap) = snapshot {
            self.install_snapshot(snap)?;
        }
        if !entries.is_empty() {
            self.storage.mem.wl().append(&entries)?;
        }
        if let Some(hs) = hs {
            self.storage.mem.wl().set_hardstate(hs);
        }
        for rs in ready.take_read_states() {
            if let Some(r) = self.reads.remove(rs.request_ctx.as_slice()) {
                let _ = r.send(Ok(rs.index));
            }
        }
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.mem.wl().mut_hard_state().commit = commit;
        }
        self.transport.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();
        if std::mem::take(&mut self.removed_self) && self.raw.raft.state == StateRole::Leader {
            // A removed leader would keep heartbeating the others and block
            // a new election: hand leadership to the most up-to-date voter.
            let target = self
                .raw
                .raft
                .prs()
                .conf()
                .voters()
                .ids()
                .iter()
                .filter(|id| *id != self.cfg.id)
                .max_by_key(|id| self.raw.raft.prs().get(*id).map(|p| p.matched).unwrap_or(0));
            if let Some(t) = target {
                tracing::info!(to = t, "transferring leadership after own removal");
                self.raw.transfer_leader(t);
            }
        }
        self.publish_status();
        Ok(())
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), StoreError> {
        let data: SnapshotData = serde_json::from_slice(&snap.data)
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let idx = snap.get_metadata().index;
        self.storage.mem.wl().apply_snapshot(snap.clone())?;
        *self.storage.snapshot.write().expect("snapshot lock") = Some(snap.clone());
        self.snapshot_index = idx;
        self.snapshots_installed += 1;
        self.metrics.snapshots_installed.inc();
        for (id, addr) in &data.members {
            self.transport.set_addr(*id, addr);
        }
        *self.shared.members.write().expect("members lock") = data.members;
        *self.shared.voters.write().expect("voters lock") =
            snap.get_metadata().get_conf_state().voters.clone();
        {
            let mut state = self.shared.state.write().expect("state lock");
            *state = data.state;
            state.set_history_limit(self.cfg.watch_history);
            let _ = self.shared.events.send(WatchSignal::Reset);
        }
        self.shared.applied.send_replace(idx);
        tracing::info!(index = idx, "installed snapshot");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        self.metrics.applied_entries.inc_by(entries.len() as u64);
        for e in entries {
            let own = parse_ctx(&e.context).filter(|(n, _)| *n == self.cfg.id);
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        // Leader's empty entry, or a conf change raft-rs
                        // refused and replaced by an empty entry.
                        if let Some((_, seq)) = own {
                            match self.waiters.remove(&seq) {
                                Some(Waiter::Conf(r)) => {
                                    let _ = r.send(Err(ProposeError::Membership(
                                        "another membership change is in progress".into(),
                                    )));
                                }
                                Some(Waiter::Cmd(r)) => {
                                    let _ = r.send(Ok(Outcome::Noop));
                                }
                                None => {}
                            }
                        }
                        continue;
                    }
                    let result = match serde_json::from_slice::<Command>(&e.data) {
                        Ok(cmd) => {
                            let mut state = self.shared.state.write().expect("state lock");
                            let (res, events) = state.apply(&cmd);
                            for ev in events {
                                let _ = self.shared.events.send(WatchSignal::Event(Arc::new(ev)));
                            }
                            res
                        }
                        Err(err) => {
                            tracing::error!(index = e.index, error = %err, "undecodable command");
                            Ok(Outcome::Noop)
                        }
                    };
                    if let Some((_, seq)) = own {
                        if let Some(Waiter::Cmd(r)) = self.waiters.remove(&seq) {
                            let _ = r.send(result.map_err(ProposeError::Command));
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    {
                        let mut members = self.shared.members.write().expect("members lock");
                        match cc.get_change_type() {
                            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                                let addr = String::from_utf8_lossy(&cc.context).to_string();
                                if !addr.is_empty() {
                                    self.transport.set_addr(cc.node_id, &addr);
                                    members.insert(cc.node_id, addr);
                                }
                            }
                            ConfChangeType::RemoveNode => {
                                members.remove(&cc.node_id);
                                if cc.node_id == self.cfg.id {
                                    tracing::warn!("this node was removed from the cluster");
                                    self.removed_self = true;
                                }
                            }
                        }
                    }
                    *self.shared.voters.write().expect("voters lock") = cs.voters.clone();
                    self.storage.mem.wl().set_conf_state(cs);
                    tracing::info!(change = ?cc.get_change_type(), node = cc.node_id, "membership changed");
                    if let Some((_, seq)) = own {
                        if let Some(Waiter::Conf(r)) = self.waiters.remove(&seq) {
                            let _ = r.send(Ok(()));
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(index = e.index, "ignoring unsupported ConfChangeV2 entry");
                }
            }
        }
        self.shared.applied.send_replace(last);
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), StoreError> {
        let applied = self.raw.raft.raft_log.applied;
        let last = self.storage.mem.rl().hard_state().commit;
        let persisted_last = raft::Storage::last_index(&self.storage).unwrap_or(0);
        let idx = applied.min(last).min(persisted_last);
        let forced = self.storage.want_snapshot.load(Ordering::Relaxed);
        if idx <= self.snapshot_index
            || (!forced && idx - self.snapshot_index < self.cfg.snapshot_threshold)
        {
            return Ok(());
        }
        let term = raft::Storage::term(&self.storage, idx)?;
        let data = {
            let state = self.shared.state.read().expect("state lock");
            let members = self.shared.members.read().expect("members lock");
            serde_json::to_vec(&SnapshotDataRef {
                state: &state,
                members: &members,
            })
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
        };
        // The state machine is at `applied`; only snapshot when that is the
        // index we are recording.
        if idx != applied {
            return Ok(());
        }
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = idx;
        meta.term = term;
        meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
        self.log.compact(&snap)?;
        *self.storage.snapshot.write().expect("snapshot lock") = Some(snap);
        self.storage.mem.wl().compact(idx)?;
        self.snapshot_index = idx;
        self.storage.want_snapshot.store(false, Ordering::Relaxed);
        self.metrics.snapshots_taken.inc();
        tracing::debug!(index = idx, "took snapshot and compacted the log");
        Ok(())
    }

    fn publish_status(&self) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.metrics.term.set(g(self.raw.raft.term));
        self.metrics
            .commit_index
            .set(g(self.raw.raft.raft_log.committed));
        self.metrics
            .applied_index
            .set(g(self.raw.raft.raft_log.applied));
        self.metrics
            .is_leader
            .set(i64::from(self.raw.raft.state == StateRole::Leader));
        let mut st = self.shared.status.lock().expect("status lock");
        st.term = self.raw.raft.term;
        st.leader_id = self.raw.raft.leader_id;
        st.role = format!("{:?}", self.raw.raft.state);
        st.commit_index = self.raw.raft.raft_log.committed;
        st.applied_index = self.raw.raft.raft_log.applied;
        st.snapshot_index = self.snapshot_index;
        st.first_log_index = raft::Storage::first_index(&self.storage).unwrap_or(0);
        st.snapshots_installed = self.snapshots_installed;
    }
}

#[derive(Serialize)]
struct SnapshotDataRef<'a> {
    state: &'a State,
    members: &'a BTreeMap<u64, String>,
}
