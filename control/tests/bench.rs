//! Control-plane benchmark on real processes. Ignored by default; run with
//! `cargo test --release -p strait-control --test bench -- --ignored --nocapture`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hdrhistogram::Histogram;
use strait_proto::control as pb;

const T: Duration = Duration::from_secs(20);

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
async fn control_plane_benchmark() {
    let mut cluster = Cluster::start(3, &["--tick-ms", "50"]);
    let leader = cluster.wait_leader(T).await;

    // 1. Committed writes/s and commit latency, 64 concurrent writers on the
    //    leader's endpoint over 4 HTTP/2 connections.
    let writers = 64;
    let duration = Duration::from_secs(5);
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let conns: Vec<_> = (0..4).map(|_| cluster.node_client(leader)).collect();
    for w in 0..writers {
        let mut c = conns[w % conns.len()].clone();
        let hist = hist.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            let mut local = Histogram::<u64>::new(3).unwrap();
            while start.elapsed() < duration {
                let t0 = Instant::now();
                c.apply(kc_request(&format!("b{w}-{}", i % 50), &format!("h{i}:1")))
                    .await
                    .expect("write");
                local.record(t0.elapsed().as_micros() as u64).unwrap();
                i += 1;
            }
            hist.lock().unwrap().add(local).unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    let h = hist.lock().unwrap().clone();
    println!(
        "writes: {} committed in {:.2}s = {:.0} writes/s; commit latency p50 {:.2} ms, p99 {:.2} ms ({} concurrent writers, 3 nodes)",
        h.len(),
        elapsed.as_secs_f64(),
        h.len() as f64 / elapsed.as_secs_f64(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        writers
    );

    // 2. Apply -> 100 watchers (spread over the 3 nodes) have the change.
    let watchers = 100;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let mut ready = Vec::new();
    let eps = cluster.endpoints();
    for w in 0..watchers {
        let mut c = raw_client(&eps[w % eps.len()]);
        let tx = tx.clone();
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        ready.push(rrx);
        tokio::spawn(async move {
            let mut s = c
                .watch(pb::WatchRequest {
                    kinds: vec!["VirtualCluster".into()],
                    label_selector: String::new(),
                    start_revision: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut rtx = Some(rtx);
            while let Ok(Some(ev)) = s.message().await {
                if ev.r#type == pb::EventType::Synced as i32 {
                    if let Some(r) = rtx.take() {
                        let _ = r.send(());
                    }
                    continue;
                }
                if let Some(r) = ev.resource {
                    let _ = tx.send((r.spec_json, Instant::now()));
                }
            }
        });
    }
    for r in ready {
        r.await.unwrap();
    }
    let client = cluster.client();
    let mut fanout = Histogram::<u64>::new(3).unwrap();
    let mut per_apply_max = Histogram::<u64>::new(3).unwrap();
    for round in 0..20 {
        let marker = format!("127.0.0.1:{}", 20000 + round);
        let req = pb::ApplyRequest {
            resource: Some(pb::Resource {
                kind: "VirtualCluster".into(),
                name: "fanout".into(),
                spec_json: format!(
                    r#"{{"edge":"e","cluster":"c","bootstrap":"{marker}","brokers":{{"advertised_host":"h","port_range":"30000-30010"}}}}"#
                ),
                ..Default::default()
            }),
            expected_revision: None,
        };
        let t0 = Instant::now();
        client.apply(req).await.unwrap();
        let mut seen = 0;
        let mut worst = Duration::ZERO;
        while seen < watchers {
            let (spec, at) = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
            if spec.contains(&marker) {
                seen += 1;
                let d = at - t0;
                worst = worst.max(d);
                fanout.record(d.as_micros() as u64).unwrap();
            }
        }
        per_apply_max.record(worst.as_micros() as u64).unwrap();
    }
    println!(
        "watch fan-out: apply -> each of {watchers} watchers: p50 {:.2} ms, p99 {:.2} ms; apply -> all {watchers} have it: p50 {:.2} ms, max {:.2} ms (20 applies)",
        ms(fanout.value_at_quantile(0.5)),
        ms(fanout.value_at_quantile(0.99)),
        ms(per_apply_max.value_at_quantile(0.5)),
        ms(per_apply_max.max()),
    );

    // 3. Leader kill -> a new leader serves writes, seen by a client that
    //    writes continuously and retries on the other members.
    let leader = cluster.wait_leader(T).await;
    let stop = Arc::new(AtomicBool::new(false));
    let last_ok = Arc::new(Mutex::new(None::<Instant>));
    let first_ok_after = Arc::new(Mutex::new(None::<Instant>));
    let kill_at = Arc::new(Mutex::new(None::<Instant>));
    let others: Vec<String> = (1..=3u64)
        .filter(|i| *i != leader)
        .map(|i| cluster.addr(i))
        .collect();
    let mut writers_t = Vec::new();
    for w in 0..4 {
        let others = others.clone();
        let (stop, last_ok, first_ok_after, kill_at) = (
            stop.clone(),
            last_ok.clone(),
            first_ok_after.clone(),
            kill_at.clone(),
        );
        let leader_addr = cluster.addr(leader);
        writers_t.push(tokio::spawn(async move {
            let mut eps = vec![leader_addr];
            eps.extend(others);
            let clients: Vec<_> = eps.iter().map(|e| raw_client(e)).collect();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let mut c = clients[(i + w) % clients.len()].clone();
                i += 1;
                let sent = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_millis(300),
                    c.apply(kc_request(&format!("k{w}"), &format!("h{i}:1"))),
                )
                .await;
                if let Ok(Ok(_)) = r {
                    let now = Instant::now();
                    *last_ok.lock().unwrap() = Some(now);
                    let killed = *kill_at.lock().unwrap();
                    if let Some(k) = killed {
                        let mut f = first_ok_after.lock().unwrap();
                        // Only a write sent after the kill proves a new
                        // leader: one sent before may have committed on the
                        // old leader just in time.
                        if f.is_none() && sent > k {
                            *f = Some(now);
                        }
                    }
                }
            }
        }));
    }
    // Kill only once the writers are committing through the old leader.
    eventually("writes committing before the leader kill", T, || {
        let l = last_ok.clone();
        async move { l.lock().unwrap().is_some() }
    })
    .await;
    *kill_at.lock().unwrap() = Some(Instant::now());
    cluster.kill(leader);
    let k = kill_at.lock().unwrap().unwrap();
    eventually("writes after leader kill", T, || {
        let f = first_ok_after.clone();
        async move { f.lock().unwrap().is_some() }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in writers_t {
        t.await.unwrap();
    }
    let recovered = first_ok_after.lock().unwrap().unwrap() - k;
    println!(
        "leader kill -> new leader serving writes: {:.0} ms (tick 50 ms, election 10 ticks, pre-vote + check_quorum)",
        recovered.as_secs_f64() * 1000.0
    );
}
