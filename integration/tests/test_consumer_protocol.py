"""The new consumer group protocol (KIP-848, `group.protocol=consumer`: ConsumerGroupHeartbeat instead of
JoinGroup/SyncGroup) through an authorizing mTLS edge, with the libraries that implement it (librdkafka
and the Java client; kafka-python does not). Allowed groups consume and commit; a group the principal may
not read gets GROUP_AUTHORIZATION_FAILED from the edge, and two members share the partitions."""

import pytest

from lib.authz import authz_cluster, example_rules
from lib.clients import Rec, client, unique
from lib.pki import SPIFFE_BILLING, standard_pki
from lib.wait import wait_for

GROUP_AUTHORIZATION_FAILED = 30
KIP848_LIBS = ["confluent", "java"]


@pytest.fixture
def pki(tmp_path):
    return standard_pki(tmp_path / "pki")


def tls(pki, cert: str) -> dict:
    return {**pki.confluent_ssl(cert), "socket.timeout.ms": 10000}


@pytest.fixture
def secure(broker, edge, pki):
    vc = authz_cluster(broker(), pki, example_rules())
    e = edge([vc])
    return vc, e


def edge_client(lib: str, vc) -> object:
    return client(lib, f"localhost:{vc.bootstrap_port}")


@pytest.mark.parametrize("lib848", KIP848_LIBS)
def test_consumer_protocol_group_consumes_and_commits_through_authorizing_edge(secure, pki, lib848):
    lib = lib848
    vc, e = secure
    c = edge_client(lib, vc)
    topic = unique("orders-848")
    sent = [Rec(b"k%d" % i, b"v%d" % i, partition=i % 2) for i in range(20)]
    # The producer is `orders` (may write orders-*); the consumer is `billing` (shop account: reads
    # orders-* and groups shop-*).
    producer = c.producer(**tls(pki, "orders"))
    try:
        create = client("confluent", vc.upstream[0])
        create.create_topic(topic, partitions=2)
        producer.send_all(topic, sent, timeout=60)
    finally:
        producer.close()
    group = unique("shop-848")
    conf = {**tls(pki, "billing"), "group.protocol": "consumer"}
    consumer = c.consumer(topic, group=group, **conf)
    try:
        got = consumer.take(len(sent), timeout=90, settle=1.0)
        assert sorted(r.value for r in got) == sorted(r.value for r in sent)
        consumer.commit()
    finally:
        consumer.close()
    # The heartbeats were authorized as the group's Read, and the commit landed at the broker.
    assert e.metric("strait_authz_decisions", result="allow") > 0
    committed = committed_offsets(vc.upstream[0], group, topic, 2)
    assert sum(committed.values()) == len(sent), committed


@pytest.mark.parametrize("lib848", KIP848_LIBS)
def test_consumer_protocol_group_not_allowed_is_refused(secure, pki, lib848):
    lib = lib848
    vc, e = secure
    topic = unique("orders-848d")
    client("confluent", vc.upstream[0]).create_topic(topic)
    conf = {**tls(pki, "billing"), "group.protocol": "consumer"}
    consumer = edge_client(lib, vc).consumer(topic, group=unique("other-848"), **conf)
    try:
        code = wait_for(lambda: first_error_code(consumer), 60, what="a group authorization error")
    finally:
        consumer.close()
    assert code == GROUP_AUTHORIZATION_FAILED
    assert e.metric("strait_authz_decisions", result="deny") >= 1


@pytest.mark.parametrize("lib848", KIP848_LIBS)
def test_two_consumer_protocol_members_split_the_partitions(secure, pki, lib848):
    lib = lib848
    vc, _ = secure
    topic = unique("orders-848s")
    client("confluent", vc.upstream[0]).create_topic(topic, partitions=4)
    c = edge_client(lib, vc)
    group = unique("shop-848s")
    conf = {**tls(pki, "billing"), "group.protocol": "consumer"}
    a, b = c.consumer(topic, group=group, **conf), c.consumer(topic, group=group, **conf)
    try:
        # The broker's assignor gives each member its own partitions; wait for that before producing, so
        # that a member that joined alone cannot read records of partitions about to move.
        def split():
            a.take(0, timeout=5, settle=0.3)
            b.take(0, timeout=5, settle=0.3)
            pa, pb = assigned(a), assigned(b)
            return pa and pb and not (pa & pb) and len(pa | pb) == 4
        wait_for(split, 120, interval=0, what="two members with disjoint partitions")
        p = c.producer(**tls(pki, "orders"))
        try:
            p.send_all(topic, [Rec(None, b"s%d" % i, partition=i % 4) for i in range(40)], timeout=60)
        finally:
            p.close()
        seen_a, seen_b = [], []

        def both_consumed_all():
            seen_a.extend(a.take(0, timeout=5, settle=0.5))
            seen_b.extend(b.take(0, timeout=5, settle=0.5))
            return len(seen_a) + len(seen_b) >= 40
        wait_for(both_consumed_all, 120, interval=0, what="two members sharing 40 records")
        parts_a, parts_b = assigned(a), assigned(b)
    finally:
        a.close()
        b.close()
    values = [r.value for r in seen_a + seen_b]
    assert sorted(values) == sorted(b"s%d" % i for i in range(40))
    assert {r.partition for r in seen_a} <= parts_a and {r.partition for r in seen_b} <= parts_b


def assigned(consumer) -> set[int]:
    """Partition numbers currently assigned to a wrapper's consumer (Java driver or librdkafka)."""
    if hasattr(consumer, "assignment"):
        return {p for _, p in consumer.assignment()}
    return {tp.partition for tp in consumer.c.assignment()}


def first_error_code(consumer) -> int | None:
    """GROUP_AUTHORIZATION_FAILED once the client reports it, None while nothing happened yet."""
    try:
        got = consumer.take(0, timeout=5, settle=0.5)
    except Exception as exc:  # noqa: BLE001 - the wrappers raise the client's own error type
        text = str(exc)
        if "GROUP_AUTHORIZATION_FAILED" in text or "GroupAuthorization" in text:
            return GROUP_AUTHORIZATION_FAILED
        raise
    assert not got, f"records arrived for a group the principal may not read: {got[:3]}"
    return None


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()
