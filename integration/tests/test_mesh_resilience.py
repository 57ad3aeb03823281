"""The mesh when the network and the peers misbehave, with real processes: east and west edges (see
test_mesh.py), Apache Kafka behind east, and `strait-impair` (a userspace delay/loss relay; the kernel here
has no netem) between them where a test needs a bad link.

- a 50 ms round trip with 0.1% loss each way (QUIC) or 50 ms (TLS over TCP): every record crosses, in order;
- the near edge's address changes mid-stream (the relay rebinds, as a NAT does): the same QUIC connection
  migrates, no client notices;
- a partition (the relay drops everything), on both transports: the tunnel is declared dead within its 10 s,
  `/readyz` says so, and it comes back by itself when the partition heals;
- a consumer that stops reading (SIGSTOP) holds only its own stream: another consumer reads the same
  topic through the same tunnel meanwhile, the edges' memory stays bounded, and the stopped one gets
  every byte once it resumes;
- the far edge is SIGKILLed under a running producer and started again: it resets west's old connection
  (stateless reset), and the producer's records are all delivered, once each, without a client restart.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from lib.clients import unique
from lib.impair import Impair
from lib.ports import free_port
from lib.wait import wait_for
from tests.test_mesh import client, consume, create_topic, east_edge, produce, sites, west_edge


def linked_through(broker, logs, tmp_path, transport: str = "quic", delay_ms: float = 0.0, loss: float = 0.0):
    """Like test_mesh.linked, with west dialing east through a relay."""
    kafka = broker()
    east_pki, west_pki = sites(tmp_path)
    mesh_port, tcp_port, relay_port = free_port(), free_port(), free_port()
    tls_tcp = transport == "tls-tcp"
    relay = Impair(logs, udp=[] if tls_tcp else [(relay_port, mesh_port)],
                   tcp=[(relay_port, tcp_port)] if tls_tcp else [], delay_ms=delay_ms, loss=loss)
    east = west = None
    try:
        east = east_edge(logs, tmp_path, kafka, east_pki, west_pki, mesh_port,
                         tcp_port=tcp_port if tls_tcp else None).start()
        west = west_edge(logs, east_pki, west_pki, relay_port, transport=transport).start()
        wait_for(lambda: west.metric("strait_mesh_peer_connected", peer="edge-east") == 1, 30,
                 what=f"west's {transport} tunnel to east through the relay")
    except BaseException:
        for e in (west, east):
            if e is not None:
                e.terminate()
        relay.stop()
        raise
    return kafka, west_pki, east, west, relay


def delivery_reports():
    """Lists of acknowledged values and of errors, and the `on_delivery` callback that fills them."""
    acked, failed = [], []

    def report(err, msg):
        (failed.append(err) if err else acked.append(msg.value()))
    return acked, failed, report


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@pytest.mark.parametrize("transport", ["quic", "tls-tcp"])
def test_records_cross_a_50ms_lossy_link_in_order(broker, logs, tmp_path, transport):
    # The goal's link: 50 ms and 0.1% loss each way. TCP hides loss from a userspace relay (the kernel
    # retransmits below it), so tls-tcp gets the delay only.
    loss = 0.001 if transport == "quic" else 0.0
    kafka, west_pki, east, west, relay = linked_through(broker, logs, tmp_path, transport, delay_ms=25, loss=loss)
    try:
        topic = unique("slow")
        create_topic(kafka.bootstrap, topic)
        orders = client(west, west_pki, "orders")
        # About 10 MB: some 8,000 datagrams each way, so 0.1% loss drops several.
        values = [b"%06d-" % i + os.urandom(8 << 10) for i in range(1100)] + [os.urandom(1 << 20)]
        assert produce({**orders, "linger.ms": 5}, topic, values) == [None] * len(values)
        assert consume({**orders, "fetch.max.bytes": 4 << 20}, topic, len(values), timeout=90) == values
        stats = relay.stats()
        if transport == "quic":
            # The relay did drop packets, and QUIC saw the 50 ms it added.
            assert stats["udp_dropped"] >= 1, stats
            assert west.metric("strait_mesh_rtt_seconds", peer="edge-east") >= 0.045
            # Loopback segments UDP in the kernel: one send carries several datagrams.
            assert west.metric("strait_mesh_udp_gso_segments") > 1
        else:
            assert stats["tcp_connections"] == 1 and stats["tcp_bytes"] > 10 << 20, stats
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        west.terminate()
        east.terminate()
        relay.stop()


def test_the_tunnel_migrates_when_the_near_edge_address_changes(broker, logs, tmp_path):
    """The relay moves west's flow to a new source port mid-produce: east sees west at a new address, the
    QUIC connection validates the path and moves to it, and no stream is reset."""
    from confluent_kafka import Producer
    kafka, west_pki, east, west, relay = linked_through(broker, logs, tmp_path)
    try:
        topic = unique("migrate")
        create_topic(kafka.bootstrap, topic)
        orders = client(west, west_pki, "orders")
        producer = Producer({**orders, "enable.idempotence": True, "linger.ms": 0})
        acked, failed, report = delivery_reports()

        def send(n: int, prefix: bytes):
            for i in range(n):
                producer.produce(topic, value=b"%s-%d" % (prefix, i), on_delivery=report)
                producer.poll(0.01)
            assert producer.flush(30) == 0

        send(100, b"before")
        relay.command("rebind")
        send(100, b"after")
        wait_for(lambda: east.metric("strait_mesh_peer_address_changes", peer="edge-west") == 1, 10,
                 what="east noticing west's new address")
        send(50, b"moved")
        assert failed == [] and len(acked) == 250
        # One connection all along: dialed once by west, accepted once by east.
        assert west.metric("strait_mesh_connections", peer="edge-east", direction="dialed") == 1
        assert east.metric("strait_mesh_connections", peer="edge-west", direction="accepted") == 1
        assert "tunnel connection migrated to the peer's new address" in east.log_text()
        assert consume(orders, topic, 250) == acked
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        west.terminate()
        east.terminate()
        relay.stop()


@pytest.mark.parametrize("transport", ["quic", "tls-tcp"])
def test_a_partition_takes_the_tunnel_down_and_it_heals_by_itself(broker, logs, tmp_path, transport):
    from confluent_kafka import Producer
    from tests.test_mesh import readyz
    kafka, west_pki, east, west, relay = linked_through(broker, logs, tmp_path, transport)
    try:
        topic = unique("partition")
        create_topic(kafka.bootstrap, topic)
        orders = client(west, west_pki, "orders")
        producer = Producer({**orders, "enable.idempotence": True, "message.timeout.ms": 90000})
        acked, failed, report = delivery_reports()

        def send(prefix: bytes):
            for i in range(20):
                producer.produce(topic, value=b"%s-%d" % (prefix, i), on_delivery=report)
            assert producer.flush(90) == 0
        send(b"before")
        relay.command("blackhole on")
        # Keepalives go unanswered: dead after 10 s, whatever the transport.
        wait_for(lambda: west.metric("strait_mesh_peer_connected", peer="edge-east") == 0, 30,
                 what=f"west declaring the partitioned {transport} tunnel dead")
        assert readyz(west) == "ready\ntunnel edge-east: down\n"
        relay.command("blackhole off")
        wait_for(lambda: west.metric("strait_mesh_peer_connected", peer="edge-east") == 1, 30,
                 what="west redialing after the partition")
        send(b"after")
        assert failed == [] and len(acked) == 40
        assert west.metric("strait_mesh_connections", peer="edge-east", direction="dialed") == 2
        got = consume(orders, topic, 40)
        assert sorted(got) == sorted(acked) and len(set(got)) == 40
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        west.terminate()
        east.terminate()
        relay.stop()


STALLED_CONSUMER = textwrap.dedent("""
    import json, os, sys
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    conf, topic, count, progress = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    consumer = Consumer(conf)
    # Assigned, not subscribed: a group member stopped this long would be dropped from its group.
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got = 0
    while got < count:
        msg = consumer.poll(0.5)
        if msg is None or msg.error() is not None:
            continue
        assert msg.value()[:8] == b"%08d" % got, (got, msg.value()[:8])
        got += 1
        # Replaced, not rewritten: a SIGSTOP between truncate and write would leave it empty.
        with open(progress + ".tmp", "w") as f:
            f.write(str(got))
        os.replace(progress + ".tmp", progress)
    consumer.close()
""")


def test_a_stopped_consumer_holds_only_its_own_stream(broker, logs, tmp_path):
    """A consumer asks for 16 MB fetches of a 48 MB topic and is stopped (SIGSTOP) after its first
    records: its stream's windows fill and back-pressure reaches east's broker connection. Meanwhile a
    second consumer reads the whole topic through the same tunnel, a producer gets its acks, and both
    edges' memory stays within a bound; resumed, the first consumer gets every record in order."""
    from tests.test_mesh import linked
    kafka, east_pki, west_pki, east, west = linked(broker, logs, tmp_path)
    stalled = None
    try:
        topic = unique("stall")
        create_topic(kafka.bootstrap, topic)
        count, size = 768, 64 << 10
        values = [b"%08d" % i + os.urandom(size - 8) for i in range(count)]
        assert produce({"bootstrap.servers": kafka.bootstrap, "linger.ms": 20}, topic, values) == [None] * count
        orders = client(west, west_pki, "orders")
        big_fetch = {"fetch.max.bytes": 16 << 20, "max.partition.fetch.bytes": 16 << 20,
                     "receive.message.max.bytes": 17 << 20}
        progress = tmp_path / "stalled-progress"
        conf = {**orders, **big_fetch, "group.id": unique("g"), "enable.auto.commit": False}
        stalled = subprocess.Popen([sys.executable, "-c", STALLED_CONSUMER, json.dumps(conf), topic, str(count),
                                    str(progress)], stdout=subprocess.DEVNULL, stderr=open(logs / "stalled.log", "w"))
        wait_for(lambda: progress.exists() and progress.read_text() not in ("", "0"), 60,
                 what="the consumer's first records")
        os.kill(stalled.pid, signal.SIGSTOP)
        seen_at_stop = int(progress.read_text() or 0)
        before = {e: rss_bytes(e.proc.popen.pid) for e in (east, west)}
        peak = dict(before)
        done = threading.Event()

        def sample():
            while not done.is_set():
                for e in peak:
                    peak[e] = max(peak[e], rss_bytes(e.proc.popen.pid))
                done.wait(0.1)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            assert consume({**orders, **big_fetch}, topic, count, timeout=90) == values
            assert produce(orders, topic, [b"meanwhile"]) == [None]
        finally:
            done.set()
            sampler.join()
        assert int(progress.read_text()) == seen_at_stop, "the stopped consumer cannot have read on"
        growth = {("east" if e is east else "west"): (peak[e] - before[e]) >> 20 for e in peak}
        print(f"RSS growth while a consumer was stopped mid-fetch (MiB): {growth}")
        # Bounded: one 16 MB response decoded at east (its filters decode Fetch responses) plus the
        # stream's 8 MiB window, for the stopped and the running consumer; not the 48 MB topic.
        assert all(g < 96 for g in growth.values()), growth
        os.kill(stalled.pid, signal.SIGCONT)
        assert stalled.wait(90) == 0, (logs / "stalled.log").read_text()[-2000:]
        assert int(progress.read_text()) == count
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        if stalled is not None and stalled.poll() is None:
            os.kill(stalled.pid, signal.SIGCONT)
            stalled.kill()
        west.terminate()
        east.terminate()


def test_the_far_edge_killed_under_a_running_producer(broker, logs, tmp_path):
    """SIGKILL: east closes nothing. The restarted east answers west's next packet on the old connection
    with a stateless reset (its reset key comes from its key file, so it is the key the old process had);
    west drops the connection at once, the client streams reset, west redials; the idempotent producer
    retries and every record is at the broker once."""
    from confluent_kafka import Producer
    from tests.test_mesh import linked
    kafka, east_pki, west_pki, east, west = linked(broker, logs, tmp_path)
    stop = threading.Event()
    try:
        topic = unique("killed")
        create_topic(kafka.bootstrap, topic)
        orders = client(west, west_pki, "orders")
        producer = Producer({**orders, "enable.idempotence": True, "linger.ms": 5, "message.timeout.ms": 90000})
        acked, failed, report = delivery_reports()
        sent = [0]

        def run():
            while not stop.is_set():
                producer.produce(topic, value=b"r-%d" % sent[0], on_delivery=report)
                sent[0] += 1
                producer.poll(0.02)
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        wait_for(lambda: len(acked) >= 100, 30, what="records acknowledged before the kill")
        east.proc.popen.kill()
        east.proc.popen.wait(10)
        killed_at, acked_at_kill = time.monotonic(), len(acked)
        east.start()
        wait_for(lambda: len(acked) >= acked_at_kill + 100, 60, what="records acknowledged after east's restart")
        recovered = time.monotonic() - killed_at
        print(f"producer acknowledged again {recovered:.1f} s after east was killed")
        stop.set()
        runner.join()
        assert producer.flush(90) == 0
        assert failed == [] and len(acked) == sent[0]
        assert west.metric("strait_mesh_connections", peer="edge-east", direction="dialed") == 2
        assert "reset by peer" in west.log_text(), "west should have been reset, not timed out"
        got = consume(orders, topic, len(acked), timeout=60)
        assert sorted(got) == sorted(acked) and len(set(got)) == len(got), "every record once"
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        stop.set()
        west.terminate()
        east.terminate()


def test_the_java_client_through_the_tunnel(broker, logs, tmp_path):
    """The Java client (its own metadata, coordinator and fetch logic) at west, through west's bootstrap."""
    from lib.java_client import JavaClient, Rec
    from tests.test_mesh import linked
    kafka, east_pki, west_pki, east, west = linked(broker, logs, tmp_path)
    try:
        topic = unique("java")
        create_topic(kafka.bootstrap, topic)
        java = JavaClient(west.bootstrap, **west_pki.confluent_ssl("orders"))
        sent = [Rec(b"k-%d" % i, b"java-%d" % i) for i in range(200)]
        java.produce(topic, sent, **{"enable.idempotence": True, "compression.type": "zstd"})
        got = java.consumer(topic).take(len(sent), timeout=60, settle=0.5)
        assert [(r.key, r.value) for r in got] == [(r.key, r.value) for r in sent]
        assert all(port in range(c.ports.start, c.ports.stop) for c in [west.cluster()]
                   for _, port in java.brokers())
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        west.terminate()
        east.terminate()
