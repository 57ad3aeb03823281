//! Raft messages between nodes over tonic: one sender task per peer batches
//! whatever is queued into a single `Send` call. Failures are reported to the
//! ready loop (unreachable, snapshot failure); Raft retransmits.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use protobuf::Message as PbMessage;
use raft::eraftpb::{Message, MessageType};
use strait_proto::control::raft_client::RaftClient;
use strait_proto::control::raft_server::Raft;
use strait_proto::control::{RaftAck, RaftBatch};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::node::{Input, Shared, TlsClientConfig};

const MAX_BATCH: usize = 512;
const MAX_GRPC_MESSAGE: usize = 256 * 1024 * 1024;

pub(crate) struct Transport {
    self_id: u64,
    self_addr: String,
    addrs: Arc<RwLock<HashMap<u64, String>>>,
    senders: Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>,
    runtime: tokio::runtime::Handle,
    tls: Option<TlsClientConfig>,
    inbox: std::sync::mpsc::Sender<Input>,
    shared: Arc<Shared>,
}

impl Transport {
    pub(crate) fn new(
        self_id: u64,
        self_addr: String,
        runtime: tokio::runtime::Handle,
        tls: Option<TlsClientConfig>,
        inbox: std::sync::mpsc::Sender<Input>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            self_id,
            self_addr,
            addrs: Arc::new(RwLock::new(HashMap::new())),
            senders: Mutex::new(HashMap::new()),
            runtime,
            tls,
            inbox,
            shared,
        }
    }

    pub(crate) fn set_addr(&self, id: u64, addr: &str) {
        if id == self.self_id {
            return;
        }
        let mut addrs = self.addrs.write().expect("addrs lock");
        if addrs.get(&id).map(String::as_str) != Some(addr) {
            addrs.insert(id, addr.to_string());
        }
    }

    pub(crate) fn learn_addr(&self, id: u64, addr: &str) {
        if id == self.self_id || addr.is_empty() {
            return;
        }
        let mut addrs = self.addrs.write().expect("addrs lock");
        addrs.entry(id).or_insert_with(|| addr.to_string());
    }

    pub(crate) fn send(&self, msgs: Vec<Message>) {
        if self.shared.partitioned.load(Ordering::Relaxed) {
            return;
        }
        let mut senders = self.senders.lock().expect("senders lock");
        for m in msgs {
            let to = m.to;
            let tx = senders.entry(to).or_insert_with(|| self.spawn_peer(to));
            if tx.send(m).is_err() {
                senders.remove(&to);
            }
        }
    }

    fn spawn_peer(&self, to: u64) -> mpsc::UnboundedSender<Message> {
        let (tx, rx) = mpsc::unbounded_channel();
        let peer = PeerSender {
            to,
            from_id: self.self_id,
            from_addr: self.self_addr.clone(),
            addrs: self.addrs.clone(),
            tls: self.tls.clone(),
            inbox: self.inbox.clone(),
            shared: self.shared.clone(),
        };
        self.runtime.spawn(peer.run(rx));
        tx
    }
}

struct PeerSender {
    to: u64,
    from_id: u64,
    from_addr: String,
    addrs: Arc<RwLock<HashMap<u64, String>>>,
    tls: Option<TlsClientConfig>,
    inbox: std::sync::mpsc::Sender<Input>,
    shared: Arc<Shared>,
}

impl PeerSender {
    fn client(&self, addr: &str) -> Option<RaftClient<Channel>> {
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let channel = match &self.tls {
            // TLS is the connector's (tonic's own reads a certificate once):
            // each new connection takes the configuration of that moment.
            Some(tls) => {
                let tls = tls.clone();
                let target = addr.to_string();
                let host = target
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                    .unwrap_or_else(|| target.clone());
                let name = rustls::pki_types::ServerName::try_from(host).ok()?;
                ep.connect_with_connector_lazy(tower::service_fn(move |_uri| {
                    let config = (tls.0)();
                    let target = target.clone();
                    let name = name.clone();
                    async move {
                        let tcp = tokio::net::TcpStream::connect(target).await?;
                        tcp.set_nodelay(true)?;
                        let tls = tokio_rustls::TlsConnector::from(config)
                            .connect(name, tcp)
                            .await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                    }
                }))
            }
            None => ep.connect_lazy(),
        };
        Some(
            RaftClient::new(channel)
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
    }

    async fn run(self, mut rx: mpsc::UnboundedReceiver<Message>) {
        let mut current: Option<(String, RaftClient<Channel>)> = None;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if self.shared.partitioned.load(Ordering::Relaxed) {
                continue;
            }
            let addr = self
                .addrs
                .read()
                .expect("addrs lock")
                .get(&self.to)
                .cloned();
            let Some(addr) = addr else {
                tracing::debug!(to = self.to, "no address for peer; dropping messages");
                let _ = self.inbox.send(Input::Unreachable(self.to));
                continue;
            };
            if current.as_ref().map(|(a, _)| a != &addr).unwrap_or(true) {
                current = self.client(&addr).map(|c| (addr.clone(), c));
            }
            let Some((_, client)) = current.as_mut() else {
                continue;
            };
            let has_snapshot = batch
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            let messages: Vec<Vec<u8>> = batch
                .iter()
                .filter_map(|m| m.write_to_bytes().ok())
                .collect();
            let req = RaftBatch {
                from_id: self.from_id,
                from_addr: self.from_addr.clone(),
                messages,
            };
            match client.send(req).await {
                Ok(_) => {
                    if has_snapshot {
                        let _ = self.inbox.send(Input::SnapshotStatus(self.to, true));
                    }
                }
                Err(e) => {
                    tracing::debug!(to = self.to, error = %e, "raft send failed");
                    let _ = self.inbox.send(Input::Unreachable(self.to));
                    if has_snapshot {
                        let _ = self.inbox.send(Input::SnapshotStatus(self.to, false));
                    }
                    // Drop what piled up while the peer was unreachable:
                    // Raft resends from its progress tracking anyway.
                    while rx.try_recv().is_ok() {}
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The receiving side, mounted on every node's gRPC server.
pub struct RaftService {
    pub(crate) inbox: std::sync::mpsc::Sender<Input>,
    pub(crate) shared: Arc<Shared>,
}

impl RaftService {
    pub fn into_server(self) -> strait_proto::control::raft_server::RaftServer<RaftService> {
        strait_proto::control::raft_server::RaftServer::new(self)
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE)
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(
        &self,
        request: tonic::Request<RaftBatch>,
    ) -> Result<tonic::Response<RaftAck>, tonic::Status> {
        if self.shared.partitioned.load(Ordering::Relaxed) {
            return Err(tonic::Status::unavailable(
                "node is partitioned (test hook)",
            ));
        }
        let batch = request.into_inner();
        let mut msgs = Vec::with_capacity(batch.messages.len());
        for b in &batch.messages {
            let m = Message::parse_from_bytes(b)
                .map_err(|e| tonic::Status::invalid_argument(format!("bad raft message: {e}")))?;
            msgs.push(m);
        }
        self.inbox
            .send(Input::Peer {
                from_id: batch.from_id,
                from_addr: batch.from_addr,
                msgs,
            })
            .map_err(|_| tonic::Status::unavailable("node is shutting down"))?;
        Ok(tonic::Response::new(RaftAck {}))
    }
}
