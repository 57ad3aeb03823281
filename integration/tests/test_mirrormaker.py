"""MirrorMaker 2 (Apache Kafka 4.1.1, dedicated mode) between two dedicated single-node Kafka clusters,
`east` (source) and `west` (target), through lib/mirrormaker.py; and the harness' own `copy_topic`.

Every scenario produces the same 1,000 records to `orders` (3 partitions) at east: keys from 37
customers, random binary values of 0-200 bytes (one empty, one null), headers in a fixed order with a
repeated key and, on every 100th record, a header with a null value, and explicit CreateTime timestamps
(10 minutes ago plus the record's index). A copy is right when, partition by partition and offset by
offset, key, value, headers, timestamp type and timestamp are equal.

MM2 runs once per scenario with the test intervals of lib/mirrormaker.py: topic and group refresh 1 s,
checkpoints and group offset sync every 1 s, an offset sync per record (`offset.lag.max=0`), worker
offset flush 1 s, every replication factor 1, -Xmx384m. On the 2-core machine each scenario takes
10-25 s: two clusters start in about 7 s, MM2's herder in about 5 s, the 1,000 records arrive about
1 s later.
"""

import random
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from lib.mirrormaker import (MirrorMaker, copy_topic, latest_checkpoints, partition_counts, poll,
                             read_records, wait_mirrored)

TOPIC = "orders"
PARTITIONS = 3
COUNT = 1000
NULL_VALUE_AT = 500
EMPTY_VALUE_AT = 501


def clusters(kafka):
    # Started one after the other in this thread: a broker started from a helper thread would be
    # SIGKILLed when that thread ends (procs.py's PR_SET_PDEATHSIG follows the parent thread).
    return kafka(name="east"), kafka(name="west")


def produce_orders(cluster, topic: str = TOPIC, count: int = COUNT) -> list:
    """The scenario's records at the source; returns them as stored (read back raw)."""
    cluster.create_topic(topic, partitions=PARTITIONS)
    rnd = random.Random(7)
    base = int(time.time() * 1000) - 600_000
    p = Producer({"bootstrap.servers": cluster.bootstrap, "linger.ms": 20, "acks": "all",
                  "enable.idempotence": True})
    errors, sent = [], {}
    for i in range(count):
        value = rnd.randbytes(rnd.randrange(1, 200))
        if i == NULL_VALUE_AT:
            value = None
        elif i == EMPTY_VALUE_AT:
            value = b""
        headers = [("seq", str(i).encode()), ("trace", rnd.randbytes(16)), ("dup", b"first"), ("dup", b"second")]
        if i % 100 == 0:
            headers.append(("nothing", None))
        key = f"customer-{i % 37:02d}".encode()
        sent[i] = (key, value, tuple(headers), base + i)
        p.produce(topic, key=key, value=value, headers=headers, timestamp=base + i,
                  on_delivery=lambda err, _m: err and errors.append(err))
        p.poll(0)
    assert p.flush(30) == 0 and not errors, errors
    records = read_records(cluster.bootstrap, topic)
    # The truth the copies are compared with: exactly what was sent, as CreateTime (type 1).
    assert len(records) == count and {r.timestamp_type for r in records} == {1}
    assert {int(dict(r.headers)["seq"]): (r.key, r.value, r.headers, r.timestamp) for r in records} == sent
    assert sum(r.value is None for r in records) == 1 and sum(r.value == b"" for r in records) == 1
    assert sum(("nothing", None) in r.headers for r in records) == count // 100
    assert {r.partition for r in records} == set(range(PARTITIONS))
    return records


def assert_same_records(source: list, target: list, topic: str) -> None:
    assert len(target) == len(source), f"{topic}: {len(target)} records, expected {len(source)}"
    for s, t in zip(source, target):
        assert (t.partition, t.offset) == (s.partition, s.offset), f"{topic}: {t} where {s} was expected"
        assert t.content() == s.content(), f"{topic} {t.partition}@{t.offset}: {t} != {s}"


def topics_at(cluster) -> set[str]:
    return set(AdminClient({"bootstrap.servers": cluster.bootstrap}).list_topics(timeout=10).topics)


def end_offsets(records) -> dict[int, int]:
    ends = {}
    for r in records:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends


def commit_as_group(cluster, group: str, topic: str, count: int) -> None:
    """A consumer group reads every record of `topic` and commits (synchronously), then leaves."""
    c = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    try:
        c.subscribe([topic])
        seen = 0
        deadline = time.monotonic() + 60
        while seen < count:
            assert time.monotonic() < deadline, f"group {group} read {seen} of {count} records"
            msg = c.poll(0.5)
            if msg is not None and not msg.error():
                seen += 1
        assert seen == count
        c.commit(asynchronous=False)
    finally:
        c.close()


def group_offsets(cluster, group: str) -> dict[tuple[str, int], int]:
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
    return {(tp.topic, tp.partition): tp.offset for tp in fut.result(timeout=10).topic_partitions
            if tp.offset >= 0}


def test_default_policy_mirrors_byte_for_byte_and_checkpoints_groups(kafka, logs):
    east, west = clusters(kafka)
    source = produce_orders(east)
    ends = end_offsets(source)
    # A user topic ending in `.internal`: MM2 4.x's default topics.exclude (`mm2.*\.internal, ...`) keeps it.
    east.create_topic("ledger.internal")
    p = Producer({"bootstrap.servers": east.bootstrap})
    for i in range(10):
        p.produce("ledger.internal", value=b"entry-%d" % i)
    assert p.flush(30) == 0
    commit_as_group(east, "billing", TOPIC, COUNT)
    assert group_offsets(east, "billing") == {(TOPIC, pt): end for pt, end in ends.items()}

    with MirrorMaker(east, west, logs, topics=r"orders|ledger\.internal") as mm:
        counts = wait_mirrored(west.bootstrap, "east.orders", COUNT, timeout=60, mirror=mm)
        assert counts == {pt: end for pt, end in ends.items()}
        assert_same_records(source, read_records(west.bootstrap, "east.orders"), "east.orders")
        wait_mirrored(west.bootstrap, "east.ledger.internal", 10, timeout=30, mirror=mm)

        # The group's committed offsets (the end of each partition) arrive as checkpoints for the
        # remote topic, translated to the same offsets (the copy starts at offset 0 like the source)...
        want = {("billing", "east.orders", pt): (end, end) for pt, end in ends.items()}

        def checkpointed():
            latest = latest_checkpoints(west.bootstrap, "east", group="billing")
            return {k: (c["upstream_offset"], c["downstream_offset"]) for k, c in latest.items()} == want

        poll(checkpointed, 45, "checkpoints of group billing for every partition of east.orders", mirror=mm,
             describe=lambda: latest_checkpoints(west.bootstrap, "east", group="billing"))
        latest = latest_checkpoints(west.bootstrap, "east", group="billing")
        assert {c["metadata"] for c in latest.values()} == {""}
        assert {c["version"] for c in latest.values()} == {0}

        # ...and, with sync.group.offsets.enabled, as the target group's committed offsets.
        synced = {("east.orders", pt): end for pt, end in ends.items()}
        poll(lambda: group_offsets(west, "billing") == synced, 45, "billing's offsets synced at west",
             mirror=mm, describe=lambda: group_offsets(west, "billing"))

    names = topics_at(west)
    assert "east.orders" in names and TOPIC not in names
    assert "east.checkpoints.internal" in names
    # No reverse herder: nothing of MM2 at the source but its offset-syncs topic.
    assert {t for t in topics_at(east) if "mm2" in t} == {"mm2-offset-syncs.west.internal"}


def test_identity_policy_keeps_topic_names(kafka, logs):
    east, west = clusters(kafka)
    source = produce_orders(east)
    with MirrorMaker(east, west, logs, topics="orders", identity=True) as mm:
        counts = wait_mirrored(west.bootstrap, TOPIC, COUNT, timeout=60, mirror=mm)
        assert counts == end_offsets(source)
        assert_same_records(source, read_records(west.bootstrap, TOPIC), TOPIC)
    names = topics_at(west)
    assert TOPIC in names and "east.orders" not in names
    assert partition_counts(west.bootstrap, TOPIC) == end_offsets(source)


def test_copy_topic_renames_and_keeps_every_byte(kafka):
    east, west = clusters(kafka)
    source = produce_orders(east)
    assert copy_topic(east.bootstrap, TOPIC, west.bootstrap, "orders-copy") == COUNT
    assert TOPIC not in topics_at(west)
    assert_same_records(source, read_records(west.bootstrap, "orders-copy"), "orders-copy")
    # The source is untouched.
    assert partition_counts(east.bootstrap, TOPIC) == end_offsets(source)
