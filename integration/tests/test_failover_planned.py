"""Planned switchover (issue 14, item 4): `straitctl failover --planned` fences produce at every edge
(retriable NOT_LEADER_OR_FOLLOWER), waits until MirrorMaker 2 has copied everything to the standby (each
edge compares every partition's last record on both clusters), switches, and the producers' retried
batches land on the standby: RPO 0, with real Kafka clusters, real MM2, and a librdkafka producer at each
edge plus a Java one at edge-a."""

import re
import time

from lib.clients import unique
from lib.control import ControlPlane
from lib.mirrormaker import MirrorMaker, read_records
from lib.procs import Proc
from lib.wait import wait_for
from tests.test_encryption import create_topic, end_offset
from tests.test_failover import ContinuousProducer, JavaContinuousProducer, edge_metric
from tests.test_failover_automatic import EDGES, fg_status, new_edges, resources, serving, start_edges

PARTITIONS = 3


def planned_group(topic: str) -> str:
    return f"""
  mode: manual
  replication: {{ kind: mirrormaker2, source_alias: east, policy: identity, topics: ["{topic}"] }}
"""


def test_planned_switchover_fences_produce_waits_for_mirrormaker_and_loses_nothing(broker, logs, tmp_path):
    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    cp = ControlPlane(tmp_path / "cp", logs, nodes=1)
    for name in EDGES:
        cp.pki.leaf(name, uris=[f"spiffe://{cp.trust_domain}/edge/{name}"])
    cp.start()
    edges = new_edges()
    topic = unique("planned")
    procs: list[Proc] = []
    producers: dict[str, ContinuousProducer | JavaContinuousProducer] = {}
    mm = None
    try:
        spec = tmp_path / "resources.yaml"
        spec.write_text(resources(primary.bootstrap_servers[0], standby.bootstrap_servers[0], edges,
                                  planned_group(topic)))
        cp.ctl("apply", "-f", str(spec), check=True)
        procs += start_edges(cp, edges, logs, tmp_path)
        create_topic(primary.bootstrap_servers[0], topic, partitions=PARTITIONS)
        producers = {n: ContinuousProducer(e["bootstrap"], topic, label=f"{n}:").start() for n, e in edges.items()}
        producers["java@edge-a"] = JavaContinuousProducer(edges["edge-a"]["bootstrap"], topic,
                                                          label="java@edge-a:").start()
        for p in producers.values():
            wait_for(lambda: len(p.acked) >= 50, 60, what="records acknowledged by the primary")

        # No replication yet: the planned switch gives up, lifts the fence, and stays on the primary.
        r = cp.ctl("failover", "orders-dr", "--planned", "--lag-timeout", "4s")
        assert r.returncode != 0, r.stdout
        assert "no switch, replication did not catch up within 4s" in r.stderr, r.stderr
        assert re.search(rf"edge-[ab]: west behind \({re.escape(topic)}-\d", r.stderr), r.stderr
        assert "produce unfenced, east stays active" in r.stderr, r.stderr
        status = fg_status(cp)
        assert status.get("generation", 0) == 0 and "fence" not in status, status
        lifted_at = time.monotonic()
        for p in producers.values():
            wait_for(lambda: len(p.acked_after(lifted_at)) >= 20, 60, what="acks on the primary after the lift")

        # MM2 creates the standby's topic (same name, same partitions) and copies byte for byte.
        mm = MirrorMaker(primary, standby, logs, topics=topic, identity=True).start()
        wait_for(lambda: end_offset(standby.bootstrap_servers[0], topic) > 0, 90, what="MM2 copying to the standby")

        started = time.monotonic()
        r = cp.ctl("failover", "orders-dr", "--planned", "--lag-timeout", "60s", "--reason", "maintenance")
        took = time.monotonic() - started
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "produce fenced at generation 0 for a switch from east to west" in r.stdout, r.stdout
        m = re.search(r"active west at generation 1 \(was east\); replication caught up ([\d.]+) s after the fence",
                      r.stdout)
        assert m, r.stdout
        wait_for(lambda: serving(cp, 1), 30, what="both edges on the standby at generation 1")
        status = fg_status(cp)
        assert status.get("planned") is True and "fence" not in status, status
        switched_at = time.monotonic()
        for p in producers.values():
            wait_for(lambda: len(p.acked_after(switched_at)) >= 50, 60, what="acks on the standby after the switch")
        for p in producers.values():
            p.stop()
        # Fenced twice (the attempt and the switch), lifted once, switched once: four in-place swaps,
        # and the fence answered the producers' requests at every edge.
        for proc, (name, e) in zip(procs, edges.items()):
            assert edge_metric(e["admin"], "strait_upstream_swaps_total") == 4, name
            assert "produce fenced for a planned switchover" in proc.log_text(), name

        # RPO 0: every acknowledged record is on the standby exactly once, and what reached the primary
        # (all before the fence) was copied by MM2 before the switch.
        at_primary = [r.value.decode() for r in read_records(primary.bootstrap_servers[0], topic)]
        at_standby = [r.value.decode() for r in read_records(standby.bootstrap_servers[0], topic)]
        for name, p in producers.items():
            assert p.fatal == [] and p.failed == [], (name, p.fatal, p.failed[:3])
            acked = [f"{p.label}record-{n}" for _, n in p.acked]
            stored = [v for v in at_standby if v.startswith(p.label)]
            assert sorted(stored) == sorted(acked), f"{name}: acknowledged records not stored exactly once"
        assert set(at_primary) <= set(at_standby), "a record the primary took was not replicated before the switch"
        gaps = {n: max(b - a for (a, _), (b, _) in zip(p.acked, p.acked[1:])) for n, p in producers.items()}
        print(f"planned switchover: straitctl {took:.2f} s (replication caught up {m.group(1)} s after the fence); "
              f"longest gap between acknowledgements: " + ", ".join(f"{n} {g:.2f} s" for n, g in gaps.items())
              + f"; {len(at_primary)} records on the primary, all on the standby")
    finally:
        for p in producers.values():
            p._stop.set()
        if mm is not None:
            mm.stop()
        for proc in procs:
            proc.stop()
        cp.stop()
