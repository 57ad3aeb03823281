"""Security at the edge with real clients (confluent-kafka, kafka-python, Java) and a real broker: mTLS
and SPIFFE identity, refused clients, SNI routing, live certificate rotation under load, TLS to the
brokers, quotas."""

import socket
import ssl
import subprocess
import threading
import time

import pytest

from lib.clients import unique
from lib.edge import VirtualCluster
from lib.pki import standard_pki
from lib.ports import free_port
from lib.wait import wait_for


@pytest.fixture
def pki(tmp_path):
    return standard_pki(tmp_path / "pki")


def tls_cluster(broker, pki, name="secure", **tls_extra) -> VirtualCluster:
    # Advertise "localhost" so clients verify the edge's certificate by name.
    return VirtualCluster(name=name, upstream=broker.bootstrap_servers, advertised_host="localhost",
                          extra={"tls": pki.server_tls(**tls_extra)})


def confluent_conf(vc: VirtualCluster, pki, client: str | None, ca: str = "ca") -> dict:
    return {"bootstrap.servers": f"localhost:{vc.bootstrap_port}", **pki.confluent_ssl(client, ca),
            "socket.timeout.ms": 5000}


def produce_consume_confluent(conf: dict, topic: str, n: int = 20) -> list[bytes]:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(conf)
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    producer = Producer(conf)
    failures = []
    for i in range(n):
        producer.produce(topic, value=b"v%d" % i, on_delivery=lambda err, msg: err and failures.append(err))
    assert producer.flush(30) == 0
    assert failures == []
    consumer = Consumer({**conf, "group.id": unique("g"), "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got: list[bytes] = []

    def read():
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append(msg.value())
        return len(got) >= n
    wait_for(read, 60, interval=0, what=f"{n} records over mTLS")
    consumer.close()
    return got


def test_mtls_spiffe_client_produces_and_consumes_confluent(broker, edge, pki):
    t = broker()
    vc = tls_cluster(t, pki)
    e = edge([vc])
    got = produce_consume_confluent(confluent_conf(vc, pki, "orders"), unique("secure"))
    assert got == [b"v%d" % i for i in range(20)]
    assert e.metric("strait_tls_handshakes", result="ok") >= 2
    assert e.metric("strait_tls_certificate_expiry_seconds", certificate="server") > 86400


def test_mtls_spiffe_client_produces_and_consumes_kafka_python(broker, edge, pki):
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic
    t = broker()
    vc = tls_cluster(t, pki)
    e = edge([vc])
    ssl_conf = pki.kafka_python_ssl("orders")
    bootstrap = f"localhost:{vc.bootstrap_port}"
    topic = unique("secure-kp")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **ssl_conf)
    admin.create_topics([NewTopic(topic, 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, **ssl_conf)
    for i in range(10):
        producer.send(topic, value=b"k%d" % i).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=20000, **ssl_conf)
    values = [m.value for _, m in zip(range(10), consumer)]
    consumer.close()
    assert values == [b"k%d" % i for i in range(10)]
    assert e.metric("strait_tls_handshakes", result="ok") >= 2


def test_mtls_spiffe_client_produces_and_consumes_java(broker, edge, pki):
    from lib.clients import Rec
    from lib.java_client import JavaClient
    t = broker()
    vc = tls_cluster(t, pki)
    e = edge([vc])
    # The PEM files as confluent names them; java_conf turns them into a PEM trust store and key store.
    java = JavaClient(f"localhost:{vc.bootstrap_port}", **pki.confluent_ssl("orders"))
    topic = unique("secure-jv")
    java.create_topic(topic)
    java.produce(topic, [Rec(None, b"j%d" % i) for i in range(10)], acks="all")
    got = java.consumer(topic).take(10, timeout=60, settle=0.5)
    assert [r.value for r in got] == [b"j%d" % i for i in range(10)]
    assert e.metric("strait_tls_handshakes", result="ok") >= 2


BAD_CLIENTS = [
    (None, "ca", {"no_client_certificate"}),
    # librdkafka and JSSE withhold a certificate whose issuer the server's CA hints do not name, so the
    # edge sees none. Presented anyway (Python's ssl and rustls clients do), it is refused as
    # `unknown_issuer`: test_bad_input.py, edge/tests/trust_domains.rs.
    ("rogue", "ca", {"no_client_certificate"}),
    ("expired", "ca", {"expired"}),
    ("not-yet-valid", "ca", {"not_yet_valid"}),
]


@pytest.mark.parametrize("client,ca,reasons", BAD_CLIENTS)
def test_required_mtls_refuses_bad_clients(broker, edge, pki, client, ca, reasons):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    t = broker()
    vc = tls_cluster(t, pki)
    e = edge([vc])
    admin = AdminClient(confluent_conf(vc, pki, client, ca))
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=3)
    wait_for(lambda: sum(e.metric("strait_tls_handshakes", result="failed", reason=r) for r in reasons) > 0,
             10, what=f"a handshake failure counted as one of {reasons}")
    assert e.metric("strait_tls_handshakes", result="ok") == 0
    # Nothing reached the broker side: no relayed connection was ever opened.
    assert e.metric("strait_connections") == 0


@pytest.mark.parametrize("client,ca,reasons", BAD_CLIENTS)
def test_required_mtls_refuses_bad_clients_java(broker, edge, pki, client, ca, reasons):
    """The same refusals with the Java client (JSSE): a TLS error, never a session."""
    from lib.java_client import JavaClient, JavaError
    t = broker()
    vc = tls_cluster(t, pki)
    e = edge([vc])
    with pytest.raises(JavaError):
        JavaClient(f"localhost:{vc.bootstrap_port}", **pki.confluent_ssl(client, ca)).brokers()
    wait_for(lambda: sum(e.metric("strait_tls_handshakes", result="failed", reason=r) for r in reasons) > 0,
             10, what=f"a handshake failure counted as one of {reasons}")
    assert e.metric("strait_tls_handshakes", result="ok") == 0
    assert e.metric("strait_connections") == 0


def test_trust_domains_bound_to_bundles(broker, edge, pki):
    """Each bundle vouches only for its own trust domain: otherca is federated for partner.org, so its
    partner.org client is served, while its certificate claiming example.org (a domain of "ca") is
    refused at the handshake."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    pki.leaf("partner", ca="otherca", uris=["spiffe://partner.org/ns/shop/sa/orders"])
    bundle = pki.dir / "both.pem"
    bundle.write_bytes(pki.pem("ca").read_bytes() + pki.pem("otherca").read_bytes())
    t = broker()
    vc = tls_cluster(t, pki, client_ca=None, client_trust_bundles=[
        {"trust_domain": "example.org", "pem_file": str(pki.pem("ca"))},
        {"trust_domain": "partner.org", "pem_file": str(pki.pem("otherca"))},
    ])
    e = edge([vc])
    # The client trusts the edge's server certificate (signed by "ca") and presents otherca's leaf.
    got = produce_consume_confluent(confluent_conf(vc, pki, "partner"), unique("partner"), n=5)
    assert got == [b"v%d" % i for i in range(5)]
    assert e.metric("strait_tls_handshakes", result="ok") >= 1
    rogue = AdminClient(confluent_conf(vc, pki, "rogue"))
    with pytest.raises(KafkaException):
        rogue.list_topics(timeout=3)
    wait_for(lambda: e.metric("strait_tls_handshakes", result="failed", reason="wrong_trust_domain") > 0,
             10, what="the certificate of otherca claiming example.org refused")


SNI_NAMES = ["bootstrap.a.strait.test", "broker-1.a.strait.test",
             "bootstrap.b.strait.test", "broker-1.b.strait.test"]


def sni_edge(broker, edge, pki):
    """Two virtual clusters (two brokers) on one TLS port, told apart by SNI: (edge, port)."""
    pki.leaf("sni-server", dns=SNI_NAMES)
    port = free_port()
    clusters = []
    brokers = {}
    for label in ["a", "b"]:
        brokers[label] = broker(dedicated=True, name=f"broker-{label}")
        vc = VirtualCluster(name=f"sni-{label}", upstream=brokers[label].bootstrap_servers, bootstrap_port=port,
                            extra={"tls": pki.server_tls("sni-server")})
        sni = {"bootstrap_host": f"bootstrap.{label}.strait.test",
               "broker_host_pattern": f"broker-$(node_id).{label}.strait.test"}
        original = vc.config

        def config(original=original, sni=sni):
            cfg = original()
            cfg["brokers"] = {"sni": sni}
            return cfg
        vc.config = config
        clusters.append(vc)
    return edge(clusters), port


def assert_unknown_sni_refused(e, pki, port):
    """An SNI name no cluster serves gets no TLS session."""
    ctx = ssl.create_default_context(cafile=str(pki.pem("ca")))
    ctx.load_cert_chain(str(pki.pem("orders")), str(pki.key("orders")))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ctx.wrap_socket(raw, server_hostname="bootstrap.c.strait.test")
    wait_for(lambda: e.metric("strait_tls_handshakes", reason="unknown_sni") >= 1, 10,
             what="unknown SNI refusal counted")


def test_sni_routes_two_clusters_on_one_port_kafka_python(broker, edge, pki, monkeypatch):
    """Two virtual clusters (two brokers) share one TLS port; the SNI name picks the cluster and broker."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic
    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        # The test's own DNS: *.strait.test is the loopback edge.
        if isinstance(host, str) and host.endswith(".strait.test"):
            host = "127.0.0.1"
        return real_getaddrinfo(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    e, port = sni_edge(broker, edge, pki)

    ssl_conf = pki.kafka_python_ssl("orders")
    topic = unique("sni")
    bootstrap_a = f"bootstrap.a.strait.test:{port}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_a, **ssl_conf)
    admin.create_topics([NewTopic(topic, 1, 1)])
    cluster = admin.describe_cluster()
    admin.close()
    assert [(b["host"], b["port"]) for b in cluster["brokers"]] == [("broker-1.a.strait.test", port)]
    producer = KafkaProducer(bootstrap_servers=bootstrap_a, **ssl_conf)
    producer.send(topic, value=b"only-in-a").get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap_a, auto_offset_reset="earliest",
                             consumer_timeout_ms=20000, **ssl_conf)
    assert [m.value for _, m in zip(range(1), consumer)] == [b"only-in-a"]
    consumer.close()

    # Cluster b is another broker: the topic does not exist there.
    admin_b = KafkaAdminClient(bootstrap_servers=f"bootstrap.b.strait.test:{port}", **ssl_conf)
    assert topic not in admin_b.list_topics()
    admin_b.close()

    assert_unknown_sni_refused(e, pki, port)


def test_sni_routes_two_clusters_on_one_port_java(broker, edge, pki, tmp_path):
    """The same with the Java client. Patching Python's resolver does not reach the JVM: a driver JVM of
    the test's own resolves *.strait.test from a hosts file (`-Djdk.net.hosts.file`). The client sends
    the name it connects to as SNI and checks the edge's certificate against it."""
    from lib.clients import Rec
    from lib.java_client import JavaClient, JavaDriver
    e, port = sni_edge(broker, edge, pki)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 " + " ".join(SNI_NAMES) + "\n")
    driver = JavaDriver(jvm_args=(f"-Djdk.net.hosts.file={hosts}",))
    try:
        ssl_conf = pki.confluent_ssl("orders")
        a = JavaClient(f"bootstrap.a.strait.test:{port}", driver=driver, **ssl_conf)
        topic = unique("sni-jv")
        a.create_topic(topic)
        assert a.described_brokers() == [("broker-1.a.strait.test", port)]
        assert a.brokers() == [("broker-1.a.strait.test", port)]
        a.produce(topic, [Rec(None, b"only-in-a")])
        assert [r.value for r in a.consumer(topic).take(1, timeout=60)] == [b"only-in-a"]
        # Cluster b is another broker: the topic does not exist there.
        b = JavaClient(f"bootstrap.b.strait.test:{port}", driver=driver, **ssl_conf)
        assert topic not in b.list_topics()
    finally:
        driver.stop()

    assert_unknown_sni_refused(e, pki, port)


def test_certificate_rotation_under_load(broker, edge, pki):
    """Server certificate and client CA bundle rotate every second for a minute while a producer and a
    consumer run over mTLS and new clients keep connecting: no request fails."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    t = broker()
    vc = tls_cluster(t, pki, client_ca="bundle", reload_interval="250ms")
    (pki.dir / "bundle.pem").write_bytes(pki.pem("ca").read_bytes())
    e = edge([vc])
    conf = confluent_conf(vc, pki, "orders")
    topic = unique("rotate")
    admin = AdminClient(conf)  # kept alive: a collected AdminClient fails its futures
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)

    stop = threading.Event()
    errors: list[str] = []
    rotations = 0

    def rotate():
        nonlocal rotations
        while not stop.wait(1.0):
            rotations += 1
            # A fresh server certificate from the same CA, and a bundle with a fresh extra CA.
            pki.leaf("server", dns=["localhost"], ips=["127.0.0.1"])
            pki.ca(f"extra{rotations % 3}")
            bundle = pki.pem("ca").read_bytes() + pki.pem(f"extra{rotations % 3}").read_bytes()
            tmp = pki.dir / ".bundle.tmp"
            tmp.write_bytes(bundle)
            tmp.replace(pki.dir / "bundle.pem")

    rotator = threading.Thread(target=rotate, daemon=True)
    rotator.start()
    producer = Producer({**conf, "acks": "all", "enable.idempotence": True})
    consumer = Consumer({**conf, "group.id": unique("g"), "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    produced = consumed = 0
    handshakes_before = e.metric("strait_tls_handshakes", result="ok")
    deadline = time.monotonic() + 60
    next_new_client = time.monotonic()
    try:
        while time.monotonic() < deadline:
            producer.produce(topic, value=b"%d" % produced,
                             on_delivery=lambda err, msg: err and errors.append(f"delivery: {err}"))
            produced += 1
            producer.poll(0)
            msg = consumer.poll(0.01)
            if msg is not None:
                if msg.error():
                    errors.append(f"consume: {msg.error()}")
                else:
                    consumed += 1
            if time.monotonic() >= next_new_client:
                # A new client means new handshakes against the newest certificate and bundle.
                next_new_client += 5
                md = AdminClient(conf).list_topics(timeout=10)
                if topic not in md.topics:
                    errors.append("new client: topic missing from metadata")
    finally:
        stop.set()
        rotator.join()
    assert producer.flush(30) == 0

    def drain():
        nonlocal consumed
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            consumed += 1
        return consumed >= produced
    wait_for(drain, 60, interval=0, what="every produced record consumed")
    consumer.close()
    assert errors == []
    assert produced > 100
    assert rotations >= 50
    assert e.metric("strait_tls_credential_reloads", result="ok") >= 50
    assert e.metric("strait_tls_handshakes", result="ok") > handshakes_before
    assert e.metric("strait_tls_handshakes", result="failed") == 0


def test_broken_certificate_file_keeps_the_old_one(broker, edge, pki):
    from confluent_kafka.admin import AdminClient
    t = broker()
    vc = tls_cluster(t, pki, reload_interval="100ms")
    e = edge([vc])
    pki.pem("server").write_text("not a certificate\n")
    wait_for(lambda: e.metric("strait_tls_credential_reloads", result="rejected") >= 1, 10,
             what="broken certificate rejected")
    # New handshakes still use the old, valid certificate.
    md = AdminClient(confluent_conf(vc, pki, "orders")).list_topics(timeout=10)
    assert len(md.brokers) == 1


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_edge_originates_tls_to_kafka_brokers(kafka, edge, pki, mutual):
    """Kafka's own SSL listener (PEM keystore; client certificates required in the mtls case); the edge
    verifies the broker against the CA and presents its own certificate."""
    from lib.kafka import BrokerTls
    pki.leaf("broker", dns=["localhost"], ips=["127.0.0.1"])
    pki.leaf("edge-client", uris=["spiffe://example.org/ns/strait/sa/edge"])
    k = kafka(tls=BrokerTls(cert=pki.pem("broker"), key=pki.key("broker"),
                            client_ca=pki.pem("ca") if mutual else None))
    tls = {"ca": str(pki.pem("ca"))}
    if mutual:
        tls |= {"cert": str(pki.pem("edge-client")), "key": str(pki.key("edge-client"))}
    vc = VirtualCluster(name="tls-up", upstream=k.ssl_bootstrap_servers,
                        extra={"upstream": {"bootstrap_servers": k.ssl_bootstrap_servers, "tls": tls}})
    e = edge([vc])
    got = produce_consume_confluent({"bootstrap.servers": vc.bootstrap}, unique("tls-up"), n=10)
    assert got == [b"v%d" % i for i in range(10)]
    # Every broker the client learnt about is an edge port, and the edge reached the SSL port only.
    assert e.metric("strait_upstream_connect_errors_total", virtual_cluster="tls-up") == 0


def test_edge_without_client_certificate_is_refused_by_mtls_broker(kafka, edge, pki):
    from confluent_kafka.admin import AdminClient
    from lib.kafka import BrokerTls
    pki.leaf("broker", dns=["localhost"], ips=["127.0.0.1"])
    k = kafka(tls=BrokerTls(cert=pki.pem("broker"), key=pki.key("broker"), client_ca=pki.pem("ca")))
    vc = VirtualCluster(name="tls-nocert", upstream=k.ssl_bootstrap_servers,
                        extra={"upstream": {"bootstrap_servers": k.ssl_bootstrap_servers,
                                            "tls": {"ca": str(pki.pem("ca"))}}})
    e = edge([vc])
    e.expect_error(r"(?i)upstream|connect|tls|handshake|closed|eof|reset")
    # The client's metadata request fails: the broker refuses the edge's certificate-less handshake.
    from confluent_kafka import KafkaException
    with pytest.raises(KafkaException):
        AdminClient({"bootstrap.servers": vc.bootstrap}).list_topics(timeout=5)
    # TLS 1.3: the broker's "certificate required" alert arrives after the edge's side of the handshake
    # completed, on the first read; the edge logs it at WARN and closes the client connection.
    wait_for(lambda: any("WARN" in line and "TLS error" in line and "received fatal alert" in line
                         for line in e.log_text().splitlines()), 15,
             what="the broker's TLS alert reported by the edge")


def test_produce_quota_throttles_with_throttle_time(broker, edge):
    import json

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    t = broker()
    vc = VirtualCluster(name="quota", upstream=[t.bootstrap],
                        extra={"quotas": {"default": {"produce_bytes_per_second": 50000}}})
    e = edge([vc])
    topic = unique("quota")
    admin = AdminClient({"bootstrap.servers": vc.bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    throttles = []
    producer = Producer({"bootstrap.servers": vc.bootstrap, "linger.ms": 5, "statistics.interval.ms": 500,
                         "stats_cb": lambda s: throttles.extend(
                             b["throttle"]["max"] for b in json.loads(s)["brokers"].values()
                             if b["nodeid"] >= 0)})
    for _ in range(200):
        producer.produce(topic, value=b"x" * 1000)
        producer.poll(0)
    assert producer.flush(60) == 0
    wait_for(lambda: producer.poll(0.2) >= 0 and any(v > 0 for v in throttles), 10,
             what="client saw throttle_time_ms")
    assert e.metric("strait_throttle_seconds") > 0


QUOTA_RATE = 100_000  # bytes per second; one second of burst


def produce_each(producer, topic: str, values: list[bytes]) -> None:
    """One Produce request per value: the edge throttles the requests that follow a debt."""
    failures = []
    for v in values:
        producer.produce(topic, value=v, on_delivery=lambda err, msg: err and failures.append(err))
        assert producer.flush(60) == 0
    assert failures == []


@pytest.mark.parametrize("kind", ["produce_bytes_per_second", "fetch_bytes_per_second", "requests_per_second"])
def test_each_quota_kind_limits_the_rate(broker, edge, kind):
    """Each quota kind slows its traffic to about its rate: moving 400 KB at 100 KB/s (or 20 requests at
    5/s) cannot finish in less than the time the debt beyond the one-second burst takes to repay.
    Only this lower bound is asserted: a slow machine can make it take longer, never shorter."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    t = broker()
    rate = 5 if kind == "requests_per_second" else QUOTA_RATE
    vc = VirtualCluster(name="quota", upstream=[t.bootstrap], extra={"quotas": {"default": {kind: rate}}})
    e = edge([vc])
    topic = unique("quota")
    admin = AdminClient({"bootstrap.servers": t.bootstrap})  # kept alive: a collected one fails its futures
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    values = [bytes([65 + i % 26]) * 50_000 for i in range(8)]  # 400 KB in 50 KB requests
    if kind == "fetch_bytes_per_second":
        produce_each(Producer({"bootstrap.servers": t.bootstrap}), topic, values)  # straight to the broker
        c = Consumer({"bootstrap.servers": vc.bootstrap, "group.id": unique("q"), "auto.offset.reset": "earliest",
                      "message.max.bytes": 60_000, "fetch.max.bytes": 60_000,
                      "max.partition.fetch.bytes": 60_000})
        c.subscribe([topic])
        got: list[bytes] = []
        first = None

        def consumed():
            nonlocal first
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                first = first or time.monotonic()
                got.append(m.value())
            return len(got) >= len(values)
        wait_for(consumed, 120, interval=0, what="400 KB fetched through the quota")
        elapsed = time.monotonic() - first
        c.close()
        assert got == values
        # The first answer is free and each later fetch waits for the debt the earlier answers left.
        minimum = (400_000 - QUOTA_RATE - 60_000) / QUOTA_RATE
    else:
        p = Producer({"bootstrap.servers": vc.bootstrap, "linger.ms": 0})
        if kind == "requests_per_second":
            values = [b"r%d" % i for i in range(20)]
        p.list_topics(topic, timeout=10)  # connections and metadata before the clock starts
        started = time.monotonic()
        produce_each(p, topic, values)
        elapsed = time.monotonic() - started
        # Within the burst for free, then the debt of every request but the last is repaid first.
        minimum = (len(values) - 1 - rate) / rate if kind == "requests_per_second" else \
            (400_000 - 50_000 - QUOTA_RATE) / QUOTA_RATE
    assert elapsed >= minimum * 0.9, f"{kind}: {elapsed:.2f}s for what the quota spreads over {minimum:.2f}s"
    assert e.metric("strait_throttle_seconds", virtual_cluster="quota") > 0


def test_benchmark_raw_client_produces_over_mtls(broker, edge, pki):
    """The benchmark's minimal client (`strait-loadgen raw-produce`) through an mTLS edge: every
    record it counts as acknowledged is in the broker, so its throughput numbers are real."""
    import json

    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from lib.edge import default_target_dir
    t = broker()
    vc = tls_cluster(t, pki)
    e = edge([vc])
    topic = unique("raw")
    direct = AdminClient({"bootstrap.servers": t.bootstrap})
    direct.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=30)
    ssl_paths = pki.confluent_ssl("orders")
    out = subprocess.run(
        [str(default_target_dir() / "debug" / "strait-loadgen"), "raw-produce",
         "--bootstrap", f"localhost:{vc.bootstrap_port}", "--topic", topic, "--count", "3000", "--size", "500",
         "--connections", "4", "--batch-bytes", "8000", "--inflight", "3",
         "--ca", ssl_paths["ssl.ca.location"], "--cert", ssl_paths["ssl.certificate.location"],
         "--key", ssl_paths["ssl.key.location"], "--timeout-secs", "60"],
        capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # 4 connections x ceil(750 / 16) requests x 16 records (8,000 bytes of 500-byte values).
    assert report["records"] == 4 * 47 * 16 and report["tls"] is True
    consumer = Consumer({"bootstrap.servers": t.bootstrap, "group.id": unique("g")})
    stored = sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in (0, 1))
    consumer.close()
    assert stored == report["records"]
    assert e.metric("strait_tls_handshakes", result="ok") >= 5  # bootstrap + 4 broker connections
