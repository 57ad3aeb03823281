"""What only a real multi-broker Apache Kafka shows, through the edge, with every client library:
three brokers behind three edge ports, leaders that move, a broker killed under acks=all load, and
(KIP-951) new-leader endpoints in Produce/Fetch answers that must never reveal a broker's address.

One 3-node KRaft cluster serves the module; scenarios use their own topics. The client-side socket check
(`lib.sockets.remote_ports`) proves no client connection ever reaches a broker port: the harness' own
admin client (which talks to brokers directly) is dropped before clients start.
"""

import threading
import time

import pytest

from lib.clients import Rec, client, unique
from lib.edge import VirtualCluster
from lib.kafka import KafkaCluster
from lib.sockets import client_pids, remote_ports
from lib.wait import wait_for


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    k = KafkaCluster(tmp_path_factory.mktemp("kafka3-logs"), brokers=3, name="kafka3",
                     config={"min.insync.replicas": 2})
    k.start()
    yield k
    k.stop()


def spread_topic(cluster: KafkaCluster, partitions: int = 3) -> str:
    """A topic replicated on all three brokers. Kafka's assignment starts at a random broker and moves
    one broker on per partition, so the leaders of three partitions are three different brokers."""
    topic = unique("spread")
    cluster.create_topic(topic, partitions=partitions, replication_factor=3)
    if partitions == 3:
        assert set(cluster.leaders(topic).values()) == {1, 2, 3}, cluster.leaders(topic)
    return topic


def drop_direct_connections(cluster: KafkaCluster) -> None:
    """Forget the harness' admin client, so that only clients remain in this process' socket table."""
    cluster._admin = None
    wait_for(lambda: not (remote_ports() & cluster.broker_ports()), 30,
             what="the harness' own broker connections closed")


class NoDirectConnections:
    """Samples the test process' (and the Java driver's) TCP peers while it runs; any broker port is a leak."""

    def __init__(self, cluster: KafkaCluster):
        self.broker_ports = cluster.broker_ports()
        self.leaks: set[int] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for pid in client_pids():
                self.leaks |= remote_ports(pid) & self.broker_ports
            self.samples += 1
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        assert self.samples > 0
        assert not self.leaks, f"a client connected straight to broker port(s) {sorted(self.leaks)}"


def edge_admin(bootstrap: str):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap})


def test_metadata_lists_three_edge_addresses_and_each_port_reaches_its_broker(cluster3, edge, lib):
    from confluent_kafka.admin import ConfigResource, ResourceType
    topic = spread_topic(cluster3)
    drop_direct_connections(cluster3)
    e = edge(cluster3)
    vc = e.cluster()
    with NoDirectConnections(cluster3):
        c = client(lib, e.bootstrap)
        brokers = c.brokers()
        assert len(brokers) == 3
        assert len({port for _, port in brokers}) == 3, brokers
        for host, port in brokers + c.described_brokers():
            assert host == vc.advertised_host and port in vc.ports, (host, port)
            assert port not in cluster3.broker_ports()
        # Leaders as clients see them through the edge: one partition per broker.
        admin = edge_admin(e.bootstrap)
        md = admin.list_topics(topic=topic, timeout=10)
        assert {pm.leader for pm in md.topics[topic].partitions.values()} == {1, 2, 3}
        # A broker answers DescribeConfigs for its own id only, so this proves every edge port
        # reaches the broker whose id the edge advertised for it.
        for node_id in (1, 2, 3):
            res = ConfigResource(ResourceType.BROKER, str(node_id))
            configs = admin.describe_configs([res])[res].result(timeout=30)
            assert configs["node.id"].value == str(node_id)
            # Broker configs that hold addresses are hidden, as Kafka hides passwords.
            for name in ("listeners", "advertised.listeners", "controller.quorum.voters"):
                assert configs[name].value is None and configs[name].is_sensitive, (name, configs[name])
        # And records land in the partition of each leader, read back through the edge.
        sent = [Rec(None, f"p{p}-v".encode(), partition=p) for p in range(3)]
        acked = c.produce(topic, sent, timeout=60)
        assert sorted((r.partition, r.value) for r in acked) == [(p, f"p{p}-v".encode()) for p in range(3)]
        got = c.consumer(topic).take(3, timeout=60)
        assert sorted((r.partition, r.value) for r in got) == [(p, f"p{p}-v".encode()) for p in range(3)]


def test_leader_moves_and_clients_follow_through_the_edge(cluster3, edge, lib):
    """Preferred-leader election after a reassignment moves partition 0 to another broker while a
    producer writes; with KIP-951 the broker's NOT_LEADER answers carry the new leader's endpoint,
    which the edge must rewrite (or never let the client negotiate) so the client follows via the edge."""
    topic = spread_topic(cluster3, partitions=1)
    old = cluster3.leaders(topic)[0]
    new = old % 3 + 1
    drop_direct_connections(cluster3)
    e = edge(cluster3)
    c = client(lib, e.bootstrap)
    with NoDirectConnections(cluster3):
        p = c.producer(**producer_conf(lib, acks="all", retries=True))
        try:
            first = p.send_all(topic, [Rec(None, b"before-%d" % i) for i in range(20)], timeout=60)
            assert len(first) == 20
            # Move the leader with Kafka's own tools (separate JVMs: their sockets are not the client's).
            cluster3.reassign(topic, {0: [new] + [n for n in (1, 2, 3) if n != new]}, observe_via=e.bootstrap)
            cluster3.elect_preferred_leaders(topic, [0])
            wait_for(lambda: leader_via_edge(e.bootstrap, topic) == new, 60,
                     what=f"leader {new} seen through the edge")
            after = p.send_all(topic, [Rec(None, b"after-%d" % i) for i in range(20)], timeout=90)
            assert len(after) == 20
        finally:
            p.close()
        got = c.consumer(topic).take(40, timeout=90, settle=1.0)
    values = sorted(r.value for r in got)
    assert values == sorted([b"before-%d" % i for i in range(20)] + [b"after-%d" % i for i in range(20)])


def leader_via_edge(bootstrap: str, topic: str) -> int:
    md = edge_admin(bootstrap).list_topics(topic=topic, timeout=10)
    return md.topics[topic].partitions[0].leader


def producer_conf(lib: str, acks: str = "all", retries: bool = True, idempotence: bool = False) -> dict:
    """The same producer settings in each library's own spelling."""
    if lib == "kafka-python":
        conf = {"acks": acks if acks != "all" else "all", "enable_idempotence": idempotence}
        if retries:
            conf |= {"retries": 1000, "retry_backoff_ms": 200, "delivery_timeout_ms": 120000,
                     "request_timeout_ms": 15000, "reconnect_backoff_max_ms": 1000}
        if idempotence:
            conf["max_in_flight_requests_per_connection"] = 5
        return conf
    conf = {"acks": acks, "enable.idempotence": idempotence}
    if retries:
        conf |= {"retries": 1000, "retry.backoff.ms": 200, "delivery.timeout.ms": 120000,
                 "request.timeout.ms": 15000, "reconnect.backoff.max.ms": 1000}
    if lib == "confluent":
        conf["message.timeout.ms"] = 120000
        del conf["delivery.timeout.ms"]
    return conf


def test_broker_killed_under_acks_all_load_loses_and_duplicates_nothing(cluster3, edge, lib):
    """Kill (SIGKILL) the leader of partition 0 while an idempotent acks=all producer writes through the
    edge: every acknowledged record is there exactly once after the client recovered through the edge."""
    topic = spread_topic(cluster3)
    victim = cluster3.leaders(topic)[0]
    drop_direct_connections(cluster3)
    e = edge(cluster3)
    e.expect_error(r"(?i)upstream|connect|broker|reset|closed|eof|refused")
    c = client(lib, e.bootstrap)
    total, acked = 600, []
    with NoDirectConnections(cluster3):
        p = c.producer(**producer_conf(lib, acks="all", idempotence=True))
        try:
            for batch in range(12):
                if batch == 4:
                    cluster3.kill(victim)
                recs = [Rec(None, b"r-%04d" % (batch * 50 + i), partition=(batch * 50 + i) % 3)
                        for i in range(50)]
                acked += p.send_all(topic, recs, timeout=120)
        finally:
            p.close()
        assert len(acked) == total
        got = c.consumer(topic).take(total, timeout=120, settle=2.0)
    values = [r.value for r in got]
    assert len(values) == len(set(values)), "duplicates despite idempotence"
    assert sorted(values) == sorted(r.value for r in acked)
    assert e.alive()
    cluster3.start_node(victim)


def test_api_versions_offer_no_version_whose_answers_would_carry_broker_addresses(cluster3, edge):
    """Fetch v16+ answers end with KIP-951 node endpoints after the records; the edge streams fetch
    answers undecoded, so it offers Fetch up to v15 (v16 adds only the endpoints, v17+ are for
    followers). Controller-quorum and broker-to-broker keys are not offered at all."""
    from lib.kafka_wire import api_versions
    e = edge(cluster3)
    direct = api_versions("127.0.0.1", cluster3.nodes[0].port)
    host, port = e.bootstrap.split(":")
    via_edge = api_versions(host, int(port))
    assert direct[1][1] >= 16 and via_edge[1][1] == 15, (direct[1], via_edge[1])
    assert via_edge[0][1] == min(direct[0][1], 13), "Produce is offered (its endpoints are rewritten)"
    for dropped in (52, 53, 54, 56, 58, 62, 67):  # Vote, quorum epochs, AlterPartition, Envelope, ...
        # (a broker may not advertise them on a client listener either; the edge must never)
        assert dropped not in via_edge, dropped


def test_describe_quorum_shows_the_voters_without_their_controller_listeners(cluster3, edge):
    """kafka-python's `describe_metadata_quorum` (DescribeQuorum v2): straight from a broker the three
    voters come with their CONTROLLER listeners; through the edge the same voters and leader, with
    every listener removed (a client has no business with controller addresses)."""
    from kafka import KafkaAdminClient

    def quorum(bootstrap: str) -> dict:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
        try:
            return admin.describe_metadata_quorum()
        finally:
            admin.close()

    def partition(q: dict) -> dict:
        [topic] = q["topics"]
        [p] = topic["partitions"]
        return p

    direct = quorum(cluster3.nodes[0].bootstrap)
    direct_listeners = [l for n in direct["nodes"] for l in n["listeners"]]
    controller_ports = {n.controller_port for n in cluster3.nodes}
    assert {l["port"] for l in direct_listeners} == controller_ports, direct["nodes"]

    e = edge(cluster3)
    via_edge = quorum(e.bootstrap)
    assert partition(via_edge)["error"] is None
    assert sorted(n["node_id"] for n in via_edge["nodes"]) == [1, 2, 3]
    assert all(n["listeners"] == [] for n in via_edge["nodes"]), via_edge["nodes"]
    assert partition(via_edge)["leader_id"] == partition(direct)["leader_id"]
    assert sorted(v["replica_id"] for v in partition(via_edge)["current_voters"]) == [1, 2, 3]
