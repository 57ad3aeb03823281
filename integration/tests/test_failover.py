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

    def __init__(self, bootstrap: str, topic: str, interval: float = 0.01, **conf):
        from confluent_kafka import Producer
        self.topic = topic
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
                self.producer.produce(self.topic, key=f"k{n % 4}".encode(), value=f"record-{n}".encode(),
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

    def acked_after(self, t: float) -> list[int]:
        return [n for at, n in list(self.acked) if at > t]


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
    p = ContinuousProducer(e.bootstrap, topic, debug="eos,msg,protocol").start()
    try:
        wait_for(lambda: len(p.acked) >= 50, 60, what="50 records acknowledged by the primary")
        vc.upstream = list(standby.bootstrap_servers)
        vc.extra["upstream"] = {"bootstrap_servers": list(standby.bootstrap_servers),
                                "failover": {"group": "orders-dr", "cluster": "standby", "generation": 1}}
        switched_at = time.monotonic()
        e.write_config()
        wait_for(lambda: e.metric("strait_upstream_swaps", virtual_cluster="orders") == 1, 30,
                 what="the edge swapping its upstream")
        wait_for(lambda: len(p.acked_after(switched_at)) >= 50
                 and end_offset(standby.bootstrap_servers[0], topic) >= 50, 40,
                 what="50 records acknowledged after the switch, on the standby")
        first_on_standby = min(at for at, n in p.acked if at > switched_at)
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
    print(f"switch to first acknowledgement on the standby: {first_on_standby - switched_at:.2f} s "
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
