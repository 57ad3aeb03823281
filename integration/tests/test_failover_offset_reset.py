"""The edge's own offset reset (issue 14, item 5: "otherwise a configured policy (earliest, latest, by
timestamp)"): on a standby, a consumer group with no offset committed there and no MirrorMaker 2
checkpoint to translate starts where the failover group's `replication.offset_reset` says, whatever the
client's own `auto.offset.reset`.

One edge, three virtual clusters, each switched in place from the primary to the standby with one
policy (the control plane's translation of `before_switch_ms` into `timestamp_ms` is unit-tested in
edge/src/control.rs). The standby holds the mirrored topic: 10 records written two hours before the
switch, then 10 written a second before it. Each group's client asks for the opposite of what the edge
imposes, so the edge's answer is the only way to the asserted offset."""

import time

from confluent_kafka import Consumer, Producer

from lib.clients import unique
from lib.edge import VirtualCluster
from lib.wait import wait_for
from tests.test_encryption import create_topic
from tests.test_failover import switch_in_place

OLD, RECENT = 10, 10
HOUR_MS = 3_600_000


def first_record(bootstrap: str, topic: str, client_reset: str, placed=None, then=None):
    """(offset, value) of the first record a new group's member reads. With `placed(group)` (True once
    the edge has answered the group's OffsetFetch, which fixes where its member starts), `then` runs in
    between, before the first record arrives."""
    group = unique("fresh")
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": client_reset, "session.timeout.ms": 6000})
    c.subscribe([topic])
    try:
        if placed is not None:
            def started():
                msg = c.poll(0.2)
                assert msg is None or msg.error() is not None, f"read offset {msg.offset()} before the produce"
                return placed(group)
            wait_for(started, 60, interval=0, what=f"the edge placing {group}")
            then()
        msg = wait_for(lambda: (m := c.poll(0.5)) is not None and m.error() is None and m, 60,
                       interval=0, what="the group's first record")
        return msg.offset(), msg.value().decode()
    finally:
        c.close()


def test_groups_without_a_checkpoint_start_where_the_failover_group_says(broker, edge):
    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    topic = unique("reset")
    create_topic(standby.bootstrap_servers[0], topic)
    switch_ms = int(time.time() * 1000)
    p = Producer({"bootstrap.servers": standby.bootstrap_servers[0]})
    for n in range(OLD):
        p.produce(topic, value=f"old-{n}".encode(), timestamp=switch_ms - 2 * HOUR_MS)
    for n in range(RECENT):
        p.produce(topic, value=f"recent-{n}".encode(), timestamp=switch_ms - 1000)
    assert p.flush(30) == 0

    policies = {"earliest": "earliest", "latest": "latest",
                # What `before_switch_ms: 60000` becomes at the edge.
                "timestamp": {"timestamp_ms": switch_ms - 60_000}}
    clusters = {name: VirtualCluster(f"reset-{name}", primary.bootstrap_servers) for name in policies}
    e = edge(list(clusters.values()))
    for name, vc in clusters.items():
        # MM2's checkpoints topic is absent here, so no group has a checkpoint.
        switch_in_place(e, vc, standby, failover={"checkpoints_topic": "east.checkpoints.internal",
                                                  "offset_reset": policies[name]})

    # earliest: the log start, though the client asked for the end.
    assert first_record(clusters["earliest"].bootstrap, topic, "latest") == (0, "old-0")
    # By time: the first record written at or after a minute before the switch, though the client asked
    # for the end (or, with earliest, would have re-read the two-hour-old records too).
    assert first_record(clusters["timestamp"].bootstrap, topic, "latest") == (OLD, "recent-0")

    # latest: the end, though the client asked for the start; the next record produced is the first read.
    def produce_one():
        q = Producer({"bootstrap.servers": clusters["latest"].bootstrap})
        q.produce(topic, value=b"after-the-switch")
        assert q.flush(30) == 0
    def placed(group: str) -> bool:
        return any(f'"group":"{group}"' in line and "offset_reset" in line for line in e.log_text().splitlines())
    assert first_record(clusters["latest"].bootstrap, topic, "earliest", placed, produce_one) == \
        (OLD + RECENT, "after-the-switch")

    log = e.log_text()
    assert log.count("consumer offset placed by the edge's offset_reset") >= 3, "each placement is logged"
    assert "translated from MirrorMaker 2's checkpoint" not in log
