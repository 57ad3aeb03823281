//! gRPC services of a control-plane node: the `Control` admin/watch API and
//! gRPC health. Writes go through Raft (followers forward proposals to the
//! leader inside raft-rs); reads are linearizable (ReadIndex) unless the
//! caller asks for a stale read. Every call is authorized by [`access`]
//! from the caller's certificate; writes and refusals are audited.
//!
//! [`identity`]: the `Identity` service (the mesh's CA); [`tls`]: the
//! listener used when the node runs the CA.

mod failover;
pub mod failover_controller;
pub mod identity;
pub mod node_tls;
pub mod tls;

pub mod access;

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use strait_control_raft::{Node, ProposeError, WatchSignal};
use strait_control_state::{self as st, Command, CommandError, Kind, Outcome, Selector};
use strait_proto::control as pb;
use strait_proto::control::control_server::{Control, ControlServer};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use access::{Access, Authorizer, ControlMethod as C, EdgeScope, Grants, Operation};

pub const SERVICE_NAME: &str = "strait.control.v1.Control";

pub fn to_pb(r: &st::Resource) -> pb::Resource {
    pb::Resource {
        kind: r.kind.as_str().to_string(),
        name: r.name.clone(),
        labels: r.labels.clone().into_iter().collect(),
        spec_json: r.spec.to_string(),
        status_json: if r.status.is_null() {
            String::new()
        } else {
            r.status.to_string()
        },
        revision: r.revision,
        create_revision: r.create_revision,
    }
}

fn parse_kind(s: &str) -> Result<Kind, Status> {
    Kind::parse(s).map_err(Status::invalid_argument)
}

fn parse_json(field: &str, s: &str) -> Result<serde_json::Value, Status> {
    if s.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    serde_json::from_str(s)
        .map_err(|e| Status::invalid_argument(format!("{field}: invalid JSON: {e}")))
}

pub fn status_of(e: ProposeError) -> Status {
    match e {
        ProposeError::Command(c) => match &c {
            CommandError::Invalid { .. } => Status::invalid_argument(c.to_string()),
            CommandError::NotFound { .. } => Status::not_found(c.to_string()),
            CommandError::AlreadyExists { .. } => Status::already_exists(c.to_string()),
            CommandError::Conflict { .. } | CommandError::GenerationConflict { .. } => {
                Status::aborted(c.to_string())
            }
            CommandError::Irreversible { .. } => Status::failed_precondition(c.to_string()),
        },
        ProposeError::NoLeader | ProposeError::Shutdown | ProposeError::LeaderChanged => {
            Status::unavailable(e.to_string())
        }
        ProposeError::Timeout => Status::deadline_exceeded(e.to_string()),
        ProposeError::Membership(_) => Status::failed_precondition(e.to_string()),
    }
}

pub struct ControlService {
    node: Node,
    test_hooks: bool,
    authz: Authorizer,
    watchers: prometheus_client::metrics::gauge::Gauge,
}

fn ctl(m: C) -> Operation {
    Operation::Control(m)
}

/// What one caller may read, resolved against the state it reads from.
struct ReadFilter {
    grants: Grants,
    scope: Option<EdgeScope>,
}

impl ReadFilter {
    fn new(grants: Grants, state: &st::State) -> ReadFilter {
        let scope = grants
            .scoped_edge()
            .map(|e| EdgeScope::of(e, state.list(None, &Selector::default())));
        ReadFilter { grants, scope }
    }

    fn visible(&self, kind: Kind, name: &str) -> bool {
        self.grants.reads_all_of(kind)
            || (self.grants.edge.is_some()
                && self.scope.as_ref().is_some_and(|s| s.contains(kind, name)))
    }
}

struct WatcherGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ControlService {
    pub fn new(
        node: Node,
        test_hooks: bool,
        authz: Authorizer,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let watchers = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "strait_control_api_watchers",
            "Open Watch streams on this node",
            watchers.clone(),
        );
        Self {
            node,
            test_hooks,
            authz,
            watchers,
        }
    }

    pub fn into_server(self) -> ControlServer<ControlService> {
        ControlServer::new(self)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    async fn barrier(&self, stale: bool) -> Result<(), Status> {
        if stale {
            return Ok(());
        }
        self.node.read_barrier().await.map_err(status_of)
    }

    fn members_response(&self) -> pb::MembersResponse {
        let leader = self.node.status().leader_id;
        pb::MembersResponse {
            members: self
                .node
                .members()
                .into_iter()
                .map(|m| pb::Member {
                    id: m.id,
                    addr: m.addr,
                    is_leader: m.id == leader,
                    is_voter: m.is_voter,
                })
                .collect(),
            leader_id: leader,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

fn event_pb(ev: &st::Event) -> pb::WatchEvent {
    let t = match ev.event_type {
        st::EventType::Put => pb::EventType::Put,
        st::EventType::Delete => pb::EventType::Delete,
    };
    pb::WatchEvent {
        r#type: t as i32,
        resource: Some(to_pb(&ev.resource)),
        revision: ev.revision,
    }
}

/// A delete event that carries only kind and name: the resource left the
/// caller's scope, and its new content is not the caller's to see.
fn gone_pb(kind: Kind, name: &str, revision: u64) -> pb::WatchEvent {
    pb::WatchEvent {
        r#type: pb::EventType::Delete as i32,
        resource: Some(pb::Resource {
            kind: kind.as_str().to_string(),
            name: name.to_string(),
            spec_json: "{}".into(),
            revision,
            ..Default::default()
        }),
        revision,
    }
}

fn put_pb(r: &st::Resource, revision: u64) -> pb::WatchEvent {
    pb::WatchEvent {
        r#type: pb::EventType::Put as i32,
        resource: Some(to_pb(r)),
        revision,
    }
}

type Key = (Kind, String);

/// Follows an edge-scoped watch: which resources the edge was sent, and the
/// events that keep it right when an event moves resources in or out of
/// its scope (a VirtualCluster given to another edge takes its
/// KafkaCluster out too).
struct ScopedWatch {
    edge: String,
    scope: EdgeScope,
    sent: BTreeSet<Key>,
}

impl ScopedWatch {
    fn events(
        &mut self,
        ev: &st::Event,
        state: &st::State,
        wanted: &dyn Fn(&st::Resource) -> bool,
    ) -> Vec<pb::WatchEvent> {
        let r = &ev.resource;
        let key = (r.kind, r.name.clone());
        let mut out = Vec::new();
        if !EdgeScope::depends_on(r.kind) {
            if wanted(r) && self.scope.contains(r.kind, &r.name) {
                match ev.event_type {
                    st::EventType::Put => self.sent.insert(key),
                    st::EventType::Delete => self.sent.remove(&key),
                };
                out.push(event_pb(ev));
            } else if self.sent.remove(&key) {
                out.push(gone_pb(r.kind, &r.name, ev.revision));
            }
            return out;
        }
        let all = Selector::default();
        self.scope = EdgeScope::of(&self.edge, state.list(None, &all));
        let now: BTreeMap<Key, &st::Resource> = state
            .list(None, &all)
            .filter(|x| wanted(x) && self.scope.contains(x.kind, &x.name))
            .map(|x| ((x.kind, x.name.clone()), x))
            .collect();
        if now.contains_key(&key) && ev.event_type == st::EventType::Put {
            out.push(event_pb(ev));
            self.sent.insert(key);
        }
        for (k, x) in &now {
            if !self.sent.contains(k) {
                out.push(put_pb(x, ev.revision));
                self.sent.insert(k.clone());
            }
        }
        let left: Vec<Key> = self
            .sent
            .iter()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        for k in left {
            self.sent.remove(&k);
            out.push(gone_pb(k.0, &k.1, ev.revision));
        }
        out
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let r = req
            .resource
            .ok_or_else(|| Status::invalid_argument("resource is required"))?;
        let kind = parse_kind(&r.kind)?;
        let name = r.name.clone();
        let method = if req.expected_revision == Some(0) {
            C::Create
        } else {
            C::Apply
        };
        let access = Access::resource(ctl(method), kind, &name);
        self.authz.check(&caller, access)?;
        let result = async {
            let cmd = Command::Apply {
                kind,
                name: r.name,
                labels: r.labels.into_iter().collect::<BTreeMap<_, _>>(),
                spec: parse_json("spec_json", &r.spec_json)?,
                expected_revision: req.expected_revision,
            };
            match self.node.propose(&cmd).await.map_err(status_of)? {
                Outcome::Applied { resource, changed } => Ok(Response::new(pb::ApplyResponse {
                    resource: Some(to_pb(&resource)),
                    changed,
                })),
                other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
            }
        }
        .await;
        self.authz.audit_write(&caller, &access, &result);
        result
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Resource>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        let access = Access::resource(ctl(C::Get), kind, &req.name);
        let grants = self.authz.check(&caller, access)?;
        self.barrier(req.stale).await?;
        let state = self.node.state();
        let filter = ReadFilter::new(grants, &state);
        if !filter.visible(kind, &req.name) {
            return Err(self.authz.refuse(&caller, &access));
        }
        match state.get(kind, &req.name) {
            Some(r) => Ok(Response::new(to_pb(r))),
            None => Err(Status::not_found(format!(
                "{kind} '{}' not found",
                req.name
            ))),
        }
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(parse_kind(&req.kind)?)
        };
        let grants = self
            .authz
            .check(&caller, Access::kind(ctl(C::List), kind))?;
        let sel = Selector::parse(&req.label_selector).map_err(Status::invalid_argument)?;
        self.barrier(req.stale).await?;
        let state = self.node.state();
        let filter = ReadFilter::new(grants, &state);
        Ok(Response::new(pb::ListResponse {
            resources: state
                .list(kind, &sel)
                .filter(|r| filter.visible(r.kind, &r.name))
                .map(to_pb)
                .collect(),
            revision: state.revision(),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        let access = Access::resource(ctl(C::Delete), kind, &req.name);
        self.authz.check(&caller, access)?;
        let cmd = Command::Delete {
            kind,
            name: req.name.clone(),
            expected_revision: req.expected_revision,
        };
        let result = match self.node.propose(&cmd).await.map_err(status_of) {
            Ok(Outcome::Deleted { revision }) => Ok(Response::new(pb::DeleteResponse { revision })),
            Ok(other) => Err(Status::internal(format!("unexpected outcome {other:?}"))),
            Err(s) => Err(s),
        };
        self.authz.audit_write(&caller, &access, &result);
        result
    }

    async fn update_status(
        &self,
        req: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let kind = parse_kind(&req.kind)?;
        let access = Access::resource(ctl(C::UpdateStatus), kind, &req.name);
        self.authz.check(&caller, access)?;
        let result = async {
            let cmd = Command::UpdateStatus {
                kind,
                name: req.name.clone(),
                status: parse_json("status_json", &req.status_json)?,
            };
            match self.node.propose(&cmd).await.map_err(status_of)? {
                Outcome::StatusUpdated { resource } => Ok(Response::new(to_pb(&resource))),
                other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
            }
        }
        .await;
        self.authz.audit_write(&caller, &access, &result);
        result
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let kinds: Vec<Kind> = req
            .kinds
            .iter()
            .map(|k| parse_kind(k))
            .collect::<Result<_, _>>()?;
        let grants = if kinds.is_empty() {
            self.authz
                .check(&caller, Access::kind(ctl(C::Watch), None))?
        } else {
            let mut g = Grants::default();
            for k in &kinds {
                g = self
                    .authz
                    .check(&caller, Access::kind(ctl(C::Watch), Some(*k)))?;
            }
            g
        };
        let edge = grants.scoped_edge().map(str::to_string);
        if edge.is_some() && req.start_revision != 0 {
            // What an edge was sent depends on what was in its scope then;
            // a fresh listing is the one way to be sure it is right now.
            return Err(Status::out_of_range(
                "a watch scoped to an edge cannot resume; list again (watch from revision 0)",
            ));
        }
        let sel = Selector::parse(&req.label_selector).map_err(Status::invalid_argument)?;
        if req.start_revision == 0 {
            // The listing is linearizable, as a List is: a follower that has not yet applied a
            // write its caller already saw acknowledged would hand an edge an older, partial
            // config (a virtual cluster without the policy applied with it).
            self.barrier(false).await?;
        }
        let wanted = move |r: &st::Resource| {
            (kinds.is_empty() || kinds.contains(&r.kind)) && sel.matches(&r.labels)
        };
        let (initial, mut sub, mut last_rev, mut scoped) = {
            // Holding the read lock while subscribing: the apply loop sends
            // events under the write lock, so nothing falls between the
            // listing and the subscription.
            let state = self.node.state();
            let sub = self.node.subscribe();
            let filter = ReadFilter::new(grants.clone(), &state);
            let mut scoped = edge.map(|edge| ScopedWatch {
                edge,
                scope: filter.scope.clone().unwrap_or_default(),
                sent: BTreeSet::new(),
            });
            let mut initial = Vec::new();
            let last_rev;
            if req.start_revision == 0 {
                let all = Selector::default();
                for r in state
                    .list(None, &all)
                    .filter(|r| wanted(r) && filter.visible(r.kind, &r.name))
                {
                    if let Some(s) = scoped.as_mut() {
                        s.sent.insert((r.kind, r.name.clone()));
                    }
                    initial.push(put_pb(r, r.revision));
                }
                last_rev = state.revision();
                initial.push(pb::WatchEvent {
                    r#type: pb::EventType::Synced as i32,
                    resource: None,
                    revision: last_rev,
                });
            } else {
                let evs = state.events_from(req.start_revision).map_err(|c| {
                    Status::out_of_range(format!("{c}; list again (watch from revision 0)"))
                })?;
                for ev in
                    evs.filter(|e| wanted(&e.resource) && grants.reads_all_of(e.resource.kind))
                {
                    initial.push(event_pb(ev));
                }
                last_rev = state.revision().max(req.start_revision.saturating_sub(1));
            }
            (initial, sub, last_rev, scoped)
        };
        let (tx, rx) = mpsc::channel(256);
        self.watchers.inc();
        let guard = WatcherGuard(self.watchers.clone());
        let node = self.node.clone();
        tokio::spawn(async move {
            let _guard = guard;
            for ev in initial {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let msgs: Vec<Result<pb::WatchEvent, Status>> = match sub.recv().await {
                    Ok(WatchSignal::Event(ev)) => {
                        if ev.revision <= last_rev {
                            continue;
                        }
                        last_rev = ev.revision;
                        match scoped.as_mut() {
                            Some(s) => {
                                let state = node.state();
                                s.events(&ev, &state, &wanted).into_iter().map(Ok).collect()
                            }
                            None if wanted(&ev.resource)
                                && grants.reads_all_of(ev.resource.kind) =>
                            {
                                vec![Ok(event_pb(&ev))]
                            }
                            None => continue,
                        }
                    }
                    Ok(WatchSignal::Reset) => vec![Err(Status::aborted(format!(
                        "replica installed a snapshot; resume from revision {}",
                        last_rev + 1
                    )))],
                    Err(RecvError::Lagged(_)) => vec![Err(Status::aborted(format!(
                        "watcher fell behind; resume from revision {}",
                        last_rev + 1
                    )))],
                    Err(RecvError::Closed) => return,
                };
                for msg in msgs {
                    let stop = msg.is_err();
                    if tx.send(msg).await.is_err() || stop {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn members(
        &self,
        req: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        let caller = self.authz.caller(&req);
        self.authz.check(&caller, ctl(C::Members))?;
        Ok(Response::new(self.members_response()))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let id = req.id.to_string();
        let access = Access {
            op: ctl(C::AddMember),
            kind: None,
            name: Some(&id),
        };
        self.authz.check(&caller, access)?;
        if req.id == 0 || req.addr.is_empty() {
            return Err(Status::invalid_argument("id > 0 and addr are required"));
        }
        let result = self
            .node
            .add_member(req.id, &req.addr)
            .await
            .map_err(status_of)
            .map(|_| Response::new(self.members_response()));
        self.authz.audit_write(&caller, &access, &result);
        result
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        let caller = self.authz.caller(&req);
        let req = req.into_inner();
        let id = req.id.to_string();
        let access = Access {
            op: ctl(C::RemoveMember),
            kind: None,
            name: Some(&id),
        };
        self.authz.check(&caller, access)?;
        let result = self
            .node
            .remove_member(req.id)
            .await
            .map_err(status_of)
            .map(|_| Response::new(self.members_response()));
        self.authz.audit_write(&caller, &access, &result);
        result
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let caller = self.authz.caller(&req);
        self.authz.check(&caller, ctl(C::Status))?;
        let s = self.node.status();
        let (revision, compacted) = {
            let st = self.node.state();
            (st.revision(), st.compacted_revision())
        };
        Ok(Response::new(pb::StatusResponse {
            id: s.id,
            leader_id: s.leader_id,
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            snapshot_index: s.snapshot_index,
            snapshots_installed: s.snapshots_installed,
            revision,
            compacted_revision: compacted,
            role: s.role,
            first_log_index: s.first_log_index,
        }))
    }

    async fn failover(
        &self,
        req: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::Resource>, Status> {
        self.failover_group(req).await
    }

    async fn set_partitioned(
        &self,
        req: Request<pb::SetPartitionedRequest>,
    ) -> Result<Response<pb::SetPartitionedResponse>, Status> {
        let caller = self.authz.caller(&req);
        let access = Access::op(ctl(C::SetPartitioned));
        self.authz.check(&caller, access)?;
        if !self.test_hooks {
            return Err(Status::permission_denied(
                "test hooks are disabled (start the node with --enable-test-hooks)",
            ));
        }
        self.node.set_partitioned(req.into_inner().partitioned);
        let result: Result<(), Status> = Ok(());
        self.authz.audit_write(&caller, &access, &result);
        Ok(Response::new(pb::SetPartitionedResponse {}))
    }
}

/// Keeps gRPC health in line with Raft: SERVING while a leader is known.
pub fn spawn_health(
    node: Node,
    reporter: tonic_health::server::HealthReporter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let serving = node.status().leader_id != 0;
            if last != Some(serving) {
                let status = if serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(SERVICE_NAME, status).await;
                reporter.set_service_status("", status).await;
                last = Some(serving);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}
