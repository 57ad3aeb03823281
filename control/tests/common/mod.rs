//! Test harness: real `strait-control` processes on loopback.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strait_control_client::{ClientConfig, ControlClient, TlsConfig};
use strait_proto::control as pb;
use strait_proto::control::control_client::ControlClient as PbClient;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_strait-control");
pub const CTL: &str = env!("CARGO_BIN_EXE_straitctl");

/// straitctl against the plaintext test clusters.
pub fn ctl_cmd() -> Command {
    let mut c = Command::new(CTL);
    c.arg("--insecure-plaintext");
    c
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    pub join: bool,
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub peers: String,
    pub base_args: Vec<String>,
    /// Client identity for the harness's own calls (status, client()) when
    /// the nodes run mTLS.
    pub tls: Option<TlsConfig>,
}

impl Cluster {
    /// Starts `n` nodes with fast ticks. `extra` goes to every node.
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let addr = format!("127.0.0.1:{}", free_port());
            nodes.insert(
                id,
                NodeProc {
                    id,
                    addr,
                    dir: tmp.path().join(format!("n{id}")),
                    child: None,
                    extra: vec![],
                    join: false,
                },
            );
        }
        let peers = nodes
            .values()
            .map(|n| format!("{}={}", n.id, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let defaults = [
            ("--tick-ms", "20"),
            ("--election-ticks", "10"),
            ("--heartbeat-ticks", "2"),
            ("--proposal-timeout-ms", "2000"),
        ];
        let mut base_args: Vec<String> = vec!["--enable-test-hooks".to_string()];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                base_args.push(flag.to_string());
                base_args.push(value.to_string());
            }
        }
        base_args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = Cluster {
            tmp,
            nodes,
            peers,
            base_args,
            tls: None,
        };
        let ids: Vec<u64> = c.nodes.keys().copied().collect();
        for id in ids {
            c.spawn(id);
        }
        c
    }

    pub fn spawn(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).expect("node");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join(format!("n{id}.log")))
            .expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("--id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(&n.addr)
            .arg("--data-dir")
            .arg(&n.dir);
        if n.join {
            cmd.arg("--join")
                .arg("--peers")
                .arg(format!("{}={}", id, n.addr));
        } else {
            cmd.arg("--peers").arg(&self.peers);
        }
        let tls = self
            .base_args
            .iter()
            .chain(&n.extra)
            .any(|a| a == "--tls-cert");
        if !tls {
            cmd.arg("--insecure-plaintext");
        }
        cmd.args(&self.base_args)
            .args(&n.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        n.child = Some(cmd.spawn().expect("spawn strait-control"));
    }

    /// Adds a node process started with --join (not yet a member).
    pub fn spawn_joiner(&mut self, id: u64, extra: &[&str]) -> String {
        let addr = format!("127.0.0.1:{}", free_port());
        self.nodes.insert(
            id,
            NodeProc {
                id,
                addr: addr.clone(),
                dir: self.tmp.path().join(format!("n{id}")),
                child: None,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                join: true,
            },
        );
        self.spawn(id);
        addr
    }

    pub fn kill(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes[&id].addr.clone()
    }

    pub fn live_ids(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    pub fn client(&self) -> ControlClient {
        let mut cfg = ClientConfig::new(&self.endpoints());
        cfg.connect_timeout = Duration::from_millis(300);
        cfg.tls = self.tls.clone();
        ControlClient::new(&cfg).expect("client")
    }

    pub fn node_client(&self, id: u64) -> PbClient<Channel> {
        match &self.tls {
            Some(tls) => PbClient::new(tls_channel(&self.addr(id), tls)),
            None => raw_client(&self.addr(id)),
        }
    }

    pub async fn status(&self, id: u64) -> Option<pb::StatusResponse> {
        let mut c = self.node_client(id);
        match tokio::time::timeout(Duration::from_millis(500), c.status(pb::StatusRequest {})).await
        {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Waits until the live nodes agree on one leader among them.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            let live = self.live_ids();
            for id in &live {
                if let Some(s) = self.status(*id).await {
                    leaders.push(s.leader_id);
                }
            }
            if leaders.len() == live.len()
                && leaders[0] != 0
                && leaders.iter().all(|l| *l == leaders[0])
                && live.contains(&leaders[0])
            {
                return leaders[0];
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("no agreed leader among {live:?} after {timeout:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn dump_logs(&self) {
        for id in self.nodes.keys() {
            let p = self.tmp.path().join(format!("n{id}.log"));
            if let Ok(s) = std::fs::read_to_string(&p) {
                let lines: Vec<&str> = s.lines().collect();
                // A panic's message comes before its backtrace, which alone
                // would fill the tail.
                if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
                    eprintln!("----- node {id} panicked -----");
                    for l in &lines[at.saturating_sub(20)..(at + 3).min(lines.len())] {
                        eprintln!("{l}");
                    }
                }
                eprintln!("----- node {id} log tail -----");
                for l in &lines[lines.len().saturating_sub(30)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// A lazily connected mTLS channel to one node.
pub fn tls_channel(addr: &str, tls: &TlsConfig) -> Channel {
    let mut t = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
    if let (Some(c), Some(k)) = (&tls.cert_pem, &tls.key_pem) {
        t = t.identity(tonic::transport::Identity::from_pem(c, k));
    }
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(300))
        .tls_config(t)
        .expect("tls config")
        .connect_lazy()
}

pub fn raw_client(addr: &str) -> PbClient<Channel> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(300));
    PbClient::new(ep.connect_lazy())
}

pub fn kc_request(name: &str, server: &str) -> pb::ApplyRequest {
    pb::ApplyRequest {
        resource: Some(pb::Resource {
            kind: "KafkaCluster".into(),
            name: name.into(),
            spec_json: format!(r#"{{"bootstrap_servers":["{server}"]}}"#),
            ..Default::default()
        }),
        expected_revision: None,
    }
}

/// Polls `f` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
pub mod lin;
pub mod pki;

/// Kills (and reaps) the processes it holds when the test ends, passed or not.
pub struct Kill(pub Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` free loopback addresses and the `--peers` list naming them 1..=n.
pub fn loopback_peers(n: usize) -> (Vec<String>, String) {
    let addrs: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    (addrs, peers)
}

/// Node `id` of a multi-node cluster on mTLS with the bootstrap files in
/// `dir` (`node.pem`, `node.key`, `ca.pem`): data in `dir/d<id>`, stderr
/// in `dir/n<id>.log`. The caller adds the CA flags and spawns it.
pub fn mtls_node(dir: &std::path::Path, id: usize, addr: &str, peers: &str) -> Command {
    let log = std::fs::File::create(dir.join(format!("n{id}.log"))).unwrap();
    let mut c = Command::new(BIN);
    c.args(["--id", &id.to_string(), "--listen", addr, "--peers", peers])
        .arg("--data-dir")
        .arg(dir.join(format!("d{id}")))
        .args(["--tick-ms", "20"])
        .arg("--tls-cert")
        .arg(dir.join("node.pem"))
        .arg("--tls-key")
        .arg(dir.join("node.key"))
        .arg("--tls-client-ca")
        .arg(dir.join("ca.pem"))
        .stdout(Stdio::null())
        .stderr(log);
    c
}

/// straitctl over mTLS against `endpoints`, trusting `dir/ca.pem`, as the
/// client whose `<name>.pem`/`<name>.key` are in `dir` (none: no certificate).
pub fn ctl_tls(
    dir: &std::path::Path,
    endpoints: &str,
    client: Option<&str>,
    args: &[&str],
) -> std::process::Output {
    let mut c = Command::new(CTL);
    c.arg("--endpoints")
        .arg(endpoints)
        .arg("--ca")
        .arg(dir.join("ca.pem"));
    if let Some(name) = client {
        c.arg("--cert")
            .arg(dir.join(format!("{name}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{name}.key")));
    }
    c.args(args).output().unwrap()
}

/// A process's outcome, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
