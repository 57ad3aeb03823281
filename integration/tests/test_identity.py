"""The edge's own identity from the control plane's CA, with real processes: strait-control on mTLS with
--trust-domain and a CA (--ca-seal-key-file), a join token from `straitctl token create`, a Kafka client
whose certificate came from `straitctl cert issue`, and strait-edge started with --join-token only.

- the edge joins, serves its SVID (`spiffe://test.example/edge/edge-east`, with the listener's IP) on a
  `tls.identity: svid` listener, and the client produces and consumes through it;
- restarted with the now spent token, it renews with the certificate cached in --cache-dir (mode 0600);
  an edge with an empty cache and the spent token is refused;
- with a 1-minute edge certificate lifetime, produce/consume for STRAIT_ROTATION_SECONDS (90 s by default,
  `make soak-rotation` runs 300) with zero failed requests while the edge presents at least 3 distinct
  certificates (read from TLS handshakes).
"""

import os
import ssl
import socket
import stat
import time
from pathlib import Path

from lib.clients import unique
from lib.pki import Pki
from lib.ports import free_port, free_range
from lib.procs import Proc
from lib.wait import wait_for
from tests.test_control_plane import DOMAIN, Control, accepts, binary, control_pki, edge_metric

EDGE_ID = f"spiffe://{DOMAIN}/edge/edge-east"
CLIENT_ID = f"spiffe://{DOMAIN}/ns/shop/sa/orders"


class CaControl(Control):
    """A control node that is also the CA of test.example."""

    def __init__(self, logs: Path, data: Path, pki: Pki, *extra: str):
        super().__init__(logs, data, pki)
        self.proc.argv += ["--ca-seal-key-file", str(data.parent / "ca-seal.key"), *extra]

    def token(self, uses: int = 1) -> str:
        out = self.ctl("token", "create", "--spiffe-id", EDGE_ID, "--ttl", "10m", "--uses", str(uses))
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def issue(self, out_dir: Path) -> Path:
        out = self.ctl("cert", "issue", "--spiffe-id", CLIENT_ID, "--ttl", "30m", "--out", str(out_dir))
        assert out.returncode == 0, out.stderr
        return out_dir


def edge_file(path: Path, broker: str, port: int, ports: range, bundle: Path) -> Path:
    path.write_text(f"""
virtual_clusters:
  - name: shop
    bootstrap: 127.0.0.1:{port}
    brokers: {{ advertised_host: 127.0.0.1, port_range: {ports.start}-{ports.stop - 1} }}
    upstream: {{ bootstrap_servers: ["{broker}"] }}
    tls:
      identity: svid
      client_trust_bundles: [{{ trust_domain: {DOMAIN}, pem_file: "{bundle}" }}]
""")
    return path


def start_edge(logs: Path, control: Control, config: Path, cache: Path, admin: int, token: str) -> Proc:
    edge = Proc(f"edge-{admin}", [binary("strait-edge"), "--control", control.endpoint, "--name", "edge-east",
                                  "--join-token", token, "--config", str(config), "--cache-dir", str(cache),
                                  "--admin", f"127.0.0.1:{admin}"], logs)
    edge.start()
    return edge


def served_certificate(port: int, client: Path):
    """The edge's certificate as a TLS handshake with the client's certificate sees it."""
    from cryptography import x509
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(client / "bundle.pem"))
    ctx.load_cert_chain(str(client / "cert.pem"), str(client / "key.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def uris(cert) -> list[str]:
    from cryptography import x509
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)


def kafka_config(port: int, client: Path) -> dict:
    return {"bootstrap.servers": f"127.0.0.1:{port}", "security.protocol": "SSL",
            "ssl.ca.location": str(client / "bundle.pem"),
            "ssl.certificate.location": str(client / "cert.pem"),
            "ssl.key.location": str(client / "key.pem")}


def create_topic(bootstrap: str) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic
    topic = unique("identity")
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the result is in
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    return topic


def produce_one(producer, topic: str, value: bytes) -> object:
    results: list = []
    producer.produce(topic, value=value, on_delivery=lambda err, msg: results.append(err))
    producer.flush(20)
    assert len(results) == 1, f"no delivery report for {value!r}"
    return results[0]


def consume(config: dict, topic: str, count: int, timeout: float = 30) -> list[bytes]:
    from confluent_kafka import Consumer
    consumer = Consumer({**config, "group.id": unique("g"), "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(1)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
    finally:
        consumer.close()
    return got


def test_edge_joins_with_a_token_serves_its_svid_and_rejoins_from_its_cache(broker, logs, tmp_path):
    from confluent_kafka import Producer
    t = broker()
    topic = create_topic(t.bootstrap)
    control = CaControl(logs, tmp_path / "control", control_pki(tmp_path / "pki")).start()
    client = control.issue(tmp_path / "orders")
    token = control.token(uses=1)
    port, ports, admin = free_port(), free_range(8), free_port()
    config = edge_file(tmp_path / "edge.yaml", t.bootstrap, port, ports, client / "bundle.pem")
    cache = tmp_path / "edge-cache"
    edge = start_edge(logs, control, config, cache, admin, token)
    try:
        wait_for(lambda: accepts(port), 60, what="edge serving after joining with its token")
        cert = served_certificate(port, client)
        assert uris(cert) == [EDGE_ID]
        from cryptography import x509
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.IPAddress)
        assert "127.0.0.1" in [str(ip) for ip in ips]
        for name in ["cert.pem", "key.pem", "bundle.pem", "server-ca.pem"]:
            mode = stat.S_IMODE((cache / "svid" / name).stat().st_mode)
            assert mode == 0o600, f"{name}: {oct(mode)}"
        assert 0 < edge_metric(admin, "strait_svid_expiry_seconds") <= 24 * 3600

        producer = Producer({**kafka_config(port, client), "message.timeout.ms": 15000})
        assert produce_one(producer, topic, b"via-svid") is None
        assert consume(kafka_config(port, client), topic, 1) == [b"via-svid"]

        # The heartbeat went out on the SVID: the control plane knows the edge.
        wait_for(lambda: control.ctl("get", "Edge", "edge-east").returncode == 0, 20,
                 what="heartbeat authenticated by the edge's SVID")

        # Restart with the spent token: the cached certificate renews.
        first_serial = cert.serial_number
        assert edge.stop(30) == 0
        edge = start_edge(logs, control, config, cache, admin, token)
        wait_for(lambda: accepts(port), 60, what="edge serving after a restart with a spent token")
        assert "rejoined the control plane with the cached certificate" in edge.current_log()
        again = served_certificate(port, client)
        assert uris(again) == [EDGE_ID]
        assert again.serial_number != first_serial, "the restart renewed the certificate"
        assert produce_one(producer, topic, b"after-restart") is None

        # Without the cache, the spent token gets nothing: the edge does not start.
        other = Proc("edge-no-cache", [binary("strait-edge"), "--control", control.endpoint, "--name", "edge-east",
                                       "--join-token", token, "--config", str(config),
                                       "--cache-dir", str(tmp_path / "empty-cache")], logs)
        other.start()
        assert other.wait(60) not in (0, None)
        assert "join as spiffe://test.example/edge/edge-east refused" in other.current_log()
    finally:
        edge.stop()
        control.stop()


def test_edge_certificate_rotates_under_load_with_no_failed_request(broker, logs, tmp_path):
    """1-minute edge certificates renewed at half-life while a producer and a consumer keep going."""
    from confluent_kafka import Consumer, Producer
    duration = float(os.environ.get("STRAIT_ROTATION_SECONDS", "90"))
    t = broker()
    topic = create_topic(t.bootstrap)
    control = CaControl(logs, tmp_path / "control", control_pki(tmp_path / "pki"), "--cert-ttl-edge", "1m").start()
    client = control.issue(tmp_path / "orders")
    port, ports, admin = free_port(), free_range(8), free_port()
    config = edge_file(tmp_path / "edge.yaml", t.bootstrap, port, ports, client / "bundle.pem")
    edge = start_edge(logs, control, config, tmp_path / "edge-cache", admin, control.token())
    try:
        wait_for(lambda: accepts(port), 60, what="edge serving after joining")
        first = served_certificate(port, client)
        lifetime = first.not_valid_after_utc.timestamp() - time.time()
        assert lifetime <= 60, f"edge certificate lives {lifetime:.0f}s, asked for 1m"
        producer = Producer({**kafka_config(port, client), "message.timeout.ms": 15000, "linger.ms": 5})
        consumer = Consumer({**kafka_config(port, client), "group.id": unique("g"),
                             "auto.offset.reset": "earliest"})
        consumer.subscribe([topic])
        failures: list = []
        delivered = 0
        consumed = 0
        serials = {first.serial_number}
        sent = 0
        end = time.monotonic() + duration
        next_probe = 0.0
        while time.monotonic() < end:
            for _ in range(20):
                producer.produce(topic, value=b"m%d" % sent,
                                 on_delivery=lambda err, msg: failures.append(err) if err else None)
                sent += 1
            producer.poll(0)
            msg = consumer.poll(0.2)
            while msg is not None:
                if msg.error() is None:
                    consumed += 1
                else:
                    failures.append(msg.error())
                msg = consumer.poll(0)
            if time.monotonic() >= next_probe:
                # A new handshake sees the certificate in force now.
                serials.add(served_certificate(port, client).serial_number)
                next_probe = time.monotonic() + 2
        assert producer.flush(30) == 0
        delivered = sent - len([f for f in failures if f is not None])
        deadline = time.monotonic() + 30
        while consumed < sent and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                consumed += 1
        consumer.close()
        assert failures == [], failures[:5]
        assert delivered == sent
        assert consumed == sent, f"consumed {consumed} of {sent}"
        assert len(serials) >= 3, f"the edge presented {len(serials)} certificates in {duration:.0f}s"
        log = edge.current_log()
        assert log.count("SVID renewed; new handshakes use it") >= 2
        assert "SVID renewal failed" not in log
    finally:
        edge.stop()
        control.stop()


def test_edge_presents_its_svid_to_brokers_that_require_mesh_certificates(kafka, logs, tmp_path):
    """`upstream.tls.identity: svid`: an Apache Kafka SSL listener that requires client certificates of the
    mesh CA (truststore = `straitctl ca bundle`) accepts the edge's SVID; the same edge without it does not
    get a handshake through."""
    from lib.kafka import BrokerTls
    pki = Pki(tmp_path / "broker-pki")
    pki.ca("ca")
    pki.leaf("broker", dns=["localhost"], ips=["127.0.0.1"])
    control = CaControl(logs, tmp_path / "control", control_pki(tmp_path / "pki")).start()
    client = control.issue(tmp_path / "orders")
    mesh_bundle = client / "bundle.pem"
    k = kafka(tls=BrokerTls(cert=pki.pem("broker"), key=pki.key("broker"), client_ca=mesh_bundle))
    port, ports, admin = free_port(), free_range(8), free_port()
    config = tmp_path / "edge.yaml"

    def write(identity: str) -> None:
        config.write_text(f"""
virtual_clusters:
  - name: shop
    bootstrap: 127.0.0.1:{port}
    brokers: {{ advertised_host: 127.0.0.1, port_range: {ports.start}-{ports.stop - 1} }}
    upstream:
      bootstrap_servers: {k.ssl_bootstrap_servers}
      tls: {{ ca: "{pki.pem('ca')}"{identity} }}
    tls:
      identity: svid
      client_trust_bundles: [{{ trust_domain: {DOMAIN}, pem_file: "{mesh_bundle}" }}]
""")

    write(", identity: svid")
    edge = start_edge(logs, control, config, tmp_path / "edge-cache", admin, control.token(uses=2))
    try:
        wait_for(lambda: accepts(port), 60, what="edge serving after joining")
        topic = create_topic(k.bootstrap)
        from confluent_kafka import Producer
        producer = Producer({**kafka_config(port, client), "message.timeout.ms": 15000})
        assert produce_one(producer, topic, b"upstream-svid") is None
        assert consume(kafka_config(port, client), topic, 1) == [b"upstream-svid"]
        assert edge_metric(admin, "strait_upstream_connect_errors_total", virtual_cluster="shop") == 0
        del producer
    finally:
        edge.stop()
    # The same edge presenting nothing: the broker ends every handshake, nothing is produced.
    write("")
    edge = start_edge(logs, control, config, tmp_path / "edge-cache", admin, control.token())
    try:
        wait_for(lambda: accepts(port), 60, what="edge serving after a restart")
        from confluent_kafka import Producer
        producer = Producer({**kafka_config(port, client), "message.timeout.ms": 5000})
        assert produce_one(producer, topic, b"refused") is not None
        wait_for(lambda: "received fatal alert" in edge.current_log(), 15,
                 what="the broker's TLS alert reported by the edge")
    finally:
        edge.stop()
        control.stop()
