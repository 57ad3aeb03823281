"""A disaster-recovery drill, end to end, on real software (docs/failover.md):

- two Apache Kafka clusters, `east` (primary) and `west` (standby), with MirrorMaker 2 replicating
  `orders` east -> west (IdentityReplicationPolicy, so the name stays; checkpoints and group offset sync
  every second);
- a single-node control plane on mTLS with the FailoverGroup `orders-dr`, and one edge following it that
  serves the virtual cluster `orders` at 127.0.0.1:<port> from the group's active cluster;
- an idempotent acks=all producer and a consumer group, both through the edge only.

The drill kills east's broker (SIGKILL), runs `straitctl failover orders-dr`, and prints:
- RTO: the time from the command to the first record acknowledged on the standby, and to the first record
  consumed there;
- RPO: records acknowledged by the primary that never reached the standby, per partition;
- consumer duplicates: records the group read twice after it resumed on the standby.

Run with `make failover-drill` (about 2 minutes; it needs `make setup build`)."""

import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration"))

from lib.clients import unique  # noqa: E402
from lib.control import ControlPlane, binary  # noqa: E402
from lib.kafka import KafkaCluster  # noqa: E402
from lib.mirrormaker import MirrorMaker  # noqa: E402
from lib.ports import free_port, free_range  # noqa: E402
from lib.procs import Proc  # noqa: E402
from lib.wait import wait_for  # noqa: E402
from tests.test_encryption import end_offset  # noqa: E402
from tests.test_failover import ContinuousProducer, edge_ready, values  # noqa: E402

PARTITIONS = 1  # `values` and the RPO count read partition 0


class GroupConsumer:
    """A consumer group member through the edge: records it read (value, time), commits every second."""

    def __init__(self, bootstrap: str, topic: str, group: str):
        from confluent_kafka import Consumer
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                  "auto.offset.reset": "earliest", "enable.auto.commit": True,
                                  "auto.commit.interval.ms": 1000, "session.timeout.ms": 10000})
        self.consumer.subscribe([topic])
        self.read: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            m = self.consumer.poll(0.2)
            if m is not None and not m.error():
                self.read.append((time.monotonic(), m.value().decode()))

    def start(self) -> "GroupConsumer":
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


def main() -> int:
    work = Path(f"/tmp/strait-drill-{int(time.time())}")
    logs = work / "logs"
    logs.mkdir(parents=True)
    print(f"[drill] working directory {work}")
    east = KafkaCluster(logs, name="kafka-east")
    west = KafkaCluster(logs, name="kafka-west")
    control = ControlPlane(work / "control", logs)
    edge = mm = producer = group = None
    topic, group_id = unique("orders"), unique("billing")
    port, ports, admin = free_port(), free_range(8), free_port()
    try:
        print("[drill] starting Kafka east and west, and the control plane")
        east.start()
        west.start()
        control.start()
        control.pki.leaf("edge-a", uris=[f"spiffe://{control.trust_domain}/edge/edge-a"])
        manifest = work / "drill.yaml"
        manifest.write_text(f"""
kind: KafkaCluster
name: east
spec: {{ bootstrap_servers: ["{east.bootstrap}"] }}
---
kind: KafkaCluster
name: west
spec: {{ bootstrap_servers: ["{west.bootstrap}"] }}
---
kind: FailoverGroup
name: orders-dr
spec:
  primary: east
  standby: [west]
  mode: manual
  replication: {{ kind: mirrormaker2, source_alias: east }}
---
kind: Edge
name: edge-a
spec: {{ cluster: east }}
---
kind: VirtualCluster
name: orders
spec:
  edge: edge-a
  failover_group: orders-dr
  bootstrap: 127.0.0.1:{port}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {ports.start}-{ports.stop - 1} }}
""")
        control.ctl("apply", "-f", str(manifest), check=True)
        pki = control.pki
        edge = Proc("strait-edge", [
            binary("strait-edge"), "--control", control.endpoints, "--name", "edge-a",
            "--control-ca", str(pki.pem("ca")), "--control-cert", str(pki.pem("edge-a")),
            "--control-key", str(pki.key("edge-a")), "--cache-dir", str(work / "edge-cache"),
            "--admin", f"127.0.0.1:{admin}"], logs)
        edge.start()
        wait_for(lambda: edge_ready(admin), 60, what="the edge serving")
        bootstrap = f"127.0.0.1:{port}"
        east.create_topic(topic, partitions=PARTITIONS)
        print(f"[drill] the edge serves virtual cluster orders at {bootstrap} from east; MirrorMaker 2 east -> west")
        mm = MirrorMaker(east, west, logs, topics=topic, identity=True, fail_on_errors=False).start()

        producer = ContinuousProducer(bootstrap, topic).start()
        group = GroupConsumer(bootstrap, topic, group_id).start()
        wait_for(lambda: len(producer.acked) >= 300 and len(group.read) >= 200, 120,
                 what="traffic through the edge")
        wait_for(lambda: end_offset(west.bootstrap, topic) >= 100, 60, what="MirrorMaker 2 copying to west")

        print("[drill] SIGKILL east's broker")
        east.kill(1)
        command_at = time.monotonic()
        out = control.ctl("failover", "orders-dr", "--reason", "drill: east is gone", check=True).stdout.strip()
        print(f"[drill] straitctl failover orders-dr -> {out}")
        mm.stop()
        mm = None
        wait_for(lambda: producer.acked_after(command_at) and [t for t, _ in group.read if t > command_at], 90,
                 what="records acknowledged and consumed on the standby")
        wait_for(lambda: len(producer.acked_after(command_at)) >= 100, 60, what="100 records on the standby")
        producer.stop()
        producer_done = producer
        producer = None
        at_west = values(west.bootstrap, topic)
        wait_for(lambda: {v for _, v in group.read} >= set(at_west), 60, what="the group reading the standby")
        group.stop()
        group_done = group
        group = None

        acked = {f"record-{n}" for _, n in producer_done.acked}
        lost = sorted(acked - set(at_west), key=lambda v: int(v.rsplit("-", 1)[1]))
        after = [v for t, v in group_done.read if t > command_at]
        before = {v for t, v in group_done.read if t <= command_at}
        duplicates = sum(1 for v in after if v in before)
        first_read = min(t for t, _ in group_done.read if t > command_at)
        fg = json.loads(control.ctl("get", "fg", "orders-dr", "-o", "json", check=True).stdout)
        print("[drill] result")
        print(f"  active cluster: {fg['status']['active']} at generation {fg['status']['generation']}; "
              f"edges: {fg['status'].get('edges', {})}")
        first_after = min(at for at, n in producer_done.acked if at > command_at)
        print(f"  RTO produce: {first_after - command_at:.2f} s from the command to the first acknowledgement "
              f"on the standby")
        print(f"  RTO consume: {first_read - command_at:.2f} s from the command to the first record consumed "
              f"on the standby")
        print(f"  RPO: {len(lost)} acknowledged records never reached the standby (partition 0"
              f"{': ' + ', '.join(lost[:5]) + (' ...' if len(lost) > 5 else '') if lost else ''}) out of "
              f"{len(acked)} acknowledged" + ("; MirrorMaker 2 had not copied them when east died" if lost else ""))
        print(f"  consumer: {duplicates} records read again after resuming on the standby "
              f"(MM2 group offset sync every 1 s)")
        producer_ok = not producer_done.fatal and not producer_done.failed
        print(f"  producer errors: {len(producer_done.failed)} (fatal: {len(producer_done.fatal)})")
        return 0 if producer_ok else 1
    finally:
        for thing in (producer, group):
            if thing is not None:
                try:
                    thing.stop()
                except Exception as e:  # noqa: BLE001 - teardown goes on
                    print(f"[drill] teardown: {e}")
        if mm is not None:
            mm.stop()
        if edge is not None:
            edge.stop()
        control.stop()
        west.stop()
        east.stop()


if __name__ == "__main__":
    sys.exit(main())
