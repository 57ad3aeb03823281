"""Disaster-recovery failover (issue 14): a virtual cluster's upstream swapped from its primary to its
standby in place, with real Kafka clusters and real clients, through the same bootstrap.

The edge keeps its listeners (bootstrap and broker ports), drains the connections it had to the old
upstream, and forgets the old cluster's broker addresses; clients reconnect to the same addresses and get
the standby's metadata. Each scenario states what a client sees across the switch."""

import threading
import time

from lib.clients import unique
from lib.edge import VirtualCluster
from lib.wait import wait_for
from tests.test_encryption import consumer, create_topic, end_offset, poll_into


class ContinuousProducer:
    """One librdkafka producer (idempotent, acks=all) sending numbered records until stopped; every
    delivery report is kept with the time it arrived."""

    def __init__(self, bootstrap: str, topic: str, interval: float = 0.01, label: str = "", **conf):
        from confluent_kafka import Producer
        self.topic = topic
        self.label = label  # prefixes every value, so several producers' records tell apart
        self.interval = interval
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                                  "linger.ms": 5, "message.timeout.ms": 60000, "socket.timeout.ms": 10000,
                                  **conf})
        self.acked: list[tuple[float, int]] = []  # (monotonic time, record number)
        self.failed: list[tuple[int, str]] = []
        self.fatal: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _report(self, n: int):
        def on_delivery(err, _msg):
            if err is None:
                self.acked.append((time.monotonic(), n))
            else:
                self.failed.append((n, str(err)))
                if err.fatal():
                    self.fatal.append(str(err))
        return on_delivery

    def _run(self):
        while not self._stop.is_set():
            n = self.sent
            try:
                self.producer.produce(self.topic, key=f"k{n % 4}".encode(), value=f"{self.label}record-{n}".encode(),
                                      on_delivery=self._report(n))
                self.sent += 1
            except BufferError:
                pass
            self.producer.poll(self.interval)

    def start(self) -> "ContinuousProducer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 90.0) -> None:
        self._stop.set()
        self._thread.join(10)
        left = self.producer.flush(timeout)
        assert left == 0, f"{left} records still undelivered {timeout:.0f}s after the producer stopped"

    def first_ack_of(self, stored: list[str]) -> float:
        """When the first of these stored values (`record-N`) was acknowledged."""
        numbers = {int(v.rsplit("-", 1)[1]) for v in stored if v.startswith(f"{self.label}record-")}
        return min(at for at, n in self.acked if n in numbers)

    def acked_after(self, t: float) -> list[int]:
        return [n for at, n in list(self.acked) if at > t]


class JavaContinuousProducer:
    """The Java client's counterpart of ContinuousProducer (same fields and methods): one kafka-clients
    producer (idempotent, acks=all) sending numbered records in batches of `batch` until stopped, each
    batch's acknowledgements kept with the time the batch was acknowledged."""

    def __init__(self, bootstrap: str, topic: str, label: str = "java:", batch: int = 5, **conf):
        from lib.java_client import JavaClient
        self.topic, self.label, self.batch = topic, label, batch
        self.producer = JavaClient(bootstrap).producer(**{
            "enable.idempotence": "true", "acks": "all", "linger.ms": "5", "delivery.timeout.ms": "90000",
            "request.timeout.ms": "10000", **conf})
        self.acked: list[tuple[float, int]] = []
        self.failed: list[tuple[int, str]] = []
        self.fatal: list[str] = []  # what ends the producer (the driver's own errors)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from lib.clients import Rec
        from lib.java_client import JavaError
        while not self._stop.is_set():
            numbers = range(self.sent, self.sent + self.batch)
            records = [Rec(f"k{n % 4}".encode(), f"{self.label}record-{n}".encode()) for n in numbers]
            try:
                results = self.producer.send_results(self.topic, records, timeout=120)
            except Exception as e:  # noqa: BLE001 - the driver itself failed: recorded, the thread ends
                self.fatal.append(repr(e))
                return
            at = time.monotonic()
            self.sent += self.batch
            for n, r in zip(numbers, results):
                if isinstance(r, JavaError):
                    self.failed.append((n, str(r)))
                else:
                    self.acked.append((at, n))

    def start(self) -> "JavaContinuousProducer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 130.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the Java producer's last batch not acknowledged in {timeout:.0f}s"
        self.producer.close()

    first_ack_of = ContinuousProducer.first_ack_of
    acked_after = ContinuousProducer.acked_after


def values(bootstrap: str, topic: str) -> list[str]:
    """Every record value in partition 0 of `topic`, read directly from a cluster."""
    n = end_offset(bootstrap, topic)
    if n == 0:
        return []
    c = consumer(bootstrap, topic)
    got, errors = [], []
    try:
        wait_for(lambda: poll_into(c, got, errors, 0.3) or errors or len(got) >= n, 60, interval=0,
                 what=f"{n} records of {topic} at {bootstrap}")
    finally:
        c.close()
    assert not errors, errors[:3]
    return [g.value.decode() for g in got]


def switch_in_place(e, vc: VirtualCluster, to, cluster: str = "standby", generation: int = 1,
                    failover: dict | None = None) -> None:
    """What the control plane's failover decision does to a file-configured edge: the virtual cluster's
    upstream becomes `to` (cluster `cluster` of group orders-dr at `generation`, plus `failover`'s keys);
    returns once the edge swapped it (its swap count is the generation)."""
    vc.upstream = list(to.bootstrap_servers)
    vc.extra["upstream"] = {"bootstrap_servers": list(to.bootstrap_servers),
                            "failover": {"group": "orders-dr", "cluster": cluster, "generation": generation,
                                         **(failover or {})}}
    e.write_config()
    wait_for(lambda: e.metric("strait_upstream_swaps", virtual_cluster=vc.name) == generation, 30,
             what=f"the edge swapping {vc.name}'s upstream to {cluster}")


def test_an_upstream_switched_in_place_keeps_producers_going_on_the_standby(broker, edge):
    """A file-configured edge whose upstream is changed from the primary to the standby (what the control
    plane's failover decision does to every edge): the idempotent producer keeps its bootstrap, loses
    nothing it was told was acknowledged, and its records land on the standby from the switch on."""
    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    topic = unique("dr-orders")
    vc = VirtualCluster("orders", primary.bootstrap_servers)
    e = edge([vc])
    create_topic(e.bootstrap, topic)
    create_topic(standby.bootstrap_servers[0], topic)  # the standby holds the mirrored topic
    p = ContinuousProducer(e.bootstrap, topic).start()
    try:
        wait_for(lambda: len(p.acked) >= 50, 60, what="50 records acknowledged by the primary")
        switched_at = time.monotonic()
        switch_in_place(e, vc, standby)
        wait_for(lambda: len(p.acked_after(switched_at)) >= 50
                 and end_offset(standby.bootstrap_servers[0], topic) >= 50, 90,
                 what="50 records acknowledged after the switch, on the standby")
    finally:
        p.stop()
    assert p.fatal == [], p.fatal
    assert p.failed == [], p.failed[:5]
    at_primary, at_standby = values(primary.bootstrap_servers[0], topic), values(standby.bootstrap_servers[0], topic)
    acked = {f"record-{n}" for _, n in p.acked}
    # Nothing acknowledged is lost: every record is on one of the clusters, and none twice.
    assert acked <= set(at_primary) | set(at_standby), sorted(acked - set(at_primary) - set(at_standby))[:5]
    assert len(at_primary) + len(at_standby) == len(set(at_primary) | set(at_standby)), "no duplicates"
    assert len(at_standby) >= 50
    # The primary got nothing once the edge had switched: its records are the first ones, in order.
    assert at_primary == [f"record-{n}" for n in range(len(at_primary))]
    print(f"switch to first acknowledgement on the standby: {p.first_ack_of(at_standby) - switched_at:.2f} s "
          f"(includes the edge's 1 s config poll)")
    # Clients see the standby through the same bootstrap: a fresh consumer reads the standby's records.
    c = consumer(e.bootstrap, topic)
    got, errors = [], []
    try:
        wait_for(lambda: poll_into(c, got, errors, 0.3) or errors or len(got) >= len(at_standby), 60,
                 interval=0, what="the standby's records through the edge")
    finally:
        c.close()
    assert not errors, errors[:3]
    assert [g.value.decode() for g in got] == at_standby


def test_straitctl_failover_switches_every_edge_and_failback_returns(broker, logs, tmp_path):
    """A FailoverGroup behind two edges' virtual clusters (a 1-node control plane on mTLS): one
    `straitctl failover` moves both edges to the standby through their same bootstraps, each reports the
    generation it serves, `get fg` shows the decision and every edge's generation; `failback` returns."""
    import json
    from lib.ports import free_port, free_range
    from tests.test_control_plane import Control, binary, control_pki, DOMAIN
    from lib.procs import Proc

    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    pki = control_pki(tmp_path / "pki")
    for name in ("edge-a", "edge-b"):
        pki.leaf(name, uris=[f"spiffe://{DOMAIN}/edge/{name}"])
    control = Control(logs, tmp_path / "control", pki).start()
    edges, procs = {}, []
    docs = [f"""
kind: KafkaCluster
name: east
spec: {{ bootstrap_servers: ["{primary.bootstrap_servers[0]}"] }}
---
kind: KafkaCluster
name: west
spec: {{ bootstrap_servers: ["{standby.bootstrap_servers[0]}"] }}
---
kind: FailoverGroup
name: orders-dr
spec: {{ primary: east, standby: [west], mode: manual }}
"""]
    for name in ("edge-a", "edge-b"):
        port, ports, admin = free_port(), free_range(8), free_port()
        edges[name] = {"bootstrap": f"127.0.0.1:{port}", "admin": admin}
        docs.append(f"""
kind: Edge
name: {name}
spec: {{ cluster: east }}
---
kind: VirtualCluster
name: orders-{name}
spec:
  edge: {name}
  failover_group: orders-dr
  bootstrap: 127.0.0.1:{port}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {ports.start}-{ports.stop - 1} }}
""")
    try:
        control.apply("---".join(docs))
        for name, e in edges.items():
            procs.append(Proc(f"edge-{e['admin']}", [
                binary("strait-edge"), "--control", control.endpoint, "--name", name,
                "--control-ca", str(pki.pem("ca")), "--control-cert", str(pki.pem(name)),
                "--control-key", str(pki.key(name)), "--cache-dir", str(tmp_path / f"cache-{name}"),
                "--admin", f"127.0.0.1:{e['admin']}"], logs))
            procs[-1].start()
        topic = unique("dr-orders")
        for name, e in edges.items():
            wait_for(lambda: edge_ready(e["admin"]), 60, what=f"{name} serving")
        create_topic(primary.bootstrap_servers[0], topic)
        create_topic(standby.bootstrap_servers[0], topic)

        def fg() -> dict:
            r = control.ctl("get", "fg", "orders-dr", "-o", "json")
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        def serving(generation: int):
            edges_status = fg().get("status", {}).get("edges", {})
            return all(edges_status.get(n, {}).get("generation") == generation for n in edges)

        wait_for(lambda: serving(0), 60, what="both edges reporting generation 0")
        producers = {n: ContinuousProducer(e["bootstrap"], topic, label=f"{n}:").start() for n, e in edges.items()}
        try:
            for p in producers.values():
                wait_for(lambda: len(p.acked) >= 20, 60, what="records acknowledged by the primary")
            switched_at = time.monotonic()
            r = control.ctl("failover", "orders-dr", "--reason", "drill")
            assert r.returncode == 0, r.stderr
            assert "active west at generation 1" in r.stdout, r.stdout
            wait_for(lambda: serving(1), 30, what="both edges reporting generation 1")
            for p in producers.values():
                wait_for(lambda: len(p.acked_after(switched_at)) >= 20, 60, what="acks after the switch")
            wait_for(lambda: end_offset(standby.bootstrap_servers[0], topic) >= 40, 60,
                     what="both edges' records on the standby")
        finally:
            for p in producers.values():
                p.stop()
        status = fg()["status"]
        assert (status["active"], status["generation"], status["previous"]) == ("west", 1, "east"), status
        at_primary = values(primary.bootstrap_servers[0], topic)
        at_standby = values(standby.bootstrap_servers[0], topic)
        for name, p in producers.items():
            assert p.fatal == [] and p.failed == [], (name, p.fatal, p.failed[:3])
        acked = [f"{p.label}record-{n}" for p in producers.values() for _, n in p.acked]
        assert sorted(acked) == sorted(at_primary + at_standby), "every acknowledged record stored exactly once"
        for name, p in producers.items():
            print(f"{name}: failover command to first acknowledgement on the standby: "
                  f"{p.first_ack_of(at_standby) - switched_at:.2f} s")
        for e in edges.values():
            assert edge_metric(e["admin"], "strait_upstream_swaps_total") == 1

        r = control.ctl("failback", "orders-dr")
        assert r.returncode == 0 and "active east at generation 2" in r.stdout, (r.stdout, r.stderr)
        wait_for(lambda: serving(2), 30, what="both edges back on the primary, generation 2")
        # A stale decision is refused: the generation moved on.
        r = control.ctl("failover", "orders-dr", "--expect-generation", "1")
        assert r.returncode != 0 and "generation 1 expected, 2 found" in r.stderr, r.stderr
    finally:
        for proc in procs:
            proc.stop()
        control.stop()


def edge_ready(admin_port: int) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def edge_metric(admin_port: int, name: str, **labels) -> float:
    from tests.test_control_plane import edge_metric as metric
    return metric(admin_port, name, **labels)


def test_a_java_idempotent_producer_continues_on_the_standby_after_an_in_place_switch(broker, edge):
    """The Java client (kafka-clients 4.1) across the same in-place switch and back: its producer id is
    the primary's, which the standby has never seen; after the edge closes its connections it reconnects
    through the same bootstrap and carries on with no record failed, lost or written twice: the primary
    holds exactly the records sent before the switch and after the failback, the standby exactly those
    sent in between."""
    from lib.clients import Rec
    from lib.java_client import JavaClient, JavaError
    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    topic = unique("dr-java")
    vc = VirtualCluster("orders", primary.bootstrap_servers)
    e = edge([vc])
    create_topic(e.bootstrap, topic)
    create_topic(standby.bootstrap_servers[0], topic)
    p = JavaClient(e.bootstrap).producer(**{"enable.idempotence": "true", "acks": "all",
                                            "delivery.timeout.ms": "90000", "request.timeout.ms": "10000"})
    try:
        p.send_all(topic, [Rec(None, b"record-%d" % i) for i in range(20)])
        switch_in_place(e, vc, standby)
        after = p.send_results(topic, [Rec(None, b"record-%d" % i) for i in range(20, 40)], timeout=120)
        # Back to the primary, which still holds this producer id's state at its old sequence: the edge
        # has the producer bump its epoch (UNKNOWN_PRODUCER_ID), or the primary would answer
        # OUT_OF_ORDER_SEQUENCE_NUMBER, fatal to the producer.
        switch_in_place(e, vc, primary, cluster="primary", generation=2)
        back = p.send_results(topic, [Rec(None, b"record-%d" % i) for i in range(40, 60)], timeout=120)
    finally:
        p.close()
    failed = [r for r in after + back if isinstance(r, JavaError)]
    assert failed == [], failed[:3]
    assert values(primary.bootstrap_servers[0], topic) == [f"record-{i}" for i in [*range(20), *range(40, 60)]]
    assert values(standby.bootstrap_servers[0], topic) == [f"record-{i}" for i in range(20, 40)]
