"""Client scenarios, each run direct to the broker and through strait-edge, with every client library
(confluent-kafka, kafka-python, the Java client)."""

import os
import signal
import zlib

import pytest

from lib import kafka_wire
from lib.clients import Rec, client, unique
from lib.edge import VirtualCluster
from lib.ports import free_port
from lib.wait import wait_for

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def records(n: int, prefix: str = "v", start: int = 0) -> list[Rec]:
    return [Rec(f"k{i}".encode(), f"{prefix}{i}".encode()) for i in range(start, start + n)]


def producer_conf(lib: str, **kw) -> dict:
    """Translate a few neutral settings into each library's names."""
    names = {
        "confluent": {"compression": "compression.type", "idempotence": "enable.idempotence",
                      "max_bytes": "message.max.bytes"},
        "kafka-python": {"compression": "compression_type", "idempotence": "enable_idempotence",
                         "max_bytes": "max_request_size"},
        # The Java driver takes librdkafka's names and maps them (lib/java_client.py).
        "java": {"compression": "compression.type", "idempotence": "enable.idempotence",
                 "max_bytes": "message.max.bytes"},
    }[lib]
    return {names[k]: v for k, v in kw.items()}


def test_group_commits_and_resumes(target, lib):
    c = target.client(lib)
    topic, group = unique("resume"), unique("grp")
    c.create_topic(topic)
    c.produce(topic, records(20, "first-"))

    first = c.consumer(topic, group)
    got = first.take(20, timeout=60, settle=1.0)
    assert [r.value for r in got] == [f"first-{i}".encode() for i in range(20)]
    first.commit()
    first.close()

    c.produce(topic, records(10, "second-", start=20))
    second = c.consumer(topic, group)
    try:
        resumed = second.take(10, timeout=60, settle=2.0)
    finally:
        second.close()
    # Exactly the records after the committed offset: no duplicates, no loss.
    assert [r.value for r in resumed] == [f"second-{i}".encode() for i in range(20, 30)]
    assert [r.offset for r in resumed] == list(range(20, 30))


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip(target, lib, codec):
    c = target.client(lib)
    topic = unique(f"codec-{codec}")
    c.create_topic(topic)
    # Compressible and incompressible values in the same batch.
    sent = [Rec(f"k{i}".encode(), (b"abc" * 50 if i % 2 else os.urandom(150))) for i in range(60)]
    c.produce(topic, sent, **producer_conf(lib, compression=codec))
    got = c.consumer(topic).take(60, timeout=60)
    assert [(r.key, r.value) for r in got] == [(r.key, r.value) for r in sent]


def test_idempotent_producer(target, lib):
    c = target.client(lib)
    topic = unique("idem")
    c.create_topic(topic)
    delivered = c.produce(topic, records(100), **producer_conf(lib, idempotence=True))
    assert [r.offset for r in delivered] == list(range(100))
    got = c.consumer(topic).take(100, timeout=60, settle=1.0)
    assert [r.value for r in got] == [f"v{i}".encode() for i in range(100)]


def test_headers_round_trip(target, lib):
    c = target.client(lib)
    topic = unique("hdr")
    c.create_topic(topic)
    headers = [("trace", b"abc-123"), ("empty", b""), ("binary", bytes(range(256))), ("dup", b"1"), ("dup", b"2")]
    c.produce(topic, [Rec(b"k", b"with-headers", headers), Rec(b"k2", b"no-headers")])
    got = c.consumer(topic).take(2, timeout=60)
    assert got[0].value == b"with-headers"
    assert [(k, bytes(v) if v is not None else b"") for k, v in got[0].headers] == headers
    assert got[1].headers in ([], None)


def test_null_values_tombstones(target, lib):
    c = target.client(lib)
    topic = unique("tomb")
    c.create_topic(topic)
    c.produce(topic, [Rec(b"a", b"live"), Rec(b"a", None), Rec(None, b"no-key")])
    got = c.consumer(topic).take(3, timeout=60)
    assert [(r.key, r.value) for r in got] == [(b"a", b"live"), (b"a", None), (None, b"no-key")]


def test_one_mib_record(target, lib):
    c = target.client(lib)
    topic = unique("big")
    c.create_topic(topic)
    value = os.urandom(1024 * 1024)
    c.produce(topic, [Rec(b"big", value), Rec(b"small", b"after")], **producer_conf(lib, max_bytes=4 * 1024 * 1024))
    consumer_conf = {
        "confluent": {"fetch.max.bytes": 8 * 1024 * 1024, "max.partition.fetch.bytes": 4 * 1024 * 1024},
        "kafka-python": {"fetch_max_bytes": 8 * 1024 * 1024, "max_partition_fetch_bytes": 4 * 1024 * 1024},
        "java": {"fetch.max.bytes": 8 * 1024 * 1024, "max.partition.fetch.bytes": 4 * 1024 * 1024},
    }[lib]
    got = c.consumer(topic, **consumer_conf).take(2, timeout=60)
    assert len(got[0].value) == len(value) and zlib.crc32(got[0].value) == zlib.crc32(value)
    assert got[1].value == b"after"


def test_partitions_keys_land_consistently(target, lib):
    c = target.client(lib)
    topic = unique("parts")
    c.create_topic(topic, partitions=4)
    sent = [Rec(f"key-{i % 12}".encode(), f"v{i}".encode()) for i in range(240)]
    delivered = c.produce(topic, sent)
    by_key: dict[bytes, set[int]] = {}
    for r in delivered:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for p in by_key.values()), by_key
    assert len({p for ps in by_key.values() for p in ps}) > 1, "all keys hashed to one partition"
    got = c.consumer(topic).take(240, timeout=60, settle=1.0)
    assert len(got) == 240
    assert {r.key: r.partition for r in got} == {k: next(iter(p)) for k, p in by_key.items()}
    # Per-partition order is the broker's: every record is read back at the offset its delivery report
    # gave, in offset order. (Send order is not the reference: a producer without idempotence may
    # retry a batch behind later ones, e.g. while a new topic's leaders settle.)
    for p in range(4):
        read = [(r.offset, r.value) for r in got if r.partition == p]
        assert read == sorted((r.offset, r.value) for r in delivered if r.partition == p)


def test_metadata_lists_only_edge_addresses(target, lib):
    c = target.client(lib)
    topic, group = unique("md"), unique("mdgrp")
    c.create_topic(topic, partitions=2)
    c.produce(topic, records(4))
    consumer = c.consumer(topic, group)
    consumer.take(4, timeout=60)
    consumer.commit()
    brokers = c.brokers()
    described = c.described_brokers()
    coordinator = c.coordinator(group)
    consumer.close()
    assert brokers, "metadata returned no brokers"
    assert described == brokers, f"DescribeCluster {described} != Metadata {brokers}"
    if target.via == "direct":
        assert brokers == [("127.0.0.1", target.broker.port)]
        assert coordinator == ("127.0.0.1", target.broker.port)
        return
    vc = target.edge.cluster()
    for host, port in brokers + described + [coordinator]:
        assert host == vc.advertised_host, (host, port)
        assert port in vc.ports, f"{port} not in edge port range {vc.ports}"
        assert port != target.broker.port


def test_broker_restart_under_connected_producer(via, lib, broker, edge, tmp_path):
    # A cluster of its own whose storage survives the restart (Tansu: sqlite instead of memory).
    b = broker(persistent=True)
    e = edge(b) if via == "edge" else None
    bootstrap = e.bootstrap if e else b.bootstrap
    c = client(lib, bootstrap)
    topic = unique("restart")
    c.create_topic(topic)
    conf = {
        "confluent": {"message.timeout.ms": 60000, "reconnect.backoff.max.ms": 500},
        "kafka-python": {"reconnect_backoff_max_ms": 500, "retries": 1000, "delivery_timeout_ms": 60000,
                         "request_timeout_ms": 10000},
        # Retries are unbounded by default; delivery.timeout.ms bounds each record.
        "java": {"reconnect.backoff.max.ms": 500, "delivery.timeout.ms": 60000, "request.timeout.ms": 10000},
    }[lib]
    p = c.producer(**conf)
    try:
        p.send_all(topic, records(5, "before-"), timeout=30)
        # A broker restart is routine: the edge says so at WARN at most (the conftest fails the test on
        # any ERROR line).
        b.restart()
        after = p.send_all(topic, records(5, "after-", start=5), timeout=60)
        assert len(after) == 5
    finally:
        p.close()
    if e:
        assert e.alive(), "strait-edge died when the broker restarted"
    got = c.consumer(topic).take(5, timeout=60, settle=2.0)
    values = [r.value for r in got]
    for i in range(5, 10):
        assert f"after-{i}".encode() in values


@pytest.mark.edge_only
def test_bootstrap_servers_are_tried_in_turn(via, lib, broker, edge):
    """`upstream.bootstrap_servers` are tried in turn (each new bootstrap connection starts one entry
    further along): with a dead entry, every bootstrap connection still reaches the live broker."""
    b = broker()
    dead = f"127.0.0.1:{free_port()}"
    e = edge([VirtualCluster("turns", [dead, b.bootstrap])])
    host, port = e.bootstrap.rsplit(":", 1)
    # Four connections in a row: two of them start at the dead entry.
    for _ in range(4):
        assert 18 in kafka_wire.api_versions(host, int(port))
    assert e.metric("strait_upstream_connect_errors", virtual_cluster="turns") == 0
    c = client(lib, e.bootstrap)
    topic = unique("turns")
    c.create_topic(topic)
    c.produce(topic, records(3))
    assert [r.value for r in c.consumer(topic).take(3, timeout=60)] == [b"v0", b"v1", b"v2"]
    assert e.metric("strait_upstream_connect_errors", virtual_cluster="turns") == 0


@pytest.mark.edge_only
def test_two_virtual_clusters_are_isolated(via, lib, broker, edge):
    a, b = broker(dedicated=True, name="broker-a"), broker(dedicated=True, name="broker-b")
    e = edge([VirtualCluster("alpha", [a.bootstrap]), VirtualCluster("beta", [b.bootstrap])])
    ca, cb = client(lib, e.cluster("alpha").bootstrap), client(lib, e.cluster("beta").bootstrap)
    topic = unique("iso")
    ca.create_topic(topic)
    ca.produce(topic, records(3, "alpha-"))
    assert [r.value for r in ca.consumer(topic).take(3, timeout=60)] == [f"alpha-{i}".encode() for i in range(3)]
    # Same topic name in beta: it must not exist there, then hold only beta's records.
    assert cb.partitions(topic) == []
    cb.create_topic(topic)
    cb.produce(topic, records(2, "beta-"))
    got = cb.consumer(topic).take(2, timeout=60, settle=2.0)
    assert [r.value for r in got] == [b"beta-0", b"beta-1"]
    # Each cluster's brokers come from its own port range.
    assert all(port in e.cluster("alpha").ports for _, port in ca.brokers())
    assert all(port in e.cluster("beta").ports for _, port in cb.brokers())


def held_fetch(e, topic: str, max_wait_ms: int, correlation_id: int = 42):
    """A raw connection to `e`'s bootstrap with a Fetch past the end of `topic`'s partition 0 (3 records),
    which the broker holds for `max_wait_ms`; returns once the edge has read it (its request counter)."""
    host, port = e.bootstrap.rsplit(":", 1)
    before = e.metric("strait_requests", api_key="Fetch")
    sock = kafka_wire.connect(host, int(port), timeout=max_wait_ms / 1000 + 30)
    sock.sendall(kafka_wire.fetch_v4(correlation_id, topic, 0, 3, max_wait_ms))
    wait_for(lambda: e.metric("strait_requests", api_key="Fetch") > before, 10, what="the Fetch read by the edge")
    return sock


@pytest.mark.edge_only
def test_sigterm_turns_readyz_503_then_answers_in_flight_requests_then_exits(via, broker, edge):
    e = edge(broker(), extra={"shutdown": {"drain_timeout": "30s"}})
    c = client("confluent", e.bootstrap)
    topic = unique("drain")
    c.create_topic(topic)
    c.produce(topic, records(3))
    assert e.http_status("/healthz") == 200 and e.http_status("/readyz") == 200
    sock = held_fetch(e, topic, max_wait_ms=4000)
    with sock:
        e.proc.signal(signal.SIGTERM)
        # Load balancers are told first: /readyz says 503 while the held Fetch is still in flight.
        wait_for(lambda: e.http_status("/readyz") == 503, 10, what="/readyz 503 after SIGTERM")
        # Still alive, and says so: draining is not a reason for a liveness probe to restart it.
        assert e.alive() and e.http_status("/healthz") == 200
        # The in-flight request is answered, not cut off, and only then is the connection closed.
        response = kafka_wire.recv_frame(sock)
        assert kafka_wire.correlation_id(response) == 42
        assert kafka_wire.closed_by_peer(sock, timeout=10)
    assert e.terminate(timeout=30) == 0, e.proc.tail()
    assert "all connections drained" in e.log_text() and "drain timeout" not in e.log_text()


@pytest.mark.edge_only
def test_sigterm_closes_what_is_still_in_flight_at_the_drain_timeout(via, broker, edge):
    e = edge(broker(), extra={"shutdown": {"drain_timeout": "1s"}})
    c = client("confluent", e.bootstrap)
    topic = unique("drain")
    c.create_topic(topic)
    c.produce(topic, records(3))
    # Held far longer than the drain timeout: the edge closes it unanswered and exits cleanly.
    sock = held_fetch(e, topic, max_wait_ms=60000)
    with sock:
        e.proc.signal(signal.SIGTERM)
        assert kafka_wire.closed_by_peer(sock, timeout=30)
    assert e.terminate(timeout=30) == 0, e.proc.tail()
    assert "drain timeout reached; closing the remaining connections" in e.log_text()
