//! Client side of the Strait control plane.
//!
//! - [`ControlClient`]: the gRPC API with failover over every member.
//! - [`watch_edge_config`]: list-then-watch of everything one edge needs,
//!   folded into an [`EdgeSnapshot`], cached on disk (atomic write) and
//!   loaded from there when the control plane is unreachable.
//! - [`spawn_heartbeat`]: periodic write of the Edge resource's status.
//! - [`identity`]: join with a token and renew an X.509 SVID from the
//!   control plane's CA (key generated in memory).
//! - [`svid`]: an edge's or kms-broker's own SVID, joined, cached and
//!   renewed at half-life, published on channels for rustls.

mod args;
mod failover;
pub mod identity;
pub mod live_tls;
pub mod svid;

pub use args::{ControlConnectionArgs, SvidArgs};
pub use failover::FollowedGroup;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_control_state::spec::{
    AuthorizationPolicySpec, DenyListSpec, EdgeMeshSpec, EdgeSpec, EdgeStatus,
    EncryptionPolicySpec, KafkaClusterSpec, KekShredSpec, KmsRealmSpec, MeshPeerSpec,
    TrustBundleSpec, VirtualClusterSpec,
};
use strait_control_state::Kind;
use strait_proto::control as pb;
use strait_proto::control::control_client::ControlClient as PbClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use strait_control_state as state;

pub mod broker;
pub mod plaintext;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no control-plane endpoints given")]
    NoEndpoints,
    #[error("invalid endpoint '{0}': {1}")]
    Endpoint(String, String),
    #[error("control-plane TLS: {0}")]
    Tls(#[from] live_tls::TlsError),
    #[error("{0}")]
    Status(#[from] Status),
    #[error("cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// TLS to the control plane from PEM held in memory (see
/// [`live_tls::TlsSource::from_pem`]): connections announce the roots of
/// `ca_pem` (`certificate_authorities`), so a control node serves the
/// certificate those roots verify.
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    /// Roots that verify the control nodes: the bootstrap CA, or the
    /// output of `straitctl ca bundle --with-server-ca`.
    pub ca_pem: Vec<u8>,
    /// Client identity for mTLS.
    pub cert_pem: Option<Vec<u8>>,
    pub key_pem: Option<Vec<u8>>,
    /// Name to verify in the server certificate (default: endpoint host).
    pub domain: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` of control-plane members (any subset).
    pub endpoints: Vec<String>,
    pub tls: Option<TlsConfig>,
    pub connect_timeout: Duration,
    /// How long one call may take, retries across members included.
    pub request_timeout: Duration,
}

impl ClientConfig {
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Self {
        Self {
            endpoints: endpoints.iter().map(|s| s.as_ref().to_string()).collect(),
            tls: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// gRPC client over several members: a call that fails because the member
/// is down or has no leader moves on to the next member.
#[derive(Clone)]
pub struct ControlClient {
    clients: Arc<Vec<(String, PbClient<Channel>)>>,
    current: Arc<AtomicUsize>,
    retry: Retry,
}

/// Backoff between rounds of [`ControlClient::call`].
#[derive(Clone, Copy, Debug)]
struct Retry {
    deadline: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

/// `d` scaled by a random factor in [0.5, 1.5), so that clients that failed
/// together do not retry together.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>())
}

fn gave_up(last: Status, after: Duration) -> Status {
    Status::new(
        last.code(),
        format!(
            "{} (gave up after {})",
            last.message(),
            humantime::format_duration(after)
        ),
    )
}

/// Whether a failed call may be sent again to another member: the member
/// is down, has no leader, or the connection broke (tonic reports transport
/// errors as UNAVAILABLE or UNKNOWN).
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

impl ControlClient {
    /// A client over plaintext, or over TLS from `cfg.tls` (roots and client
    /// certificate read once; see [`live_tls`]).
    pub fn new(cfg: &ClientConfig) -> Result<Self, ClientError> {
        match &cfg.tls {
            Some(tls) => {
                let source = live_tls::TlsSource::from_pem(tls)?;
                Self::build(cfg, Some((&source, tls.domain.as_deref())))
            }
            None => Self::build(cfg, None),
        }
    }

    /// A client whose connections take their TLS configuration from `tls`
    /// (see [`live_tls`]: with [`live_tls::TlsSource::live`], a renewed
    /// client certificate and refreshed roots reach every new connection);
    /// `cfg.tls` is ignored.
    pub fn with_rustls(cfg: &ClientConfig, tls: live_tls::TlsSource) -> Result<Self, ClientError> {
        Self::build(cfg, Some((&tls, None)))
    }

    /// `tls`: the source and the server name to verify instead of each
    /// endpoint's host.
    fn build(
        cfg: &ClientConfig,
        tls: Option<(&live_tls::TlsSource, Option<&str>)>,
    ) -> Result<Self, ClientError> {
        if cfg.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let mut clients = Vec::new();
        for ep in &cfg.endpoints {
            let endpoint = |e: String| ClientError::Endpoint(ep.clone(), e);
            let channel = match tls {
                Some((source, name)) => {
                    live_tls::channel(ep, source, name, cfg.connect_timeout, None)
                        .map_err(endpoint)?
                }
                None => {
                    let uri = if ep.contains("://") {
                        ep.clone()
                    } else {
                        format!("http://{ep}")
                    };
                    Endpoint::from_shared(uri)
                        .map_err(|e| endpoint(e.to_string()))?
                        .connect_timeout(cfg.connect_timeout)
                        .tcp_nodelay(true)
                        .connect_lazy()
                }
            };
            let client = PbClient::new(channel)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024);
            clients.push((ep.clone(), client));
        }
        Ok(Self {
            clients: Arc::new(clients),
            current: Arc::new(AtomicUsize::new(0)),
            retry: Retry {
                deadline: cfg.request_timeout,
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_secs(1),
            },
        })
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.clients.iter().map(|(e, _)| e.clone()).collect()
    }

    /// Client of one member, the one currently preferred.
    pub fn current(&self) -> (String, PbClient<Channel>) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    /// Moves the preference to the next member.
    pub fn rotate(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `f` against members in turn until one answers with something
    /// other than "unavailable". A round in which every member was
    /// unavailable (no leader yet, an election after a leader died, a member
    /// down) is followed by an exponential backoff with jitter, and the rounds
    /// go on until `request_timeout` has passed since the call began.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(PbClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.clients.len();
        let deadline = tokio::time::Instant::now() + self.retry.deadline;
        let mut backoff = self.retry.backoff_min;
        let mut last = Status::unavailable("no endpoint tried");
        loop {
            let start = self.current.load(Ordering::Relaxed);
            for k in 0..n {
                let i = (start + k) % n;
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(gave_up(last, self.retry.deadline));
                }
                let attempt = tokio::time::timeout(deadline - now, f(self.clients[i].1.clone()));
                match attempt.await {
                    Ok(Ok(r)) => {
                        self.current.store(i, Ordering::Relaxed);
                        return Ok(r.into_inner());
                    }
                    Ok(Err(s)) if retryable(&s) => {
                        tracing::debug!(endpoint = %self.clients[i].0, error = %s, "trying next member");
                        last = Status::new(
                            s.code(),
                            format!("{}: {}", self.clients[i].0, s.message()),
                        );
                    }
                    Ok(Err(s)) => return Err(s),
                    Err(_) => return Err(gave_up(last, self.retry.deadline)),
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(gave_up(last, self.retry.deadline));
            }
            let pause = jittered(backoff).min(deadline - now);
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(self.retry.backoff_max);
            self.rotate();
        }
    }

    pub async fn apply(&self, req: pb::ApplyRequest) -> Result<pb::ApplyResponse, Status> {
        self.call(|mut c| {
            let r = req.clone();
            async move { c.apply(r).await }
        })
        .await
    }

    /// Retried on other members like every call: send `expected_generation`
    /// so that a retry after an unknown outcome cannot switch twice.
    pub async fn failover(&self, req: pb::FailoverRequest) -> Result<pb::Resource, Status> {
        self.call(|mut c| {
            let r = req.clone();
            async move { c.failover(r).await }
        })
        .await
    }

    pub async fn get(&self, kind: &str, name: &str) -> Result<pb::Resource, Status> {
        let req = pb::GetRequest {
            kind: kind.into(),
            name: name.into(),
            stale: false,
        };
        self.call(|mut c| {
            let r = req.clone();
            async move { c.get(r).await }
        })
        .await
    }

    pub async fn list(&self, kind: &str, selector: &str) -> Result<pb::ListResponse, Status> {
        let req = pb::ListRequest {
            kind: kind.into(),
            label_selector: selector.into(),
            stale: false,
        };
        self.call(|mut c| {
            let r = req.clone();
            async move { c.list(r).await }
        })
        .await
    }

    pub async fn delete(&self, kind: &str, name: &str) -> Result<pb::DeleteResponse, Status> {
        let req = pb::DeleteRequest {
            kind: kind.into(),
            name: name.into(),
            expected_revision: None,
        };
        self.call(|mut c| {
            let r = req.clone();
            async move { c.delete(r).await }
        })
        .await
    }

    pub async fn update_status(
        &self,
        kind: &str,
        name: &str,
        status_json: String,
    ) -> Result<pb::Resource, Status> {
        let req = pb::UpdateStatusRequest {
            kind: kind.into(),
            name: name.into(),
            status_json,
        };
        self.call(|mut c| {
            let r = req.clone();
            async move { c.update_status(r).await }
        })
        .await
    }

    pub async fn members(&self) -> Result<pb::MembersResponse, Status> {
        self.call(|mut c| async move { c.members(pb::MembersRequest {}).await })
            .await
    }
}

/// Where the snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotSource {
    ControlPlane,
    Cache,
}

/// Everything one edge needs, as plain serde structs (JSON-able), keyed by
/// resource name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSnapshot {
    pub edge: String,
    /// Control-plane revision this snapshot reflects.
    pub revision: u64,
    pub source: SnapshotSource,
    pub virtual_clusters: BTreeMap<String, VirtualClusterSpec>,
    pub kafka_clusters: BTreeMap<String, KafkaClusterSpec>,
    pub authorization_policies: BTreeMap<String, AuthorizationPolicySpec>,
    pub encryption_policies: BTreeMap<String, EncryptionPolicySpec>,
    pub kms_realms: BTreeMap<String, KmsRealmSpec>,
    pub trust_bundles: BTreeMap<String, TrustBundleSpec>,
    /// Every DenyList: each edge refuses their identities. Absent from
    /// caches written before deny lists existed.
    #[serde(default)]
    pub deny_lists: BTreeMap<String, DenyListSpec>,
    /// This edge's peers (MeshPeers whose `spec.edge` is this edge).
    #[serde(default)]
    pub mesh_peers: BTreeMap<String, MeshPeerSpec>,
    /// `spec.mesh` of this edge's own Edge resource.
    #[serde(default)]
    pub edge_mesh: Option<EdgeMeshSpec>,
    /// Every KekShred: each edge refuses those KEKs both ways.
    #[serde(default)]
    pub kek_shreds: BTreeMap<String, KekShredSpec>,
    /// The FailoverGroups this edge's virtual clusters follow
    /// (`failover_group`), each with the decision in force.
    #[serde(default)]
    pub failover_groups: BTreeMap<String, FollowedGroup>,
}

impl EdgeSnapshot {
    fn same_content(&self, o: &EdgeSnapshot) -> bool {
        self.virtual_clusters == o.virtual_clusters
            && self.kafka_clusters == o.kafka_clusters
            && self.authorization_policies == o.authorization_policies
            && self.encryption_policies == o.encryption_policies
            && self.kms_realms == o.kms_realms
            && self.trust_bundles == o.trust_bundles
            && self.deny_lists == o.deny_lists
            && self.mesh_peers == o.mesh_peers
            && self.edge_mesh == o.edge_mesh
            && self.kek_shreds == o.kek_shreds
            && self.failover_groups == o.failover_groups
    }
}

/// Kinds an edge watches.
pub const EDGE_KINDS: [Kind; 11] = [
    Kind::Edge,
    Kind::FailoverGroup,
    Kind::MeshPeer,
    Kind::VirtualCluster,
    Kind::KafkaCluster,
    Kind::AuthorizationPolicy,
    Kind::EncryptionPolicy,
    Kind::KmsRealm,
    Kind::TrustBundle,
    Kind::DenyList,
    Kind::KekShred,
];

pub fn typed_map<T: serde::de::DeserializeOwned>(
    store: &Store,
    kind: Kind,
    mut keep: impl FnMut(&str, &T) -> bool,
) -> BTreeMap<String, T> {
    store
        .iter()
        .filter(|((k, _), _)| *k == kind)
        .filter_map(|((_, name), stored)| {
            // Specs were validated on write; one that no longer parses (an
            // older client) is skipped rather than breaking the whole edge.
            match serde_json::from_value::<T>(stored.spec.clone()) {
                Ok(t) => Some((name.clone(), t)),
                Err(e) => {
                    tracing::warn!(%kind, %name, error = %e, "skipping resource this client cannot read");
                    None
                }
            }
        })
        .filter(|(name, t)| keep(name, t))
        .collect()
}

/// Selects and types what `edge` needs out of the watched resources.
pub fn build_snapshot(edge: &str, revision: u64, store: &Store) -> EdgeSnapshot {
    let vcs: BTreeMap<String, VirtualClusterSpec> =
        typed_map(store, Kind::VirtualCluster, |_, v: &VirtualClusterSpec| {
            v.edge == edge
        });
    let applies =
        |targets: &[String]| targets.is_empty() || targets.iter().any(|t| vcs.contains_key(t));
    let failover_groups = failover::followed_groups(store, &vcs);
    // Every member of a followed group: the switch is then a status change
    // that needs no other resource.
    let kafka_clusters = typed_map(store, Kind::KafkaCluster, |name, _: &KafkaClusterSpec| {
        vcs.values().any(|v| v.cluster == name)
            || failover_groups.values().any(|g| g.spec.is_member(name))
    });
    let authorization_policies = typed_map(
        store,
        Kind::AuthorizationPolicy,
        |_, p: &AuthorizationPolicySpec| applies(&p.virtual_clusters),
    );
    let encryption_policies = typed_map(
        store,
        Kind::EncryptionPolicy,
        |_, p: &EncryptionPolicySpec| applies(&p.virtual_clusters),
    );
    let kms_realms = typed_map(store, Kind::KmsRealm, |name, _: &KmsRealmSpec| {
        encryption_policies.values().any(|p| {
            p.rules
                .iter()
                .any(|r| r.kms == name || r.also_wrap_for.iter().any(|a| a.kms == name))
        })
    });
    let trust_bundles = typed_map(store, Kind::TrustBundle, |_, _: &TrustBundleSpec| true);
    let deny_lists = typed_map(store, Kind::DenyList, |_, _: &DenyListSpec| true);
    let kek_shreds = typed_map(store, Kind::KekShred, |_, _: &KekShredSpec| true);
    let mesh_peers = typed_map(store, Kind::MeshPeer, |_, p: &MeshPeerSpec| p.edge == edge);
    let edge_mesh = typed_map(store, Kind::Edge, |name, _: &EdgeSpec| name == edge)
        .into_values()
        .next()
        .and_then(|e| e.mesh);
    EdgeSnapshot {
        edge: edge.to_string(),
        revision,
        source: SnapshotSource::ControlPlane,
        virtual_clusters: vcs,
        kafka_clusters,
        authorization_policies,
        encryption_policies,
        kms_realms,
        trust_bundles,
        deny_lists,
        mesh_peers,
        edge_mesh,
        kek_shreds,
        failover_groups,
    }
}

pub fn cache_path(cache_dir: &Path, edge: &str) -> PathBuf {
    cache_dir.join(format!("edge-{edge}.json"))
}

/// Writes the snapshot so that a crash leaves either the old or the new file:
/// temp file, fsync, rename, fsync of the directory.
pub fn write_cache(cache_dir: &Path, snap: &EdgeSnapshot) -> Result<(), ClientError> {
    let path = cache_path(cache_dir, &snap.edge);
    let bytes = serde_json::to_vec_pretty(snap).expect("snapshot serializes");
    write_atomic(cache_dir, &path, &bytes)
}

/// `bytes` into `path` (inside `cache_dir`) so that a crash leaves either
/// the old or the new file: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(cache_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let io = |source| ClientError::Cache {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(cache_dir).map_err(io)?;
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(cache_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn read_cache(cache_dir: &Path, edge: &str) -> Option<EdgeSnapshot> {
    let mut s = read_cached(&cache_path(cache_dir, edge), |s: &EdgeSnapshot| {
        s.edge == edge
    })?;
    s.source = SnapshotSource::Cache;
    Some(s)
}

/// The snapshot cached at `path` if it reads and `owns` it (a cache written
/// for another name is not used); an unreadable one is skipped with a WARN.
pub(crate) fn read_cached<T: serde::de::DeserializeOwned>(
    path: &Path,
    owns: impl FnOnce(&T) -> bool,
) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<T>(&bytes) {
        Ok(s) if owns(&s) => Some(s),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable config cache");
            None
        }
    }
}

#[derive(Clone, Debug)]
pub struct EdgeWatchConfig {
    pub client: ClientConfig,
    pub edge_name: String,
    pub cache_dir: PathBuf,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl EdgeWatchConfig {
    pub fn new<S: AsRef<str>>(endpoints: &[S], edge_name: &str, cache_dir: &Path) -> Self {
        Self {
            client: ClientConfig::new(endpoints),
            edge_name: edge_name.to_string(),
            cache_dir: cache_dir.to_path_buf(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

pub struct EdgeWatch {
    /// `None` until a config is known (from the cache or the control plane).
    pub config: watch::Receiver<Option<Arc<EdgeSnapshot>>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts following the control plane for `edge_name`. The cached snapshot,
/// if any, is published before this returns, so an edge that starts while
/// the control plane is down serves its last config immediately.
pub fn watch_edge_config(cfg: EdgeWatchConfig) -> Result<EdgeWatch, ClientError> {
    let client = ControlClient::new(&cfg.client)?;
    Ok(watch_edge_config_with_client(cfg, client))
}

/// [`watch_edge_config`] over a client built by the caller (e.g.
/// [`ControlClient::with_rustls`]); `cfg.client` is not used.
pub fn watch_edge_config_with_client(cfg: EdgeWatchConfig, client: ControlClient) -> EdgeWatch {
    let cached = read_cache(&cfg.cache_dir, &cfg.edge_name).map(Arc::new);
    let (tx, rx) = watch::channel(cached);
    let task = tokio::spawn(run_edge_watch(cfg, client, tx));
    EdgeWatch { config: rx, task }
}

enum WatchEnd {
    /// The requested revision is gone: list again.
    Relist,
    Failed(Status),
}

/// One resource as watched: its spec and its status (null when it has none).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stored {
    pub spec: serde_json::Value,
    pub status: serde_json::Value,
}

impl From<serde_json::Value> for Stored {
    /// A resource without status.
    fn from(spec: serde_json::Value) -> Stored {
        Stored {
            spec,
            status: serde_json::Value::Null,
        }
    }
}

/// The resources seen so far, by kind and name.
pub type Store = BTreeMap<(Kind, String), Stored>;

/// Lists then watches `kinds` for as long as `keep_going()` holds, calling
/// `on_change(store, revision)` once the initial listing is complete and
/// after every later event. A lost watch is reopened on the next member
/// with backoff; a compacted revision lists again. `connect` is called for
/// every new connection, so credentials read from files there are fresh
/// (a rotated client certificate is used by the next reconnect).
pub async fn follow<C, P, K>(
    connect: C,
    kinds: &[Kind],
    backoff_min: Duration,
    backoff_max: Duration,
    mut keep_going: K,
    mut on_change: P,
) where
    C: Fn() -> Result<ControlClient, ClientError>,
    P: FnMut(&Store, u64),
    K: FnMut() -> bool,
{
    let mut store: Store = BTreeMap::new();
    let mut next_rev = 0u64;
    let mut backoff = backoff_min;
    let mut client: Option<ControlClient> = None;
    loop {
        let c = match client.take().map_or_else(&connect, Ok) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up the control-plane connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        let (endpoint, pb_client) = c.current();
        let started = tokio::time::Instant::now();
        let end = watch_once(kinds, pb_client, &mut store, &mut next_rev, &mut on_change).await;
        match end {
            WatchEnd::Relist => {
                tracing::info!(%endpoint, "watch revision compacted; listing again");
                next_rev = 0;
                client = Some(c);
                continue;
            }
            WatchEnd::Failed(s) => {
                tracing::warn!(%endpoint, error = %s, "control-plane watch lost; reconnecting");
            }
        }
        if !keep_going() {
            return;
        }
        // A fresh client (credentials re-read), preferring the next member.
        if let Ok(fresh) = connect() {
            let n = fresh.endpoints().len();
            let at = c.current.load(Ordering::Relaxed) + 1;
            fresh.current.store(at % n.max(1), Ordering::Relaxed);
            client = Some(fresh);
        } else {
            c.rotate();
            client = Some(c);
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = backoff_min;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(backoff_max);
    }
}

async fn run_edge_watch(
    cfg: EdgeWatchConfig,
    client: ControlClient,
    tx: watch::Sender<Option<Arc<EdgeSnapshot>>>,
) {
    let closed = tx.clone();
    follow(
        || Ok(client.clone()),
        &EDGE_KINDS,
        cfg.backoff_min,
        cfg.backoff_max,
        || !closed.is_closed(),
        |store, revision| publish(&cfg, store, revision, &tx),
    )
    .await
}

async fn watch_once<P: FnMut(&Store, u64)>(
    kinds: &[Kind],
    mut c: PbClient<Channel>,
    store: &mut Store,
    next_rev: &mut u64,
    on_change: &mut P,
) -> WatchEnd {
    let req = pb::WatchRequest {
        kinds: kinds.iter().map(|k| k.as_str().to_string()).collect(),
        label_selector: String::new(),
        start_revision: *next_rev,
    };
    let mut stream = match c.watch(req).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::OutOfRange => return WatchEnd::Relist,
        Err(s) => return WatchEnd::Failed(s),
    };
    let listing = *next_rev == 0;
    let mut fresh: Store = BTreeMap::new();
    let mut synced = !listing;
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return WatchEnd::Failed(Status::unavailable("watch stream ended")),
            Err(s) if s.code() == Code::OutOfRange => return WatchEnd::Relist,
            Err(s) => return WatchEnd::Failed(s),
        };
        let target = if synced { &mut *store } else { &mut fresh };
        match pb::EventType::try_from(ev.r#type) {
            Ok(pb::EventType::Synced) => {
                *store = std::mem::take(&mut fresh);
                synced = true;
                *next_rev = ev.revision + 1;
            }
            Ok(t @ (pb::EventType::Put | pb::EventType::Delete)) => {
                let Some(r) = ev.resource else { continue };
                let Ok(kind) = Kind::parse(&r.kind) else {
                    continue;
                };
                if t == pb::EventType::Put {
                    match serde_json::from_str(&r.spec_json) {
                        Ok(spec) => {
                            // A FailoverGroup's status is the decision its
                            // edges follow; other statuses are kept alike.
                            let status = if r.status_json.is_empty() {
                                serde_json::Value::Null
                            } else {
                                serde_json::from_str(&r.status_json).unwrap_or_else(|e| {
                                    tracing::warn!(error = %e, kind = %kind, name = %r.name, "bad status JSON from control plane");
                                    serde_json::Value::Null
                                })
                            };
                            target.insert((kind, r.name), Stored { spec, status });
                        }
                        Err(e) => tracing::warn!(error = %e, "bad spec JSON from control plane"),
                    }
                } else {
                    target.remove(&(kind, r.name));
                }
                if synced {
                    *next_rev = ev.revision + 1;
                }
            }
            _ => continue,
        }
        if synced {
            on_change(store, next_rev.saturating_sub(1));
        }
    }
}

fn publish(
    cfg: &EdgeWatchConfig,
    store: &Store,
    revision: u64,
    tx: &watch::Sender<Option<Arc<EdgeSnapshot>>>,
) {
    let snap = build_snapshot(&cfg.edge_name, revision, store);
    let unchanged = tx
        .borrow()
        .as_ref()
        .is_some_and(|cur| cur.source == SnapshotSource::ControlPlane && cur.same_content(&snap));
    if unchanged {
        return;
    }
    if let Err(e) = write_cache(&cfg.cache_dir, &snap) {
        tracing::warn!(error = %e, "could not write the config cache");
    }
    tx.send_replace(Some(Arc::new(snap)));
}

#[derive(Clone, Debug)]
pub struct HeartbeatConfig {
    pub client: ClientConfig,
    pub edge_name: String,
    pub interval: Duration,
}

/// Every `interval`, writes `status()` (with the current time) into the
/// Edge resource's status, creating the Edge if it does not exist yet.
pub fn spawn_heartbeat<F>(
    cfg: HeartbeatConfig,
    status: F,
) -> Result<tokio::task::JoinHandle<()>, ClientError>
where
    F: Fn() -> EdgeStatus + Send + 'static,
{
    let client = ControlClient::new(&cfg.client)?;
    Ok(spawn_heartbeat_with_client(cfg, client, status))
}

/// [`spawn_heartbeat`] over a client built by the caller; `cfg.client` is not used.
pub fn spawn_heartbeat_with_client<F>(
    cfg: HeartbeatConfig,
    client: ControlClient,
    status: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> EdgeStatus + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut st = status();
            st.last_heartbeat_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            if let Err(e) = heartbeat_once(&client, &cfg.edge_name, &st).await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    })
}

pub async fn heartbeat_once(
    client: &ControlClient,
    edge: &str,
    status: &EdgeStatus,
) -> Result<(), Status> {
    let json = serde_json::to_string(status).expect("status serializes");
    write_own_status(client, "Edge", edge, json).await
}

/// Writes `status_json` into the status of the caller's own resource
/// `kind`/`name`, creating it (empty spec, `expected_revision: 0`, the only
/// write an edge or broker may make besides its status) if it does not
/// exist yet.
pub async fn write_own_status(
    client: &ControlClient,
    kind: &str,
    name: &str,
    status_json: String,
) -> Result<(), Status> {
    match client.update_status(kind, name, status_json.clone()).await {
        Err(s) if s.code() == Code::NotFound => {
            let create = pb::ApplyRequest {
                resource: Some(pb::Resource {
                    kind: kind.into(),
                    name: name.into(),
                    spec_json: "{}".into(),
                    ..Default::default()
                }),
                expected_revision: Some(0),
            };
            match client.apply(create).await {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => return Err(s),
            }
            client
                .update_status(kind, name, status_json)
                .await
                .map(|_| ())
        }
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(store: &mut Store, key: (Kind, String), spec: serde_json::Value) {
        store.insert(key, spec.into());
    }

    #[test]
    fn snapshot_selects_what_the_edge_needs() {
        let mut store: Store = BTreeMap::new();
        let vc = |edge: &str, cluster: &str| {
            json!({"edge": edge, "cluster": cluster, "bootstrap": "127.0.0.1:19092",
                   "brokers": {"advertised_host": "127.0.0.1", "port_range": "19100-19199"}})
        };
        put(
            &mut store,
            (Kind::VirtualCluster, "a".into()),
            vc("e1", "east"),
        );
        put(
            &mut store,
            (Kind::VirtualCluster, "b".into()),
            vc("e2", "west"),
        );
        put(
            &mut store,
            (Kind::KafkaCluster, "east".into()),
            json!({"bootstrap_servers": ["h:1"]}),
        );
        put(
            &mut store,
            (Kind::KafkaCluster, "west".into()),
            json!({"bootstrap_servers": ["h:2"]}),
        );
        put(
            &mut store,
            (Kind::AuthorizationPolicy, "all".into()),
            json!({"rules": [{"principal": "*", "allow": ["read"], "topics": ["*"]}]}),
        );
        put(
            &mut store,
            (Kind::AuthorizationPolicy, "only-b".into()),
            json!({"virtual_clusters": ["b"], "rules": [{"principal": "*", "allow": ["read"], "topics": ["*"]}]}),
        );
        put(
            &mut store,
            (Kind::EncryptionPolicy, "enc".into()),
            json!({"virtual_clusters": ["a"], "rules": [{"topics": ["*"], "kms": "v", "kek_template": "K"}]}),
        );
        put(
            &mut store,
            (Kind::KmsRealm, "v".into()),
            json!({"provider": "local"}),
        );
        put(
            &mut store,
            (Kind::KmsRealm, "other".into()),
            json!({"provider": "local"}),
        );
        let s = build_snapshot("e1", 9, &store);
        assert_eq!(s.virtual_clusters.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(s.kafka_clusters.keys().collect::<Vec<_>>(), vec!["east"]);
        assert_eq!(
            s.authorization_policies.keys().collect::<Vec<_>>(),
            vec!["all"]
        );
        assert_eq!(
            s.encryption_policies.keys().collect::<Vec<_>>(),
            vec!["enc"]
        );
        assert_eq!(s.kms_realms.keys().collect::<Vec<_>>(), vec!["v"]);

        let dir = tempfile::tempdir().unwrap();
        write_cache(dir.path(), &s).unwrap();
        let back = read_cache(dir.path(), "e1").unwrap();
        assert_eq!(back.source, SnapshotSource::Cache);
        assert!(back.same_content(&s));
        assert!(read_cache(dir.path(), "e2").is_none());
    }

    #[test]
    fn a_followed_failover_group_comes_with_its_status_and_members() {
        let mut store: Store = BTreeMap::new();
        put(
            &mut store,
            (Kind::VirtualCluster, "pay".into()),
            json!({"edge": "e1", "failover_group": "pay", "bootstrap": "127.0.0.1:19092",
                   "brokers": {"advertised_host": "127.0.0.1", "port_range": "19100-19199"}}),
        );
        put(
            &mut store,
            (Kind::FailoverGroup, "pay".into()),
            json!({"primary": "east", "standby": ["west"]}),
        );
        put(
            &mut store,
            (Kind::FailoverGroup, "other".into()),
            json!({"primary": "x", "standby": ["y"]}),
        );
        for c in ["east", "west", "x"] {
            put(
                &mut store,
                (Kind::KafkaCluster, c.into()),
                json!({"bootstrap_servers": ["h:1"]}),
            );
        }
        let s = build_snapshot("e1", 3, &store);
        assert_eq!(s.failover_groups.keys().collect::<Vec<_>>(), vec!["pay"]);
        assert_eq!(s.failover_groups["pay"].active(), ("east", 0));
        assert_eq!(
            s.kafka_clusters.keys().collect::<Vec<_>>(),
            vec!["east", "west"]
        );
        // A failover is a status change, and a change of the snapshot.
        if let Some(g) = store.get_mut(&(Kind::FailoverGroup, "pay".into())) {
            g.status = json!({"active": "west", "generation": 1, "previous": "east",
                              "planned": true, "by": "spiffe://d/admin/a", "at_unix_ms": 5});
        }
        let after = build_snapshot("e1", 4, &store);
        assert_eq!(after.failover_groups["pay"].active(), ("west", 1));
        assert!(!after.same_content(&s));
        let dir = tempfile::tempdir().unwrap();
        write_cache(dir.path(), &after).unwrap();
        assert!(read_cache(dir.path(), "e1").unwrap().same_content(&after));
    }
}
