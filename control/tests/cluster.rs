//! Multi-node behaviour of real strait-control processes on loopback.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::lin::{check, Op, OpKind};
use common::*;
use strait_proto::control as pb;
use tonic::Code;

const T: Duration = Duration::from_secs(15);

async fn list_names(c: &strait_control_client::ControlClient, kind: &str) -> BTreeSet<String> {
    c.list(kind, "")
        .await
        .expect("list")
        .resources
        .into_iter()
        .map(|r| r.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_via_any_node_are_read_everywhere() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_leader(T).await;
    for id in 1..=3u64 {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(id)))
            .unwrap()
            .connect_lazy();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        eventually("health SERVING", T, || {
            let mut h = h.clone();
            async move {
                h.check(tonic_health::pb::HealthCheckRequest {
                    service: "strait.control.v1.Control".into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == 1)
            }
        })
        .await;
        let _ = &mut h;
    }
    for id in 1..=3u64 {
        let mut c = cluster.node_client(id);
        let resp = c
            .apply(kc_request(&format!("via-{id}"), "127.0.0.1:9092"))
            .await
            .expect("apply through a follower or the leader");
        assert!(resp.into_inner().changed);
    }
    // Linearizable reads on every node see all three writes.
    for id in 1..=3u64 {
        let mut c = cluster.node_client(id);
        let l = c
            .list(pb::ListRequest {
                kind: "KafkaCluster".into(),
                label_selector: String::new(),
                stale: false,
            })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(l.resources.len(), 3, "node {id}");
    }
    // Compare-and-set on revision.
    let mut c = cluster.node_client(2);
    let cur = c
        .get(pb::GetRequest {
            kind: "kc".into(),
            name: "via-1".into(),
            stale: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut req = kc_request("via-1", "127.0.0.1:9093");
    req.expected_revision = Some(cur.revision + 100);
    let err = c.apply(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    req.expected_revision = Some(cur.revision);
    assert!(c.apply(req).await.unwrap().into_inner().changed);
}

/// Kills the leader under continuous writes from several clients while
/// three other clients read and write one register. Every acknowledged write
/// must survive and the register history must be linearizable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_keeps_acknowledged_writes_and_linearizability() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(T).await;
    let start = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let history = Arc::new(Mutex::new(Vec::<Op>::new()));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let client = cluster.client();
        let stop = stop.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                i += 1;
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    client.apply(kc_request(&name, "127.0.0.1:9092")),
                )
                .await;
                if let Ok(Ok(_)) = r {
                    acked.lock().unwrap().push(name);
                }
            }
        }));
    }
    let endpoints = cluster.endpoints();
    for r in 0..3u64 {
        let stop = stop.clone();
        let history = history.clone();
        let endpoints = endpoints.clone();
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut ep = r as usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut c = raw_client(&endpoints[ep % endpoints.len()]);
                seq += 1;
                let invoke = start.elapsed().as_nanos() as u64;
                if seq.is_multiple_of(2) {
                    // Unique value per attempt, so retries never write a
                    // value twice.
                    let v = r * 1_000_000 + seq;
                    let res = tokio::time::timeout(
                        Duration::from_secs(3),
                        c.apply(kc_request("register", &format!("v{v}:1"))),
                    )
                    .await;
                    let complete = match res {
                        Ok(Ok(_)) => Some(start.elapsed().as_nanos() as u64),
                        _ => {
                            ep += 1;
                            None
                        }
                    };
                    history.lock().unwrap().push(Op {
                        kind: OpKind::Write(v),
                        invoke,
                        complete,
                    });
                } else {
                    let res = tokio::time::timeout(
                        Duration::from_secs(3),
                        c.get(pb::GetRequest {
                            kind: "KafkaCluster".into(),
                            name: "register".into(),
                            stale: false,
                        }),
                    )
                    .await;
                    let value = match res {
                        Ok(Ok(r)) => {
                            let spec: serde_json::Value =
                                serde_json::from_str(&r.into_inner().spec_json).unwrap();
                            let s = spec["bootstrap_servers"][0].as_str().unwrap().to_string();
                            Some(Some(
                                s.trim_start_matches('v')
                                    .trim_end_matches(":1")
                                    .parse()
                                    .unwrap(),
                            ))
                        }
                        Ok(Err(s)) if s.code() == Code::NotFound => Some(None),
                        _ => {
                            ep += 1;
                            None
                        }
                    };
                    if let Some(value) = value {
                        history.lock().unwrap().push(Op {
                            kind: OpKind::Read(value),
                            invoke,
                            complete: Some(start.elapsed().as_nanos() as u64),
                        });
                    }
                }
            }
        }));
    }
    let progress = |writes: usize, ops: usize| {
        let acked = acked.clone();
        let history = history.clone();
        async move { acked.lock().unwrap().len() >= writes && history.lock().unwrap().len() >= ops }
    };
    eventually("writes before the kill", T, || progress(50, 30)).await;
    let kill_at = Instant::now();
    cluster.kill(leader);
    let before_kill = acked.lock().unwrap().len();
    let ops_before = history.lock().unwrap().len();
    eventually("writes after the kill", T, || {
        progress(before_kill + 50, ops_before + 30)
    })
    .await;
    let recovery = kill_at.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let new_leader = cluster.wait_leader(T).await;
    assert_ne!(new_leader, leader);
    let names = list_names(&cluster.client(), "KafkaCluster").await;
    let acked = acked.lock().unwrap().clone();
    let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    let history = history.lock().unwrap().clone();
    let reads = history
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Read(_)))
        .count();
    assert!(reads > 10, "too few reads recorded: {reads}");
    assert!(
        check(&history),
        "register history is not linearizable: {history:?}"
    );
    eprintln!(
        "acked {} writes, {} register ops; writes resumed {:?} after the leader kill",
        acked.len(),
        history.len(),
        recovery
    );
}

#[test]
fn checker_rejects_stale_read() {
    // w(1) completes, then w(2) completes, then a read returns 1: not linearizable.
    let ops = vec![
        Op {
            kind: OpKind::Write(1),
            invoke: 0,
            complete: Some(10),
        },
        Op {
            kind: OpKind::Write(2),
            invoke: 20,
            complete: Some(30),
        },
        Op {
            kind: OpKind::Read(Some(1)),
            invoke: 40,
            complete: Some(50),
        },
    ];
    assert!(!check(&ops));
    let mut ok = ops.clone();
    ok[2].kind = OpKind::Read(Some(2));
    assert!(check(&ok));
    // A concurrent read may see either value.
    let conc = vec![
        ops[0].clone(),
        Op {
            kind: OpKind::Write(2),
            invoke: 20,
            complete: Some(60),
        },
        ops[2].clone(),
    ];
    assert!(check(&conc));
    // An unknown write may have happened.
    let unknown = vec![
        Op {
            kind: OpKind::Write(7),
            invoke: 0,
            complete: None,
        },
        Op {
            kind: OpKind::Read(Some(7)),
            invoke: 5,
            complete: Some(6),
        },
        Op {
            kind: OpKind::Read(None),
            invoke: 7,
            complete: Some(8),
        },
    ];
    assert!(!check(&unknown), "value cannot disappear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_follower_does_not_disrupt_and_catches_up() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(T).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let term_before = cluster.status(leader).await.unwrap().term;
    let mut fc = cluster.node_client(follower);
    fc.set_partitioned(pb::SetPartitionedRequest { partitioned: true })
        .await
        .unwrap();
    // The majority keeps accepting writes.
    let mut lc = cluster.node_client(leader);
    for i in 0..20 {
        lc.apply(kc_request(&format!("p-{i}"), "127.0.0.1:9092"))
            .await
            .expect("write while a follower is partitioned");
    }
    // Longer than several election timeouts: pre-vote keeps the isolated
    // node from bumping its term.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let isolated = cluster.status(follower).await.unwrap();
    assert!(
        isolated.revision < 20,
        "partitioned node must not see the writes"
    );
    // Linearizable reads on the isolated node must not return stale data.
    let r = tokio::time::timeout(
        Duration::from_secs(4),
        fc.list(pb::ListRequest {
            kind: "KafkaCluster".into(),
            label_selector: String::new(),
            stale: false,
        }),
    )
    .await;
    if let Ok(Ok(l)) = r {
        panic!(
            "isolated node served a linearizable read ({} items)",
            l.into_inner().resources.len()
        );
    }
    // A stale read is still served by the isolated node (that is its point).
    let stale = ctl_cmd()
        .args([
            "--endpoints",
            &cluster.addr(follower),
            "get",
            "kc",
            "--stale",
        ])
        .output()
        .unwrap();
    assert!(
        stale.status.success(),
        "{}",
        String::from_utf8_lossy(&stale.stderr)
    );
    fc.set_partitioned(pb::SetPartitionedRequest { partitioned: false })
        .await
        .unwrap();
    eventually("partitioned node catches up", T, || {
        let c = &cluster;
        async move { c.status(follower).await.is_some_and(|s| s.revision >= 20) }
    })
    .await;
    let after = cluster.wait_leader(T).await;
    assert_eq!(after, leader, "healing must not depose the leader");
    assert_eq!(
        cluster.status(leader).await.unwrap().term,
        term_before,
        "pre-vote: no term bump from the isolated node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_leader_is_replaced_and_steps_down() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(T).await;
    let mut lc = cluster.node_client(leader);
    lc.set_partitioned(pb::SetPartitionedRequest { partitioned: true })
        .await
        .unwrap();
    let others: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    eventually("majority elects a new leader", T, || {
        let c = &cluster;
        let others = others.clone();
        async move {
            let mut ls = Vec::new();
            for id in &others {
                ls.push(c.status(*id).await.map(|s| s.leader_id).unwrap_or(0));
            }
            ls.iter().all(|l| *l != 0 && *l != leader && *l == ls[0])
        }
    })
    .await;
    // check_quorum: the isolated leader steps down.
    eventually("isolated leader steps down", T, || {
        let c = &cluster;
        async move { c.status(leader).await.is_some_and(|s| s.role != "Leader") }
    })
    .await;
    let mut oc = cluster.node_client(others[0]);
    oc.apply(kc_request("after-partition", "127.0.0.1:9092"))
        .await
        .expect("write to the new majority");
    lc.set_partitioned(pb::SetPartitionedRequest { partitioned: false })
        .await
        .unwrap();
    eventually("old leader catches up", T, || {
        let c = &cluster;
        async move { c.status(leader).await.is_some_and(|s| s.revision >= 1) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_all_nodes_from_disk() {
    let mut cluster = Cluster::start(3, &["--snapshot-threshold", "25"]);
    cluster.wait_leader(T).await;
    let client = cluster.client();
    for i in 0..60 {
        client
            .apply(kc_request(&format!("d-{i}"), "127.0.0.1:9092"))
            .await
            .unwrap();
    }
    client.delete("KafkaCluster", "d-0").await.unwrap();
    let rev = cluster.status(1).await.unwrap().revision;
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.spawn(id);
    }
    cluster.wait_leader(T).await;
    let client = cluster.client();
    let names = list_names(&client, "KafkaCluster").await;
    assert_eq!(names.len(), 59);
    assert!(!names.contains("d-0") && names.contains("d-59"));
    for id in 1..=3 {
        eventually("replica restored", T, || {
            let c = &cluster;
            async move { c.status(id).await.is_some_and(|s| s.revision == rev) }
        })
        .await;
    }
    client
        .apply(kc_request("after-restart", "127.0.0.1:9092"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_member_catches_up_from_snapshot_then_remove_member() {
    let mut cluster = Cluster::start(3, &["--snapshot-threshold", "20"]);
    let leader = cluster.wait_leader(T).await;
    let client = cluster.client();
    for i in 0..80 {
        client
            .apply(kc_request(&format!("s-{i}"), "127.0.0.1:9092"))
            .await
            .unwrap();
    }
    eventually("leader compacted its log", T, || {
        let c = &cluster;
        async move {
            c.status(leader)
                .await
                .is_some_and(|s| s.first_log_index > 20)
        }
    })
    .await;
    let addr4 = cluster.spawn_joiner(4, &[]);
    let out = ctl_cmd()
        .args(["--endpoints", &cluster.endpoints()[..3].join(",")])
        .args(["members", "add", "4", &addr4])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader_rev = cluster.status(leader).await.unwrap().revision;
    eventually("node 4 catches up", T, || {
        let c = &cluster;
        async move { c.status(4).await.is_some_and(|s| s.revision >= leader_rev) }
    })
    .await;
    let s4 = cluster.status(4).await.unwrap();
    assert!(
        s4.snapshots_installed >= 1,
        "node 4 should catch up via a snapshot: {s4:?}"
    );
    let members = client.members().await.unwrap();
    assert_eq!(members.members.len(), 4);

    // Remove a follower that is not the leader.
    let victim = (1..=3).find(|i| *i != leader).unwrap();
    let out = ctl_cmd()
        .args(["--endpoints", &cluster.addr(leader)])
        .args(["members", "remove", &victim.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.kill(victim);
    // The client may ask a member that has not applied the change yet.
    eventually("membership without the removed node", T, || {
        let client = &client;
        async move {
            client.members().await.is_ok_and(|m| {
                let ids: Vec<u64> = m.members.iter().map(|m| m.id).collect();
                !ids.contains(&victim) && ids.contains(&4)
            })
        }
    })
    .await;
    // Three voters left, one of them killed would still leave a majority;
    // writes keep working with the removed node gone.
    client
        .apply(kc_request("after-remove", "127.0.0.1:9092"))
        .await
        .unwrap();
    let mut c4 = cluster.node_client(4);
    let got = c4
        .get(pb::GetRequest {
            kind: "KafkaCluster".into(),
            name: "after-remove".into(),
            stale: false,
        })
        .await;
    assert!(got.is_ok(), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_the_leader_hands_over_leadership() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(T).await;
    let out = ctl_cmd()
        .args(["--endpoints", &cluster.endpoints().join(",")])
        .args(["members", "remove", &leader.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(T).await;
    assert_ne!(new_leader, leader);
    let client = cluster.client();
    client
        .apply(kc_request("after-leader-removal", "127.0.0.1:9092"))
        .await
        .expect("the remaining two nodes form the group");
    let ids: Vec<u64> = client
        .members()
        .await
        .unwrap()
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&leader));
}

/// Without any compaction the new member still learns the initial voters and
/// their addresses (the bootstrap state reaches it as a snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joined_member_knows_every_voter_without_compaction() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.wait_leader(T).await;
    let client = cluster.client();
    for i in 0..5 {
        client
            .apply(kc_request(&format!("j-{i}"), "127.0.0.1:9092"))
            .await
            .unwrap();
    }
    let addr4 = cluster.spawn_joiner(4, &[]);
    let mut c = cluster.node_client(1);
    let resp = loop {
        match c
            .add_member(pb::AddMemberRequest {
                id: 4,
                addr: addr4.clone(),
            })
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("add member: {e:?}"),
        }
    };
    assert_eq!(resp.members.len(), 4);
    eventually("node 4 caught up and knows all voters", T, || {
        let c = &cluster;
        async move {
            let mut c4 = c.node_client(4);
            let Ok(m) = c4.members(pb::MembersRequest {}).await else {
                return false;
            };
            let m = m.into_inner();
            let caught_up = c.status(4).await.is_some_and(|s| s.revision >= 5);
            caught_up && m.members.len() == 4 && m.members.iter().all(|m| !m.addr.is_empty())
        }
    })
    .await;
    // Node 4 is a real voter: with two of the original nodes gone, 1 and 4
    // would not be a majority of 4, so instead stop one node and check that
    // the remaining three (including 4) still commit.
    cluster.kill(2);
    cluster.wait_leader(T).await;
    client
        .apply(kc_request("with-node-4", "127.0.0.1:9092"))
        .await
        .expect("commit with node 4 in the majority");
}

/// SIGKILL of every node in the middle of continuous writes: after a restart
/// from disk every acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_all_nodes_under_writes_keeps_acknowledged_writes() {
    let mut cluster = Cluster::start(3, &["--snapshot-threshold", "50"]);
    cluster.wait_leader(T).await;
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let client = cluster.client();
        let (acked, stop) = (acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("c{w}-{i}");
                i += 1;
                let r = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.apply(kc_request(&name, "127.0.0.1:9092")),
                )
                .await;
                if let Ok(Ok(_)) = r {
                    acked.lock().unwrap().push(name);
                }
            }
        }));
    }
    eventually("writes before the crash", T, || {
        let acked = acked.clone();
        async move { acked.lock().unwrap().len() >= 200 }
    })
    .await;
    for id in 1..=3 {
        cluster.kill(id);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for id in 1..=3 {
        cluster.spawn(id);
    }
    cluster.wait_leader(T).await;
    let names = list_names(&cluster.client(), "KafkaCluster").await;
    let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
}

fn kc_manifest(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "kind: KafkaCluster\nname: {name}\nspec: {{bootstrap_servers: [127.0.0.1:9092]}}\n"
        ),
    )
    .unwrap();
    path
}

/// A script that applies as soon as it started the nodes: straitctl waits
/// through "connection refused" and "no leader is known" until a leader is
/// elected, instead of failing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_right_after_a_fresh_start_succeeds() {
    let cluster = Cluster::start(3, &[]);
    let manifest = kc_manifest(cluster.tmp.path(), "first");
    let out = ctl_cmd()
        .args([
            "--endpoints",
            &cluster.endpoints().join(","),
            "--timeout",
            "30s",
        ])
        .arg("apply")
        .arg("-f")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("KafkaCluster/first created (revision "),
        "{stdout}"
    );
}

/// 40 applies with straitctl, the leader killed after the tenth: every one
/// succeeds (those during the election wait for the new leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn applies_ride_through_a_leader_kill() {
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.wait_leader(T).await;
    let eps = cluster.endpoints().join(",");
    for i in 0..40 {
        if i == 10 {
            cluster.kill(leader);
        }
        let name = format!("k{i}");
        let manifest = kc_manifest(cluster.tmp.path(), &name);
        let out = ctl_cmd()
            .args(["--endpoints", &eps, "--timeout", "20s", "apply", "-f"])
            .arg(&manifest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "apply {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let names = list_names(&cluster.client(), "KafkaCluster").await;
    assert_eq!(names.len(), 40, "{names:?}");
}
