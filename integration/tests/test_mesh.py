"""The mesh with real processes: two strait-edges (east, west) linked by a QUIC tunnel, Apache Kafka behind
east, and confluent-kafka clients at west that know only west's bootstrap.

- west serves `east-orders` (`upstream.remote: { peer: edge-east, virtual_cluster: orders }`); a client with
  a west.example certificate produces and consumes east's topic through it, and the records are at east's
  broker; east's encryption applies (the broker holds ciphertext, the west client reads plaintext);
- east authorizes the forwarded principal with its own rules (billing is denied at east's rules) and
  audits it with the peer that forwarded it;
- a principal outside east's `may_assert` for west is refused at stream open, counted on both sides;
- an edge whose certificate comes from another CA but claims west's SPIFFE ID is refused at the handshake;
- the tunnel recovers by itself when east restarts: the same client producer goes on without a restart.
"""

import json
import time
from pathlib import Path

import pytest
import yaml

from lib.authz import TOPIC_AUTHORIZATION_FAILED, read_audit
from lib.clients import unique
from lib.edge import Edge, VirtualCluster
from lib.pki import Pki
from lib.ports import free_port
from lib.wait import wait_for
from tests.test_encryption import parse_cipher

EAST, WEST = "east.example", "west.example"
EAST_ID, WEST_ID = f"spiffe://{EAST}/edge/edge-east", f"spiffe://{WEST}/edge/edge-west"
ORDERS, BILLING = f"spiffe://{WEST}/ns/shop/sa/orders", f"spiffe://{WEST}/ns/shop/sa/billing"
OPS = f"spiffe://{WEST}/ns/ops/sa/admin"
KEYRING = '{"keys":{"kek-a":["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]}}'


def sites(tmp: Path) -> tuple[Pki, Pki]:
    east, west = Pki(tmp / "east"), Pki(tmp / "west")
    east.ca("ca")
    east.leaf("edge", uris=[EAST_ID], ips=["127.0.0.1"])
    west.ca("ca")
    west.leaf("edge", uris=[WEST_ID], ips=["127.0.0.1"])
    for name, uri in (("orders", ORDERS), ("billing", BILLING), ("ops", OPS)):
        west.leaf(name, uris=[uri])
    return east, west


def east_edge(logs: Path, tmp: Path, kafka, east: Pki, west: Pki, mesh_port: int, tcp_port: int | None = None,
              dial_west: str | None = None, transport: str = "quic") -> Edge:
    (tmp / "keys.json").write_text(KEYRING)
    orders = VirtualCluster(name="orders", upstream=kafka.bootstrap_servers, extra={
        # East's own rules, applied to principals its peers forward.
        "authorization": {"rules": [{"principal": ORDERS, "allow": ["All"], "topic": "*"},
                                    {"principal": ORDERS, "allow": ["All"], "group": "*"},
                                    {"principal": f"spiffe://{WEST}/ns/shop/sa/*", "allow": ["IdempotentWrite"],
                                     "cluster": True},
                                    {"principal": BILLING, "allow": ["Describe"], "topic": "*"}]},
        "audit": {"path": str(tmp / "east-audit.jsonl"), "sample_allows": 1.0},
        "encryption": {"rules": [{"topic": "mesh-*", "kms": "dev", "kek": "kek-a"}]},
    })
    return Edge(logs, [orders], extra={
        "kms": [{"name": "dev", "local": {"path": str(tmp / "keys.json")}}],
        "mesh": {
            "listen": f"127.0.0.1:{mesh_port}",
            **({"listen_tcp": f"127.0.0.1:{tcp_port}"} if tcp_port else {}),
            "identity": {"cert": str(east.pem("edge")), "key": str(east.key("edge"))},
            "trust_bundles": [{"trust_domain": WEST, "pem": str(west.pem("ca"))}],
            "peers": [{"name": "edge-west", "spiffe_id": WEST_ID, "may_assert": [f"spiffe://{WEST}/ns/shop/*"],
                       "exports": ["orders"], "transport": transport,
                       **({"address": dial_west} if dial_west else {})}],
        }})


def west_edge(logs: Path, east: Pki, west: Pki, mesh_port: int | None, identity: Pki | None = None,
              transport: str = "quic", listen: dict | None = None) -> Edge:
    identity = identity or west
    remote = VirtualCluster(name="east-orders", upstream=[], extra={
        "upstream": {"remote": {"peer": "edge-east", "virtual_cluster": "orders"}, "connect_timeout": "5s"},
        "tls": {"cert": str(west.pem("edge")), "key": str(west.key("edge")),
                "client_trust_bundles": [{"trust_domain": WEST, "pem_file": str(west.pem("ca"))}]},
    })
    return Edge(logs, [remote], extra={"mesh": {
        **(listen or {}),
        "identity": {"cert": str(identity.pem("edge")), "key": str(identity.key("edge"))},
        "trust_bundles": [{"trust_domain": EAST, "pem": str(east.pem("ca"))}],
        "peers": [{"name": "edge-east", "spiffe_id": EAST_ID, "transport": transport,
                   **({"address": f"127.0.0.1:{mesh_port}"} if mesh_port else {})}],
    }})


def readyz(edge: Edge) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://{edge.admin_host}:{edge.admin_port}/readyz", timeout=5) as resp:
        return resp.read().decode()


def client(edge: Edge, west: Pki, cert: str) -> dict:
    return {"bootstrap.servers": edge.bootstrap, **west.confluent_ssl(cert)}


def produce(config: dict, topic: str, values: list[bytes]) -> list:
    from confluent_kafka import Producer
    errors: list = []
    producer = Producer({**config, "message.timeout.ms": 20000, "enable.idempotence": True,
                         "message.max.bytes": 4 << 20})
    for value in values:
        producer.produce(topic, value=value, on_delivery=lambda err, msg: errors.append(err))
    producer.flush(30)
    assert len(errors) == len(values), "a delivery report is missing"
    return errors


def consume(config: dict, topic: str, count: int, timeout: float = 30) -> list[bytes]:
    from confluent_kafka import Consumer
    consumer = Consumer({"group.id": unique("g"), "auto.offset.reset": "earliest", **config})
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
    finally:
        consumer.close()
    return got


def create_topic(bootstrap: str, name: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)


def linked(broker, logs: Path, tmp_path: Path, transport: str = "quic"):
    """Kafka, both sites' PKIs, and east and west edges with west's tunnel up (on `transport`)."""
    kafka = broker()
    east_pki, west_pki = sites(tmp_path)
    mesh_port, tcp_port = free_port(), free_port()
    east = east_edge(logs, tmp_path, kafka, east_pki, west_pki, mesh_port,
                     tcp_port=tcp_port if transport == "tls-tcp" else None).start()
    try:
        west = west_edge(logs, east_pki, west_pki, tcp_port if transport == "tls-tcp" else mesh_port,
                         transport=transport).start()
        wait_for(lambda: west.metric("strait_mesh_peer_connected", peer="edge-east") == 1, 30,
                 what=f"west's {transport} tunnel to east")
    except BaseException:
        east.terminate()
        raise
    return kafka, east_pki, west_pki, east, west


def test_west_client_produces_and_consumes_east_topics_through_its_own_edge(broker, logs, tmp_path):
    kafka, east_pki, west_pki, east, west = linked(broker, logs, tmp_path)
    try:
        assert readyz(west) == "ready\ntunnel edge-east: up\n"
        topic = unique("mesh")
        create_topic(kafka.bootstrap, topic)
        orders = client(west, west_pki, "orders")
        values = [b"order-%d" % i for i in range(50)] + [b"x" * (1 << 20)]
        assert produce({**orders, "compression.type": "lz4"}, topic, values) == [None] * len(values)
        assert consume(orders, topic, len(values)) == values
        # East's broker has them, encrypted by east's rule (KMS of east); west never held the key.
        stored = consume({"bootstrap.servers": kafka.bootstrap}, topic, len(values))
        assert len(stored) == len(values)
        assert all(parse_cipher(v)["kms"] == "dev" for v in stored)
        assert b"order-0" not in stored[0]

        # East's rules apply to the principal west forwarded: billing may describe, not write.
        errors = produce(client(west, west_pki, "billing"), topic, [b"billing"])
        assert [e.code() for e in errors] == [TOPIC_AUTHORIZATION_FAILED]
        # The audit writer runs behind the answers: wait for billing's deny line, then read them all.
        audit = tmp_path / "east-audit.jsonl"
        wait_for(lambda: [l for l in read_audit(audit) if l["decision"] == "deny" and l["principal"] == BILLING],
                 10, what="east's audit line for billing's denied produce")
        lines = read_audit(audit)
        denied = [l for l in lines if l["decision"] == "deny" and l["principal"] == BILLING]
        assert all(l["via_peer"] == "edge-west" for l in denied), denied
        assert any(l["principal"] == ORDERS and l["via_peer"] == "edge-west" for l in lines)

        # OPS is outside what east lets west assert: refused at stream open, before any Kafka byte.
        assert produce(client(west, west_pki, "ops"), topic, [b"ops"])[0] is not None
        assert east.metric("strait_mesh_stream_refusals", peer="edge-west", direction="inbound",
                           reason="principal_not_allowed") >= 1
        assert west.metric("strait_upstream_refusals", virtual_cluster="east-orders",
                           reason="principal_not_allowed") >= 1
        assert "edge-west may not assert " + OPS in east.log_text()
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        west.terminate()
        east.terminate()


def test_a_peer_with_a_certificate_from_another_ca_is_refused(broker, logs, tmp_path):
    kafka = broker()
    east_pki, west_pki = sites(tmp_path)
    rogue = Pki(tmp_path / "rogue")
    rogue.ca("ca")
    rogue.leaf("edge", uris=[WEST_ID], ips=["127.0.0.1"])
    mesh_port = free_port()
    east = east_edge(logs, tmp_path, kafka, east_pki, west_pki, mesh_port).start()
    impostor = west_edge(logs, east_pki, west_pki, mesh_port, identity=rogue).start()
    try:
        wait_for(lambda: east.metric("strait_mesh_connections_refused", reason="handshake") >= 1, 30,
                 what="east refusing the impostor's handshake")
        # East never takes the impostor as its peer. The impostor may count itself connected for a moment:
        # in TLS 1.3 the client's handshake completes before the server has checked the client's
        # certificate, and east's refusal closes the connection right after.
        assert east.metric("strait_mesh_peer_connected", peer="edge-west") == 0
        wait_for(lambda: impostor.metric("strait_mesh_peer_connected", peer="edge-east") == 0, 30,
                 what="the impostor's tunnel closed by east")
        assert "tunnel connection refused: handshake failed" in east.log_text()
    finally:
        impostor.terminate()
        east.terminate()


def test_clients_recover_by_themselves_when_the_far_edge_restarts(broker, logs, tmp_path):
    from confluent_kafka import Producer
    kafka, east_pki, west_pki, east, west = linked(broker, logs, tmp_path)
    try:
        topic = unique("mesh")
        create_topic(kafka.bootstrap, topic)
        orders = client(west, west_pki, "orders")
        producer = Producer({**orders, "enable.idempotence": True, "message.timeout.ms": 60000})
        acked: list[bytes] = []
        failed: list = []

        def report(err, msg):
            (failed.append(err) if err else acked.append(msg.value()))

        def send(values):
            for v in values:
                producer.produce(topic, value=v, on_delivery=report)
            producer.flush(60)

        send([b"before-%d" % i for i in range(20)])
        assert east.terminate() == 0
        east.start()  # same ports, same config
        wait_for(lambda: west.metric("strait_mesh_peer_connected", peer="edge-east") == 1, 30,
                 what="west redialing east")
        send([b"after-%d" % i for i in range(20)])
        assert failed == []
        got = consume(orders, topic, 40)
        assert sorted(got) == sorted(acked) and len(got) == 40, "every acknowledged record once"
    finally:
        west.terminate()
        east.terminate()


def test_the_tls_over_tcp_fallback_carries_the_same_streams(broker, logs, tmp_path):
    """`transport: tls-tcp` (for networks that block UDP): yamux streams over one TLS connection."""
    kafka, east_pki, west_pki, east, west = linked(broker, logs, tmp_path, transport="tls-tcp")
    try:
        topic = unique("mesh")
        create_topic(kafka.bootstrap, topic)
        orders = client(west, west_pki, "orders")
        values = [b"tcp-%d" % i for i in range(200)] + [b"y" * (1 << 20)]
        assert produce(orders, topic, values) == [None] * len(values)
        assert consume(orders, topic, len(values)) == values
        assert produce(client(west, west_pki, "ops"), topic, [b"ops"])[0] is not None
        assert east.metric("strait_mesh_stream_refusals", peer="edge-west", direction="inbound",
                           reason="principal_not_allowed") >= 1
        assert "tunnel from the peer is up (accepted, TLS over TCP)" in east.log_text()
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        west.terminate()
        east.terminate()


@pytest.mark.parametrize("transport", ["quic", "tls-tcp"])
@pytest.mark.parametrize("dialing", ["east", "both"])
def test_either_edge_may_dial_and_the_pair_keeps_one_connection(broker, logs, tmp_path, transport, dialing):
    """West's clients reach east's cluster on a connection east dialed (west has no address for east),
    or, when both edges dial each other, on the one connection the pair keeps."""
    kafka = broker()
    east_pki, west_pki = sites(tmp_path)
    tcp = transport == "tls-tcp"
    east_port, west_port = free_port(), free_port()
    west_listen = {"listen_tcp" if tcp else "listen": f"127.0.0.1:{west_port}"}
    east = east_edge(logs, tmp_path, kafka, east_pki, west_pki, free_port() if tcp else east_port,
                     tcp_port=east_port if tcp else None, dial_west=f"127.0.0.1:{west_port}",
                     transport=transport).start()
    west = None
    try:
        west = west_edge(logs, east_pki, west_pki, east_port if dialing == "both" else None,
                         transport=transport, listen=west_listen).start()
        one = lambda: (west.metric("strait_mesh_peer_connected", peer="edge-east") == 1
                       and east.metric("strait_mesh_peer_connected", peer="edge-west") == 1)
        wait_for(one, 30, what="one tunnel connection at each edge")
        topic = unique("mesh")
        create_topic(kafka.bootstrap, topic)
        orders = client(west, west_pki, "orders")
        values = [b"pair-%d" % i for i in range(100)]
        assert produce(orders, topic, values) == [None] * len(values)
        assert consume(orders, topic, len(values)) == values
        assert one(), "still one connection at each edge"
        # West's streams were inbound at east, on a connection west never dialed when it has no address.
        assert east.metric("strait_mesh_streams", peer="edge-west", direction="inbound") >= 2
        if dialing == "east":
            assert west.metric("strait_mesh_connections", peer="edge-east", direction="dialed") == 0
            assert west.metric("strait_mesh_connections", peer="edge-east", direction="accepted") == 1
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        if west is not None:
            west.terminate()
        east.terminate()


def test_a_thousand_client_connections_share_one_tunnel(broker, logs, tmp_path):
    """1,000 concurrent connections from `strait-loadgen raw-produce` (one process) through west: one QUIC
    connection carries them all as streams, and every record it counts as acknowledged is at east's broker."""
    import subprocess
    import threading

    from confluent_kafka import Consumer, TopicPartition

    from lib.edge import default_target_dir
    kafka, east_pki, west_pki, east, west = linked(broker, logs, tmp_path)
    peak = [0.0]
    done = threading.Event()

    def watch_streams():
        while not done.is_set():
            peak[0] = max(peak[0], east.metric("strait_mesh_streams_open", peer="edge-west", direction="inbound"))
            done.wait(0.05)
    try:
        topic = unique("mesh")
        create_topic(kafka.bootstrap, topic)
        watcher = threading.Thread(target=watch_streams, daemon=True)
        watcher.start()
        out = subprocess.run(
            [str(default_target_dir() / "debug" / "strait-loadgen"), "raw-produce",
             "--bootstrap", west.bootstrap, "--topic", topic, "--count", "40000", "--size", "100",
             "--connections", "1000", "--batch-bytes", "400", "--inflight", "1",
             "--ca", str(west_pki.pem("ca")), "--cert", str(west_pki.pem("orders")),
             "--key", str(west_pki.key("orders")), "--timeout-secs", "120"],
            capture_output=True, text=True, timeout=150)
        done.set()
        watcher.join()
        assert out.returncode == 0, out.stderr[-2000:]
        report = json.loads(out.stdout.strip().splitlines()[-1])
        # 1,000 connections x 10 requests x 4 records.
        assert report["records"] == 40000 and report["connections"] == 1000
        consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": unique("g")})
        stored = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
        consumer.close()
        assert stored == report["records"]
        # Every client connection was a stream of the one tunnel connection west dialed.
        assert east.metric("strait_mesh_streams", peer="edge-west", direction="inbound") >= 1001
        assert west.log_text().count("tunnel to the peer is up") == 1
        assert peak[0] >= 1000, f"at most {peak[0]:.0f} streams were open at once"
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        done.set()
        west.terminate()
        east.terminate()


def test_every_codec_kafka_python_and_a_resuming_group_cross_the_tunnel(broker, logs, tmp_path):
    """Through west's bootstrap only: confluent-kafka with each codec, kafka-python producing and consuming,
    and a consumer group that commits, closes and resumes where it left off."""
    from confluent_kafka import Consumer
    from kafka import KafkaConsumer, KafkaProducer
    kafka, east_pki, west_pki, east, west = linked(broker, logs, tmp_path)
    try:
        orders = client(west, west_pki, "orders")
        topic = unique("codecs")
        create_topic(kafka.bootstrap, topic)
        sent: list[bytes] = []
        for codec in ("none", "gzip", "snappy", "lz4", "zstd"):
            values = [f"{codec}-{i}".encode() * 20 for i in range(10)]
            assert produce({**orders, "compression.type": codec}, topic, values) == [None] * 10, codec
            sent += values
        assert consume(orders, topic, len(sent)) == sent

        ssl = {**west_pki.kafka_python_ssl("orders"), "ssl_check_hostname": False}
        kp_topic = unique("kafka-python")
        create_topic(kafka.bootstrap, kp_topic)
        producer = KafkaProducer(bootstrap_servers=west.bootstrap, compression_type="gzip", acks="all", **ssl)
        for i in range(10):
            producer.send(kp_topic, value=b"kp-%d" % i).get(timeout=30)
        producer.close()
        kc = KafkaConsumer(kp_topic, bootstrap_servers=west.bootstrap, auto_offset_reset="earliest",
                           consumer_timeout_ms=20000, **ssl)
        assert [m.value for m in kc][:10] == [b"kp-%d" % i for i in range(10)]
        kc.close()

        group = unique("resume")
        first = Consumer({**orders, "group.id": group, "auto.offset.reset": "earliest",
                          "enable.auto.commit": False})
        first.subscribe([topic])
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < 20 and time.monotonic() < deadline:
            m = first.poll(0.5)
            if m is not None and m.error() is None:
                got.append(m.value())
                if len(got) == 20:
                    first.commit(message=m, asynchronous=False)
        first.close()
        assert got == sent[:20]
        resumed = consume({**orders, "group.id": group, "auto.offset.reset": "earliest"}, topic, len(sent) - 20)
        assert resumed == sent[20:]
        assert east.unexpected_errors() == [] and west.unexpected_errors() == []
    finally:
        west.terminate()
        east.terminate()
