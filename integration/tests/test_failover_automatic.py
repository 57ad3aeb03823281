"""Automatic failover (issue 14, item 3) with a 3-node control plane, two edges and two real Kafka
clusters: the switch needs a quorum of health evidence (the edges' Kafka probes and the leader's own TCP
probe) and is committed through Raft by the controller on the leader; an edge cut off from the control
plane keeps its generation whatever its own probes say."""

import json
import re
import time

from lib.clients import unique
from lib.control import ControlPlane, binary
from lib.ports import free_port, free_range
from lib.procs import Proc
from lib.wait import wait_for
from tests.test_encryption import create_topic
from tests.test_failover import ContinuousProducer, JavaContinuousProducer, edge_metric, edge_ready, values

GROUP = "orders-dr"
EDGES = ("edge-a", "edge-b")


def leader_index(cp: ControlPlane) -> int:
    """The index in `cp.procs` of the node `straitctl members` calls the leader."""
    r = cp.ctl("members")
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        fields = line.split()
        if fields and fields[-1] == "leader":
            return int(fields[0]) - 1
    raise AssertionError(f"no leader in:\n{r.stdout}")


AUTOMATIC = """
  mode: automatic
  failback: automatic
  health: { interval_ms: 500, failure_threshold: 3, recovery_threshold: 2, quorum: 2, hold_down_ms: 5000 }
"""


def resources(primary: str, standby: str, edges: dict, group_spec: str = AUTOMATIC) -> str:
    """Two clusters, the group (`group_spec`: the lines after `standby`), and per edge an Edge and a
    VirtualCluster behind the group."""
    docs = [f"""
kind: KafkaCluster
name: east
spec: {{ bootstrap_servers: ["{primary}"] }}
---
kind: KafkaCluster
name: west
spec: {{ bootstrap_servers: ["{standby}"] }}
---
kind: FailoverGroup
name: {GROUP}
spec:
  primary: east
  standby: [west]
{group_spec.strip(chr(10))}
"""]
    for name, e in edges.items():
        docs.append(f"""
kind: Edge
name: {name}
spec: {{ cluster: east }}
---
kind: VirtualCluster
name: orders-{name}
spec:
  edge: {name}
  failover_group: {GROUP}
  bootstrap: {e['bootstrap']}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {e['ports'].start}-{e['ports'].stop - 1} }}
""")
    return "---".join(docs)


def new_edges() -> dict:
    return {n: {"bootstrap": f"127.0.0.1:{free_port()}", "ports": free_range(8), "admin": free_port()}
            for n in EDGES}


def start_edges(cp: ControlPlane, edges: dict, logs, tmp_path) -> list[Proc]:
    """Each edge following the control plane under its own SPIFFE ID, serving once ready."""
    procs = []
    for name, e in edges.items():
        procs.append(Proc(f"edge-{name}-{e['admin']}", [
            binary("strait-edge"), "--control", cp.endpoints, "--name", name,
            "--control-ca", str(cp.pki.pem("ca")), "--control-cert", str(cp.pki.pem(name)),
            "--control-key", str(cp.pki.key(name)), "--cache-dir", str(tmp_path / f"cache-{name}"),
            "--admin", f"127.0.0.1:{e['admin']}"], logs))
        procs[-1].start()
    for name, e in edges.items():
        wait_for(lambda: edge_ready(e["admin"]), 60, what=f"{name} serving")
    return procs


def fg_status(cp: ControlPlane) -> dict:
    r = cp.ctl("get", "fg", GROUP, "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout).get("status", {})


def serving(cp: ControlPlane, generation: int) -> bool:
    edges = fg_status(cp).get("edges", {})
    return all(edges.get(n, {}).get("generation") == generation for n in EDGES)


def test_automatic_failover_needs_a_quorum_and_an_edge_cut_off_never_switches_alone(broker, logs, tmp_path):
    """Phase 1: the primary and the control-plane leader are SIGKILLed together; the new leader's
    controller switches both edges to the standby (generation 1) and producers (librdkafka at both
    edges, the Java client at edge-b) continue through the same bootstraps. Phase 2: with the whole control plane down the active standby dies; both edges see
    it (their probe metric says down) and still serve generation 1. Once the control plane is back, the
    evidence from the edges and the leader fails back to the primary (generation 2)."""
    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    cp = ControlPlane(tmp_path / "cp", logs, nodes=3)
    for name in EDGES:
        cp.pki.leaf(name, uris=[f"spiffe://{cp.trust_domain}/edge/{name}"])
    cp.start()
    edges = new_edges()
    procs: list[Proc] = []
    producers: dict[str, ContinuousProducer | JavaContinuousProducer] = {}
    try:
        spec = tmp_path / "resources.yaml"
        spec.write_text(resources(primary.bootstrap_servers[0], standby.bootstrap_servers[0], edges))
        cp.ctl("apply", "-f", str(spec), check=True)
        procs += start_edges(cp, edges, logs, tmp_path)

        def probe(e: dict, cluster: str) -> float:
            return edge_metric(e["admin"], "strait_failover_probe_state", group=GROUP, cluster=cluster)

        def fg() -> dict:
            return {"status": fg_status(cp)}

        # Every edge reports both members up, and the control plane has that evidence.
        for name, e in edges.items():
            wait_for(lambda: probe(e, "east") == 1 and probe(e, "west") == 1, 60, what=f"{name}'s probes up")
        wait_for(lambda: all(fg().get("status", {}).get("edges", {}).get(n, {}).get("health", {})
                             .get("west", {}).get("state") == "up" for n in EDGES), 60,
                 what="both edges' health reported to the control plane")
        assert fg()["status"].get("generation", 0) == 0

        topic = unique("auto-dr")
        create_topic(primary.bootstrap_servers[0], topic)
        create_topic(standby.bootstrap_servers[0], topic)
        producers = {n: ContinuousProducer(e["bootstrap"], topic, label=f"{n}:").start() for n, e in edges.items()}
        producers["java@edge-b"] = JavaContinuousProducer(edges["edge-b"]["bootstrap"], topic,
                                                          label="java@edge-b:").start()
        for p in producers.values():
            wait_for(lambda: len(p.acked) >= 20, 60, what="records acknowledged by the primary")

        # Phase 1: the primary and the leader die at once.
        old_leader = leader_index(cp)
        killed_at = time.monotonic()
        primary.kill(primary.nodes[0].node_id)
        cp.procs[old_leader].popen.kill()
        wait_for(lambda: serving(cp, 1), 60, interval=0.2, what="both edges on the standby at generation 1")
        decided = fg()["status"]
        assert (decided["active"], decided["generation"], decided["previous"]) == ("west", 1, "east"), decided
        assert decided["by"].startswith("failover-controller (control node "), decided
        assert decided["by"] != f"failover-controller (control node {old_leader + 1})", "the dead leader decided"
        for p in producers.values():
            wait_for(lambda: len(p.acked_after(killed_at)) >= 20, 90, what="acks on the standby after the kill")
        rto = {n: min(at for at, _ in p.acked if at > killed_at) - killed_at for n, p in producers.items()}
        print("automatic failover, SIGKILL of primary and leader to first acknowledgement on the standby: "
              + ", ".join(f"{n} {s:.2f} s" for n, s in rto.items()))
        cp.procs[old_leader].start()

        # Phase 2: the control plane is down; an edge never switches alone.
        for p in producers.values():
            p.stop()
        cp.stop()
        primary.start_node(primary.nodes[0].node_id)
        standby.kill(standby.nodes[0].node_id)
        for name, e in edges.items():
            wait_for(lambda: probe(e, "west") == 0 and probe(e, "east") == 1, 60,
                     what=f"{name} seeing the standby down and the primary up")
        for name, e in edges.items():
            assert edge_metric(e["admin"], "strait_upstream_swaps_total") == 1, f"{name} switched on its own"

        # The control plane returns: the evidence fails back to the primary.
        for p in cp.procs:
            p.start()
        wait_for(lambda: cp.ctl("members").returncode == 0, 60, what="the control plane answering again")
        wait_for(lambda: serving(cp, 2), 90, interval=0.2, what="both edges back on the primary at generation 2")
        back = fg()["status"]
        assert (back["active"], back["generation"], back["previous"]) == ("east", 2, "west"), back
        for name, e in edges.items():
            assert edge_metric(e["admin"], "strait_upstream_swaps_total") == 2, name

        # Nothing acknowledged was lost: every acked record is on the primary (before the kill) or the standby.
        standby.start_node(standby.nodes[0].node_id)
        stored = values(primary.bootstrap_servers[0], topic) + values(standby.bootstrap_servers[0], topic)
        for name, p in producers.items():
            assert p.fatal == [], (name, p.fatal)
            missing = {f"{p.label}record-{n}" for _, n in p.acked} - set(stored)
            assert not missing, f"{name}: {len(missing)} acknowledged records lost, e.g. {sorted(missing)[:3]}"
        log = "".join(proc.log_text() for proc in cp.procs)
        assert re.search(r"automatic failover: automatic: 'east' is down", log), "the controller's reason logged"
    finally:
        for p in producers.values():
            p._stop.set()
        for proc in procs:
            proc.stop()
        cp.stop()
