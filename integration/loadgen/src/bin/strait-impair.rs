//! A userspace link emulator for tests and benchmarks (the kernel here has
//! no netem): relays UDP datagrams and TCP connections from a listen
//! address to a target on loopback, adding a one-way delay in each
//! direction and, for UDP, random loss.
//!
//! Commands on stdin, one per line, answered with one JSON line on stdout:
//! * `rebind`: every UDP flow gets a new upstream socket, so the target
//!   sees the same peer from a new address (NAT rebinding; QUIC migrates);
//! * `blackhole on|off`: drop everything in both directions (a partition);
//! * `stats`: counts so far.
//!
//! It prints `{"ready": ...}` once its sockets are bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Delay/loss relay for UDP and TCP on loopback")]
struct Args {
    /// UDP relay, LISTEN=TARGET (repeatable).
    #[arg(long, value_parser = parse_pair)]
    udp: Vec<(SocketAddr, SocketAddr)>,
    /// TCP relay, LISTEN=TARGET (repeatable).
    #[arg(long, value_parser = parse_pair)]
    tcp: Vec<(SocketAddr, SocketAddr)>,
    /// One-way delay in each direction, in milliseconds (RTT is twice this).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Probability that a UDP datagram is dropped, per direction.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
}

fn parse_pair(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, target) = s.split_once('=').ok_or("expected LISTEN=TARGET")?;
    Ok((
        listen.parse().map_err(|e| format!("{listen}: {e}"))?,
        target.parse().map_err(|e| format!("{target}: {e}"))?,
    ))
}

#[derive(Default)]
struct Stats {
    udp_forwarded: AtomicU64,
    udp_dropped: AtomicU64,
    tcp_bytes: AtomicU64,
    tcp_connections: AtomicU64,
    rebinds: AtomicU64,
}

struct Link {
    delay: Duration,
    loss: f64,
    blackhole: AtomicBool,
    stats: Stats,
}

impl Link {
    /// Whether a datagram goes through (loss and partition).
    fn passes(&self) -> bool {
        if self.blackhole.load(Ordering::Relaxed)
            || (self.loss > 0.0 && rand::rng().random_bool(self.loss))
        {
            self.stats.udp_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.stats.udp_forwarded.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Waits for `at` unless it has passed: a timer, even an expired one, is
/// only seen at the next millisecond tick, which would cap the relay at
/// about a thousand packets a second.
async fn wait_until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}

/// Sends each datagram `delay` after it was queued, in order, on `socket`
/// (to `to`, or connected when `None`).
fn delayed_sender(
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    delay: Duration,
) -> mpsc::UnboundedSender<(Instant, Vec<u8>)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((queued, packet)) = rx.recv().await {
            wait_until(queued + delay).await;
            let _ = match to {
                Some(to) => socket.send_to(&packet, to).await,
                None => socket.send(&packet).await,
            };
        }
    });
    tx
}

/// One client address's flow: its own upstream socket (replaced on rebind).
struct Flow {
    to_target: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    reader: tokio::task::JoinHandle<()>,
}

async fn open_flow(
    link: Arc<Link>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    target: SocketAddr,
) -> Result<Flow> {
    let upstream = Arc::new(UdpSocket::bind(SocketAddr::new(target.ip(), 0)).await?);
    upstream.connect(target).await?;
    let to_target = delayed_sender(upstream.clone(), None, link.delay);
    let to_client = delayed_sender(listen, Some(client), link.delay);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = upstream.recv(&mut buf).await {
            if link.passes() && to_client.send((Instant::now(), buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
    Ok(Flow { to_target, reader })
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Flow>>>;

async fn udp_relay(link: Arc<Link>, socket: Arc<UdpSocket>, target: SocketAddr, flows: Flows) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if !link.passes() {
            continue;
        }
        let sender = flows
            .lock()
            .unwrap()
            .get(&from)
            .map(|f| f.to_target.clone());
        let sender = match sender {
            Some(s) => s,
            None => match open_flow(link.clone(), socket.clone(), from, target).await {
                Ok(flow) => {
                    let s = flow.to_target.clone();
                    flows.lock().unwrap().insert(from, flow);
                    s
                }
                Err(err) => {
                    eprintln!("udp flow for {from}: {err}");
                    continue;
                }
            },
        };
        let _ = sender.send((Instant::now(), buf[..n].to_vec()));
    }
}

async fn rebind_all(
    link: &Arc<Link>,
    relays: &[(SocketAddr, Flows, Arc<UdpSocket>)],
) -> Result<()> {
    for (target, flows, listen) in relays {
        let clients: Vec<SocketAddr> = flows.lock().unwrap().keys().copied().collect();
        for client in clients {
            let flow = open_flow(link.clone(), listen.clone(), client, *target).await?;
            if let Some(old) = flows.lock().unwrap().insert(client, flow) {
                old.reader.abort();
            }
        }
    }
    link.stats.rebinds.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Copies `from` to `to`, each chunk written `delay` after it was read. The
/// queue is bounded, so a slow reader back-pressures the sender as a real
/// link's buffers would.
async fn delayed_copy(
    link: Arc<Link>,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let delay = link.delay;
    let writer = tokio::spawn(async move {
        while let Some((queued, chunk)) = rx.recv().await {
            wait_until(queued + delay).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 65536];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                while link.blackhole.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                link.stats.tcp_bytes.fetch_add(n as u64, Ordering::Relaxed);
                if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn tcp_relay(link: Arc<Link>, listener: TcpListener, target: SocketAddr) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let link = link.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(target).await else {
                return;
            };
            link.stats.tcp_connections.fetch_add(1, Ordering::Relaxed);
            let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            tokio::join!(
                delayed_copy(link.clone(), cr, uw),
                delayed_copy(link.clone(), ur, cw)
            );
        });
    }
}

fn stats_json(link: &Link) -> serde_json::Value {
    let s = &link.stats;
    serde_json::json!({
        "udp_forwarded": s.udp_forwarded.load(Ordering::Relaxed),
        "udp_dropped": s.udp_dropped.load(Ordering::Relaxed),
        "tcp_bytes": s.tcp_bytes.load(Ordering::Relaxed),
        "tcp_connections": s.tcp_connections.load(Ordering::Relaxed),
        "rebinds": s.rebinds.load(Ordering::Relaxed),
        "blackhole": link.blackhole.load(Ordering::Relaxed),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!((0.0..1.0).contains(&args.loss), "--loss must be in [0, 1)");
    let link = Arc::new(Link {
        delay: Duration::from_secs_f64(args.delay_ms.max(0.0) / 1000.0),
        loss: args.loss,
        blackhole: AtomicBool::new(false),
        stats: Stats::default(),
    });
    let mut relays = Vec::new();
    for (listen, target) in &args.udp {
        let flows: Flows = Arc::default();
        let socket = Arc::new(
            UdpSocket::bind(*listen)
                .await
                .with_context(|| format!("bind udp {listen}"))?,
        );
        tokio::spawn(udp_relay(
            link.clone(),
            socket.clone(),
            *target,
            flows.clone(),
        ));
        relays.push((*target, flows, socket));
    }
    let mut tcp_bound = Vec::new();
    for (listen, target) in &args.tcp {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("bind tcp {listen}"))?;
        tcp_bound.push(listener.local_addr()?.to_string());
        tokio::spawn(tcp_relay(link.clone(), listener, *target));
    }
    println!("{}", serde_json::json!({"ready": true, "tcp": tcp_bound}));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let answer = match line.trim() {
            "rebind" => match rebind_all(&link, &relays).await {
                Ok(()) => stats_json(&link),
                Err(err) => serde_json::json!({"error": err.to_string()}),
            },
            "blackhole on" => {
                link.blackhole.store(true, Ordering::Relaxed);
                stats_json(&link)
            }
            "blackhole off" => {
                link.blackhole.store(false, Ordering::Relaxed);
                stats_json(&link)
            }
            "stats" => stats_json(&link),
            other => serde_json::json!({"error": format!("unknown command '{other}'")}),
        };
        println!("{answer}");
    }
    Ok(())
}
