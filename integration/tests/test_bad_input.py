"""The bad-input catalogue: one table of malformed inputs, sent on raw sockets through every listener kind.

Listener kinds: `plain` (no filter: requests are streamed, never decoded), `mtls` (client certificates
required), `sni` (mTLS on one port shared by name: the bootstrap is picked by the TLS server name, and
the well-behaved client is kafka-python, whose name lookups the test answers), `authz` (authorization installed: every request but ApiVersions is decoded) and `encrypt`
(record encryption with a local keyring: Produce is decoded) and `tunnel` (the mesh's tunnel ingress: an
mTLS client of a near edge whose virtual cluster lives behind a far edge, reached through a QUIC
tunnel; the near edge frames and relays, the far edge authorizes, so it decodes). Each (case, kind)
asserts one exact outcome (for `tunnel`, counted and logged once across the two edges):

- `Refused(reason)`: the edge closes the connection, counts `strait_frames_rejected_total{reason}` exactly
  once and logs one WARN line with that reason;
- `Answered(error_code)`: an answer with the request's correlation id and that error code comes back;
- `BrokerCloses()`: the frame is not the edge's to judge (no filter decodes it): it is relayed, the broker
  closes its connection, and the edge closes the client's, counting nothing;
- TLS cases (garbage before the handshake and a handshake that never comes, on the mTLS listener and
  the SNI port; a ClientHello without a server name or with one no cluster serves, on the SNI port;
  expired, not-yet-valid, foreign-CA and wrong-trust-domain client certificates) count
  `strait_tls_handshakes_total{result="failed",reason}` instead, with one WARN line naming the reason.

In every case a confluent-kafka producer and consumer on the same edge complete all their requests
meanwhile, the edge stays up, and it logs no ERROR line (the `edge` fixture fails the test otherwise).
"""

import json
import os
import select
import socket
import ssl
import struct
import threading
import uuid
from dataclasses import dataclass

import pytest

from lib.authz import create_topics_at_broker
from lib.edge import VirtualCluster
from lib.kafka_wire import API_VERSIONS, METADATA, frame, recv_frame, request_v0_header
from lib.pki import standard_pki
from lib.ports import free_port
from lib.wait import wait_for

PRODUCE = 0
MAX_FRAME = 1024 * 1024  # small, so "over the limit" is cheap to announce
READ_TIMEOUT = "2s"
KEYRING = '{"keys":{"kek-bad":["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]}}'
ALLOW_ALL = [
    {"principal": "*", "allow": ["All"], "topic": "*"},
    {"principal": "*", "allow": ["All"], "group": "*"},
    {"principal": "*", "allow": ["All"], "cluster": True},
]
KINDS = ["plain", "mtls", "sni", "authz", "encrypt", "tunnel"]
# The tunnel kind's two edges: the client's (near, a remote virtual cluster) and the one whose tunnel
# ingress receives the client's bytes and decodes them for its authorization (far).
NEAR_EDGE_ID, FAR_EDGE_ID = "spiffe://example.org/edge/near", "spiffe://example.org/edge/far"
# The SNI listener's names: the test resolves them to the loopback edge itself (see `sni_dns`).
SNI_DOMAIN = "bad.strait.test"
SNI_BOOTSTRAP = f"bootstrap.{SNI_DOMAIN}"
BROKER_KIND = os.environ.get("STRAIT_BROKER", "kafka")


# ---- expected outcomes

@dataclass(frozen=True)
class Refused:
    reason: str
    # Which of the listener's edges refuses: 0 the client's own, 1 the far edge behind a tunnel.
    at: int = 0


@dataclass(frozen=True)
class Answered:
    correlation_id: int
    error_code: int


@dataclass(frozen=True)
class BrokerCloses:
    pass


# ---- listeners

class Listener:
    def __init__(self, kind: str, edge, broker, pki, far_edge=None):
        self.kind, self.edge, self.broker, self.pki = kind, edge, broker, pki
        # Every edge the client's bytes pass through: where a refusal may be counted and logged.
        self.edges = [edge] + ([far_edge] if far_edge else [])
        self.host, port = edge.bootstrap.rsplit(":", 1)
        self.port = int(port)

    @property
    def tls(self) -> bool:
        return self.kind in ("mtls", "sni", "tunnel")

    @property
    def server_name(self) -> str:
        return SNI_BOOTSTRAP if self.kind == "sni" else "localhost"

    def raw(self) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def open(self) -> socket.socket:
        """A connection ready for Kafka bytes (TLS established on `mtls`)."""
        s = self.raw()
        if not self.tls:
            return s
        ctx = ssl.create_default_context(cafile=str(self.pki.pem("ca")))
        ctx.load_cert_chain(str(self.pki.pem("orders")), str(self.pki.key("orders")))
        return ctx.wrap_socket(s, server_hostname=self.server_name)

    def client_conf(self) -> dict:
        conf = {"bootstrap.servers": self.edge.bootstrap}
        if self.tls:
            conf.update(self.pki.confluent_ssl("orders"))
        return conf


def listener_for(kind: str, broker, edge, tmp_path, handshake_timeout: str = "10s") -> Listener:
    if kind == "tunnel":
        return tunnel_listener(broker, edge, tmp_path)
    t = broker()
    pki = standard_pki(tmp_path / "pki") if kind in ("mtls", "sni") else None
    extra: dict = {}
    top: dict = {"limits": {"max_frame_bytes": MAX_FRAME, "request_read_timeout": READ_TIMEOUT}}
    if kind == "mtls":
        extra["tls"] = pki.server_tls(handshake_timeout=handshake_timeout)
    if kind == "sni":
        pki.leaf("sni-server", dns=[f"*.{SNI_DOMAIN}"])
        extra["tls"] = pki.server_tls("sni-server", handshake_timeout=handshake_timeout)
    if kind == "authz":
        extra["authorization"] = {"rules": ALLOW_ALL}
    if kind == "encrypt":
        (tmp_path / "keys.json").write_text(KEYRING)
        extra["encryption"] = {"rules": [{"topic": "bad-*", "kms": "dev", "kek": "kek-bad"}]}
        top["kms"] = [{"name": "dev", "local": {"path": str(tmp_path / "keys.json")}}]
    host = "localhost" if kind == "mtls" else "127.0.0.1"
    vc = VirtualCluster(name=kind, upstream=t.bootstrap_servers, advertised_host=host, extra=extra)
    if kind == "sni":
        original = vc.config

        def config(original=original):
            cfg = original()
            cfg["brokers"] = {"sni": {"bootstrap_host": SNI_BOOTSTRAP,
                                      "broker_host_pattern": f"broker-$(node_id).{SNI_DOMAIN}"}}
            return cfg
        vc.config = config
    e = edge([vc], max_frame_bytes=MAX_FRAME, extra=top)
    return Listener(kind, e, t, pki)


def tunnel_listener(broker, edge, tmp_path) -> Listener:
    """A near edge serving a remote virtual cluster (mTLS for its clients), and the far edge that exports
    it over a QUIC tunnel and authorizes the principals the near edge forwards, so the far edge's
    tunnel ingress decodes every request but ApiVersions."""
    t = broker()
    pki = standard_pki(tmp_path / "pki")
    pki.leaf("near-edge", uris=[NEAR_EDGE_ID], ips=["127.0.0.1"])
    pki.leaf("far-edge", uris=[FAR_EDGE_ID], ips=["127.0.0.1"])
    limits = {"max_frame_bytes": MAX_FRAME, "request_read_timeout": READ_TIMEOUT}
    bundles = [{"trust_domain": "example.org", "pem": str(pki.pem("ca"))}]
    mesh_port = free_port()
    far = edge([VirtualCluster(name="tunnel-far", upstream=t.bootstrap_servers,
                               extra={"authorization": {"rules": ALLOW_ALL}})],
               max_frame_bytes=MAX_FRAME, extra={"limits": limits, "mesh": {
                   "listen": f"127.0.0.1:{mesh_port}",
                   "identity": {"cert": str(pki.pem("far-edge")), "key": str(pki.key("far-edge"))},
                   "trust_bundles": bundles,
                   "peers": [{"name": "near", "spiffe_id": NEAR_EDGE_ID, "may_assert": ["spiffe://example.org/*"],
                              "exports": ["tunnel-far"]}]}})
    near_cluster = VirtualCluster(name="tunnel", upstream=[], advertised_host="localhost", extra={
        "upstream": {"remote": {"peer": "far", "virtual_cluster": "tunnel-far"}, "connect_timeout": "5s"},
        "tls": pki.server_tls()})
    near = edge([near_cluster], max_frame_bytes=MAX_FRAME, extra={"limits": limits, "mesh": {
        "identity": {"cert": str(pki.pem("near-edge")), "key": str(pki.key("near-edge"))},
        "trust_bundles": bundles,
        "peers": [{"name": "far", "address": f"127.0.0.1:{mesh_port}", "spiffe_id": FAR_EDGE_ID}]}})
    wait_for(lambda: near.metric("strait_mesh_peer_connected", peer="far") == 1, 30, what="the tunnel to the far edge")
    return Listener("tunnel", near, t, pki, far_edge=far)


@pytest.fixture
def sni_dns(monkeypatch):
    """*.bad.strait.test is the loopback edge, for this process' Python resolver (kafka-python)."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(f".{SNI_DOMAIN}"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)


# ---- the well-behaved client beside every case

class WellBehaved:
    """Produces and reads back a few records through the same edge while a case runs."""

    def __init__(self, listener: Listener):
        self.listener = listener
        self.topic = f"bad-{uuid.uuid4().hex[:10]}"
        create_topics_at_broker(listener.broker.bootstrap, [self.topic])
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(120)
        assert not self.thread.is_alive(), "the well-behaved client did not finish"
        if self.error:
            raise self.error
        return False

    def _run(self):
        if self.listener.kind == "sni":
            return self._run_kafka_python()
        from confluent_kafka import Consumer, Producer
        try:
            conf = self.listener.client_conf()
            p = Producer({**conf, "linger.ms": 0, "message.timeout.ms": 60000})
            errors = []
            values = [b"good-%d" % i for i in range(20)]
            for v in values:
                p.produce(self.topic, value=v, on_delivery=lambda err, _m: errors.append(err) if err else None)
            assert p.flush(60) == 0, "records not delivered"
            assert errors == [], errors
            c = Consumer({**conf, "group.id": f"g-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
                          "enable.auto.commit": False})
            c.subscribe([self.topic])
            got = []
            wait_for(lambda: _poll_into(c, got) >= len(values), 60, what="records read back")
            c.close()
            assert got == values
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            self.error = e


    def _run_kafka_python(self):
        """kafka-python, whose name lookups the test can answer (librdkafka's it cannot): the SNI names."""
        from kafka import KafkaConsumer, KafkaProducer
        from lib.clients import subscribe_kafka_python
        try:
            conf = {"bootstrap_servers": f"{SNI_BOOTSTRAP}:{self.listener.port}",
                    **self.listener.pki.kafka_python_ssl("orders")}
            p = KafkaProducer(**conf, linger_ms=0)
            values = [b"good-%d" % i for i in range(20)]
            futures = [p.send(self.topic, value=v) for v in values]
            for f in futures:
                f.get(timeout=60)
            p.close()
            c = KafkaConsumer(**conf, group_id=f"g-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest",
                              enable_auto_commit=False)
            got: list[bytes] = []
            try:
                subscribe_kafka_python(c, self.topic)

                def read():
                    for records in c.poll(timeout_ms=500).values():
                        got.extend(r.value for r in records)
                    return len(got) >= len(values)
                wait_for(read, 60, interval=0, what="records read back")
            finally:
                c.close()
            assert got == values
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            self.error = e


def _poll_into(c, got: list) -> int:
    m = c.poll(0.5)
    if m is not None and m.error() is None:
        got.append(m.value())
    return len(got)


# ---- socket helpers

def closed_by_peer(sock: socket.socket, timeout: float = 15.0) -> bool:
    """True when the peer closes (EOF, reset, or a TLS alert/EOF) within `timeout`; data read is discarded."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def half_close(sock: socket.socket) -> None:
    """End our side: a TLS close_notify first on TLS sockets, so the edge reads a clean EOF."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(0.5)
        try:
            sock.unwrap()  # sends close_notify; waiting for the peer's may time out, which is fine
        except (OSError, ValueError):
            pass
        return
    sock.shutdown(socket.SHUT_WR)


def header_v2(api_key: int, version: int, correlation_id: int) -> bytes:
    """Request header v2: v1 and empty tagged fields."""
    return request_v0_header(api_key, version, correlation_id) + b"\x00"


# ---- the cases: what to send, and the outcome per listener kind

def send_negative_size(s, listener):
    s.sendall(b"\xff\xff\xff\xf0" + os.urandom(1024))


def send_tiny_size(s, listener):
    s.sendall(struct.pack(">i", 3) + b"\x00" * 3)


def send_size_below_header(s, listener):
    s.sendall(struct.pack(">i", 7) + b"\x00" * 7)


def send_garbage_header(s, listener):
    s.sendall(frame(b"\x7f\x7f" + os.urandom(200)))


def send_over_limit(s, listener):
    s.sendall(struct.pack(">i", MAX_FRAME + 1) + b"\x00" * 64)


def send_truncated_header(s, listener):
    s.sendall(struct.pack(">i", 20) + b"\x00\x12\x00")
    half_close(s)


def send_truncated_body(s, listener):
    body = request_v0_header(API_VERSIONS, 0, 1)
    s.sendall(struct.pack(">i", len(body) + 100) + body)
    half_close(s)


def send_unknown_api_key(s, listener):
    s.sendall(frame(request_v0_header(9999, 0, 77) + b"\x00" * 8))


def send_unsupported_version(s, listener):
    s.sendall(frame(request_v0_header(METADATA, 99, 78) + b"\x00" * 8))


def send_api_versions_v99(s, listener):
    s.sendall(frame(header_v2(API_VERSIONS, 99, 79) + b"\x00" * 8))


def produce_v9_up_to_acks() -> bytes:
    # header v2, transactional_id null (compact: 0), acks=1
    return header_v2(PRODUCE, 9, 80) + b"\x00" + struct.pack(">h", 1)


def send_undecodable_produce(s, listener):
    # Valid header and acks, then the body stops: timeout_ms and the topic array are missing.
    s.sendall(frame(produce_v9_up_to_acks()))


def send_produce_short_of_acks(s, listener):
    # A whole frame that ends before acks (header v2, then a null transactional_id): the edge cannot tell
    # whether an answer is due, and must not wait for bytes the frame does not have.
    s.sendall(frame(header_v2(PRODUCE, 9, 84) + b"\x00"))


def send_produce_huge_topic_count(s, listener):
    # timeout_ms, then a compact array announcing 2^32 - 2 topics in a 40-byte frame.
    s.sendall(frame(produce_v9_up_to_acks() + struct.pack(">i", 1000) + b"\xff\xff\xff\xff\x0f" + b"\x00" * 8))


def send_metadata_huge_topic_count(s, listener):
    # Metadata v1: an array of 2^31 - 1 topics, in a 30-byte frame.
    s.sendall(frame(request_v0_header(METADATA, 1, 81) + struct.pack(">i", 0x7FFFFFFF) + b"\x00" * 4))


def send_produce_over_budget(s, listener):
    # Announces 900 KiB (under max_frame_bytes here) and sends only the prefix. The default per-connection
    # budget is 16 MiB, so this is the read timeout's case; test_limits.py covers the budget itself.
    s.sendall(struct.pack(">ihhi", 900 * 1024, PRODUCE, 9, 82))


def send_slowloris(s, listener):
    """One byte every 0.2 s, from this thread only (an SSL socket must not be read in one thread while
    another writes it), until the edge has something to say: then the caller reads its close. The
    first byte goes out before anything is read, so the frame is under way and `request_read_timeout`
    runs (a TLS session ticket can make the socket readable before the edge has decided anything)."""
    request = frame(request_v0_header(METADATA, 1, 83) + struct.pack(">i", 0) + b"\x00" * 200)
    for i, byte in enumerate(request[:-1]):
        if i > 0 and select.select([s], [], [], 0.2)[0]:
            return
        try:
            s.sendall(bytes([byte]))
        except OSError:
            return


def every(outcome):
    return {k: outcome for k in KINDS}


CASES = {
    # id: (send, {kind: outcome})
    "negative_size": (send_negative_size, every(Refused("malformed"))),
    "tiny_size": (send_tiny_size, every(Refused("malformed"))),
    "size_below_header": (send_size_below_header, every(Refused("malformed"))),
    "garbage_header": (send_garbage_header, every(Refused("unknown_api_key"))),
    "over_max_frame_bytes": (send_over_limit, every(Refused("too_large"))),
    "truncated_header": (send_truncated_header, every(Refused("truncated"))),
    "truncated_body": (send_truncated_body, every(Refused("truncated"))),
    "unknown_api_key": (send_unknown_api_key, every(Refused("unknown_api_key"))),
    "unsupported_version": (send_unsupported_version, every(Refused("unsupported_version"))),
    # Relayed (ApiVersions is exempt from the version check). Kafka follows KIP-511: a client's newest
    # ApiVersions is answered, in v0, with UNSUPPORTED_VERSION (35). Tansu 0.6 answers in a form that
    # decodes neither as v99 nor as v0, and the edge, which reads every ApiVersions answer, refuses it.
    # Through a tunnel the far edge, the one that reads the broker's answer, refuses it.
    "api_versions_v99": (send_api_versions_v99,
                         {**every(Refused("undecodable")), "tunnel": Refused("undecodable", at=1)}
                         if BROKER_KIND == "tansu" else every(Answered(79, 35))),
    # Decoded where a filter reads Produce (authorization, encryption); elsewhere the broker judges it.
    "undecodable_produce": (send_undecodable_produce, {
        "plain": BrokerCloses(), "mtls": BrokerCloses(), "sni": BrokerCloses(),
        "authz": Refused("undecodable"), "encrypt": Refused("undecodable"), "tunnel": Refused("undecodable", at=1)}),
    "produce_short_of_acks": (send_produce_short_of_acks, {
        "plain": BrokerCloses(), "mtls": BrokerCloses(), "sni": BrokerCloses(),
        "authz": Refused("undecodable"), "encrypt": Refused("undecodable"), "tunnel": Refused("undecodable", at=1)}),
    "produce_huge_topic_count": (send_produce_huge_topic_count, {
        "plain": BrokerCloses(), "mtls": BrokerCloses(), "sni": BrokerCloses(),
        "authz": Refused("undecodable"), "encrypt": Refused("undecodable"), "tunnel": Refused("undecodable", at=1)}),
    "metadata_huge_topic_count": (send_metadata_huge_topic_count, {
        "plain": BrokerCloses(), "mtls": BrokerCloses(), "sni": BrokerCloses(),
        "authz": Refused("undecodable"), "encrypt": BrokerCloses(), "tunnel": Refused("undecodable", at=1)}),
    "frame_never_completed": (send_produce_over_budget, every(Refused("read_timeout"))),
    "slowloris": (send_slowloris, every(Refused("read_timeout"))),
}

TLS_CASES = {
    # Kafka bytes where a ClientHello belongs.
    "plaintext_before_handshake": "protocol",
    # Connect and say nothing: `handshake_timeout` (3 s here).
    "handshake_timeout": "timeout",
}

# The SNI port's own: a ClientHello it cannot route.
SNI_TLS_CASES = {
    "no_server_name": "no_sni",
    "unknown_server_name": "unknown_sni",
}


# A client certificate the edge must refuse at the handshake: (PKI leaf, the reason counted). Python's
# ssl presents whatever certificate it was given, so a foreign CA's arrives and is `unknown_issuer`
# (librdkafka and JSSE withhold one the server's CA hints do not name: test_security.py).
CERT_CASES = {
    "expired_certificate": ("expired", "expired"),
    "not_yet_valid_certificate": ("not-yet-valid", "not_yet_valid"),
    "wrong_ca_certificate": ("rogue", "unknown_issuer"),
    "wrong_trust_domain_certificate": ("unbound-domain", "unknown_trust_domain"),
}


def refused_at_handshake(listener: Listener, leaf: str) -> bool:
    """Whether the edge refuses a TLS client presenting `leaf`: in TLS 1.3 the client's side of the
    handshake completes before the server has judged its certificate, so the refusal (an alert, or
    the close) shows on the first read."""
    ctx = ssl.create_default_context(cafile=str(listener.pki.pem("ca")))
    ctx.load_cert_chain(str(listener.pki.pem(leaf)), str(listener.pki.key(leaf)))
    s = listener.raw()
    try:
        tls = ctx.wrap_socket(s, server_hostname="localhost")
    except (ssl.SSLError, ConnectionResetError):
        s.close()
        return True
    try:
        tls.sendall(frame(request_v0_header(API_VERSIONS, 0, 5)))
        tls.settimeout(15)
        return tls.recv(4) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    finally:
        tls.close()


def warn_lines(e, reason: str) -> list[str]:
    out = []
    edges = e.edges if isinstance(e, Listener) else [e]
    for line in "\n".join(x.proc.all_logs() for x in edges).splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if str(entry.get("level", "")).upper() == "WARN" and entry.get("fields", {}).get("reason") == reason:
            out.append(line)
    return out


def rejected(listener: Listener, reason: str) -> float:
    return sum(e.metric("strait_frames_rejected", reason=reason) for e in listener.edges)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, kind, broker, edge, tmp_path, request):
    if kind == "sni":
        request.getfixturevalue("sni_dns")
    send, outcomes = CASES[case]
    expected = outcomes[kind]
    listener = listener_for(kind, broker, edge, tmp_path)
    reasons = ["malformed", "too_large", "truncated", "unknown_api_key", "unsupported_version", "undecodable",
               "buffer_budget", "read_timeout"]
    before = {r: rejected(listener, r) for r in reasons}
    before_at = {r: listener.edges[expected.at].metric("strait_frames_rejected", reason=r) for r in reasons} \
        if isinstance(expected, Refused) else {}
    with WellBehaved(listener):
        s = listener.open()
        try:
            send(s, listener)
            if isinstance(expected, Answered):
                s.settimeout(15)
                body = recv_frame(s)
                correlation_id, error_code = struct.unpack(">ih", body[:6])
                assert (correlation_id, error_code) == (expected.correlation_id, expected.error_code)
            else:
                assert closed_by_peer(s, timeout=30), f"{case}: connection not closed"
        finally:
            s.close()
    if isinstance(expected, Refused):
        wait_for(lambda: rejected(listener, expected.reason) == before[expected.reason] + 1, 10,
                 what=f"frames_rejected{{reason={expected.reason}}} counted once")
        assert len(warn_lines(listener, expected.reason)) == 1, f"one WARN line with reason={expected.reason}"
        refusing = listener.edges[expected.at]
        assert refusing.metric("strait_frames_rejected", reason=expected.reason) == \
            before_at[expected.reason] + 1, f"refused by edge {expected.at} of {len(listener.edges)}"
        assert len(warn_lines(refusing, expected.reason)) == 1, f"the WARN line is edge {expected.at}'s"
    after = {r: rejected(listener, r) for r in reasons}
    others = {r: after[r] - before[r] for r in reasons
              if not (isinstance(expected, Refused) and r == expected.reason) and after[r] != before[r]}
    assert others == {}, f"unexpected rejections counted: {others}"
    for e in listener.edges:
        assert e.alive(), f"strait-edge died:\n{e.proc.tail()}"


def closed_after_client_hello(s: socket.socket, listener: "Listener", server_name: str | None) -> bool:
    """Starts a TLS handshake naming `server_name` (None: no SNI extension at all) on `s`, which the TLS
    socket takes over; True when the edge closes the connection."""
    ctx = ssl.create_default_context(cafile=str(listener.pki.pem("ca")))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(listener.pki.pem("orders")), str(listener.pki.key("orders")))
    tls = ctx.wrap_socket(s, server_hostname=server_name, do_handshake_on_connect=False)
    try:
        tls.settimeout(30)
        try:
            tls.do_handshake()
        except TimeoutError:
            return False
        except (ssl.SSLError, OSError):
            return True  # closed (or reset) before the handshake could finish
        return closed_by_peer(tls, timeout=30)
    finally:
        tls.close()


@pytest.mark.parametrize("kind", ["authz", "tunnel"])
def test_undecodable_body_for_every_api_a_filter_decodes(kind, broker, edge, tmp_path):
    """Where authorization decodes requests (an authorizing listener; a tunnel's far edge), each API key
    the listener offers, at its newest version, with a valid header and a body that stops at once. Every
    key authorization decodes is refused as `undecodable` at the edge that authorizes (one count and one
    WARN line per connection, nothing reaches the broker); the few it lets through undecoded (SASL and
    client telemetry, whose answers carry no resource) reach the broker, which closes the connection,
    and nothing is counted for them. A well-behaved client on the same edge completes meanwhile.
    (Produce on an encrypting listener, the one request it decodes, is in the catalogue.)"""
    listener = listener_for(kind, broker, edge, tmp_path)
    refusing = listener.edges[-1]
    offered = offered_versions(listener)
    every = sorted(k for k in offered if k != API_VERSIONS)
    keys = [k for k in every if k not in NOT_DECODED_BY_AUTHZ]
    assert len(keys) > 20, offered  # Kafka 4.1 offers 60 of them through the edge, Tansu 0.6 about 30
    before = rejected(listener, "undecodable")
    warned_before = len(warn_lines(listener, "undecodable"))
    with WellBehaved(listener):
        for n, key in enumerate(every):
            s = listener.open()
            try:
                # Header v1 and one zero byte: the tagged fields of header v2 where the version is
                # flexible, else the body's first byte; either way the body ends before its fields.
                s.sendall(frame(request_v0_header(key, offered[key][1], 1000 + n) + b"\x00"))
                assert closed_by_peer(s, timeout=30), f"api key {key}: connection not closed"
            finally:
                s.close()
    wait_for(lambda: rejected(listener, "undecodable") == before + len(keys), 15,
             what=f"{len(keys)} undecodable requests counted")
    assert refusing.metric("strait_frames_rejected", reason="undecodable") == before + len(keys), \
        "refused where authorization decodes"
    assert len(warn_lines(listener, "undecodable")) == warned_before + len(keys)
    for e in listener.edges:
        assert e.alive()


def uvarint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def compact_str(s: str) -> bytes:
    return uvarint(len(s) + 1) + s.encode()


def produce_v9(correlation_id: int, topic: str, batch: bytes) -> bytes:
    """A whole Produce v9 request (flexible) for partition 0 of `topic`, acks=1."""
    partition = struct.pack(">i", 0) + uvarint(len(batch) + 1) + batch + b"\x00"
    topic_data = compact_str(topic) + uvarint(2) + partition + b"\x00"
    return frame(header_v2(PRODUCE, 9, correlation_id) + b"\x00" + struct.pack(">hi", 1, 30000)
                 + uvarint(2) + topic_data + b"\x00")


def produce_v9_partition_error(body: bytes) -> tuple[int, int]:
    """(correlation id, error code of the first partition) of a Produce v9 answer."""
    correlation_id = struct.unpack(">i", body[:4])[0]
    pos = 5  # response header v1: correlation id, tagged fields (empty)
    pos += 1  # responses: compact array of one
    name_len = body[pos] - 1
    pos += 1 + name_len + 1  # the name, then partitions: compact array of one
    pos += 4  # index
    return correlation_id, struct.unpack(">h", body[pos:pos + 2])[0]


def three_record_batch() -> bytearray:
    from kafka.record.default_records import DefaultRecordBatchBuilder
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i in range(3):
        b.append(i, timestamp=None, key=None, value=b"v%d" % i, headers=[])
    return bytearray(b.build())


def lying_record_count() -> bytes:
    batch = three_record_batch()
    batch[57:61] = struct.pack(">i", 0x7FFFFFFF)  # the record count, after the 57-byte header
    return bytes(batch)


def lying_header_count() -> bytes:
    batch = three_record_batch()
    # The first record: length, attributes, timestamp delta, offset delta, key length (-1), value length
    # (2), the value, then its header count (0), which now claims 63 headers that are not there.
    first = 61
    assert batch[first + 1:first + 7] == b"\x00\x00\x00\x01\x04v", bytes(batch[first:first + 10])
    batch[first + 9] = 0x7E
    return bytes(batch)


COUNT_CASES = {"record_count": lying_record_count, "header_count": lying_header_count}
ENCRYPTION_ERRORS = "strait_encryption_partition_errors"
CORRUPT_MESSAGE = 2


@pytest.mark.parametrize("case", list(COUNT_CASES))
@pytest.mark.parametrize("kind", ["encrypt"] + (["plain"] if BROKER_KIND == "kafka" else []))
def test_record_batches_whose_counts_outrun_their_bytes(case, kind, broker, edge, tmp_path):
    """A Produce whose record batch claims 2^31 - 1 records, or whose first record claims 63 headers,
    in a few dozen bytes. The encrypting edge decodes every record to encrypt its value: it answers the
    partition CORRUPT_MESSAGE without allocating for the claim, and nothing reaches the broker. Where no
    filter reads records (plain, on Kafka), the broker answers the same, from the batch's CRC. Either
    way the connection stays open and a well-behaved client completes meanwhile."""
    listener = listener_for(kind, broker, edge, tmp_path)
    topic = f"bad-{uuid.uuid4().hex[:10]}"  # encrypted under the `bad-*` rule
    create_topics_at_broker(listener.broker.bootstrap, [topic])
    corrupt = dict(direction="produce", error="corrupt_batch")
    before = listener.edge.metric(ENCRYPTION_ERRORS, **corrupt)
    with WellBehaved(listener):
        s = listener.open()
        try:
            s.sendall(produce_v9(90, topic, COUNT_CASES[case]()))
            s.settimeout(15)
            assert produce_v9_partition_error(recv_frame(s)) == (90, CORRUPT_MESSAGE)
            # Still open: the next request is answered.
            s.sendall(frame(request_v0_header(API_VERSIONS, 0, 91)))
            assert struct.unpack(">i", recv_frame(s)[:4])[0] == 91
        finally:
            s.close()
    c = _end_offsets(listener.broker.bootstrap, topic)
    assert c == 0, f"{c} records of the lying batch reached the broker"
    # Who judged it: the edge where it decodes records, else the broker.
    judged_here = listener.edge.metric(ENCRYPTION_ERRORS, **corrupt) - before
    assert judged_here == (1 if kind == "encrypt" else 0), judged_here
    assert listener.edge.alive()


def _end_offsets(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}"})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=15)[1]
    finally:
        c.close()


# What the authorization filter lets through without decoding (edge/authz ALWAYS_ALLOWED, less
# ApiVersions, which no test here sends undecodable).
NOT_DECODED_BY_AUTHZ = {17, 36, 71, 72}  # SaslHandshake, SaslAuthenticate, GetTelemetrySubscriptions, PushTelemetry


def offered_versions(listener: "Listener") -> dict[int, tuple[int, int]]:
    """ApiVersions v0 through the listener (TLS where it has it): {api_key: (min, max)}."""
    s = listener.open()
    try:
        s.sendall(frame(request_v0_header(API_VERSIONS, 0, 7)))
        s.settimeout(15)
        body = recv_frame(s)
    finally:
        s.close()
    _, error_code, count = struct.unpack(">ihi", body[:10])
    assert error_code == 0, error_code
    return {k: (lo, hi) for k, lo, hi in (struct.unpack(">hhh", body[10 + 6 * i:16 + 6 * i]) for i in range(count))}


@pytest.mark.parametrize("case,kind", [(c, k) for c in TLS_CASES for k in ("mtls", "sni")]
                         + [(c, "sni") for c in SNI_TLS_CASES])
def test_bad_tls_input(case, kind, broker, edge, tmp_path, request):
    """TLS that never gets as far as a session, on the mTLS listener and on the SNI port (where the
    ClientHello picks the cluster, so a hello without a name, or with one nobody serves, is refused
    too): closed, the reason counted once in tls_handshakes_total, one WARN line, while a well-behaved
    client on the same edge completes every request."""
    if kind == "sni":
        request.getfixturevalue("sni_dns")
    listener = listener_for(kind, broker, edge, tmp_path, handshake_timeout="3s")
    e = listener.edge
    reason = TLS_CASES.get(case) or SNI_TLS_CASES[case]
    before = e.metric("strait_tls_handshakes", result="failed", reason=reason)
    with WellBehaved(listener):
        s = listener.raw()
        try:
            if case in SNI_TLS_CASES:
                name = None if case == "no_server_name" else f"nobody.{SNI_DOMAIN}"
                closed = closed_after_client_hello(s, listener, name)
            else:
                if case == "plaintext_before_handshake":
                    s.sendall(frame(request_v0_header(API_VERSIONS, 0, 1)))
                closed = closed_by_peer(s, timeout=30)
            assert closed, f"{case}: connection not closed"
        finally:
            s.close()
    wait_for(lambda: e.metric("strait_tls_handshakes", result="failed", reason=reason) == before + 1, 10,
             what=f"tls_handshakes{{result=failed,reason={reason}}} counted once")
    assert len(warn_lines(e, reason)) == 1, f"one WARN line with reason={reason}"
    assert e.metric("strait_tls_handshakes", result="failed") == before + 1, "only this attempt failed"
    assert e.alive()


@pytest.mark.parametrize("case", list(CERT_CASES))
def test_bad_client_certificate(case, broker, edge, tmp_path):
    """Expired, not yet valid, foreign-CA and wrong-trust-domain client certificates on the mTLS
    listener: refused at the handshake, the reason counted once, one WARN line, nothing relayed for
    them, while a well-behaved client on the same edge completes every request."""
    leaf, reason = CERT_CASES[case]
    listener = listener_for("mtls", broker, edge, tmp_path)
    listener.pki.leaf("unbound-domain", uris=["spiffe://unbound.example/ns/a/sa/b"])
    e = listener.edge
    before = e.metric("strait_tls_handshakes", result="failed", reason=reason)
    with WellBehaved(listener):
        assert refused_at_handshake(listener, leaf), f"{case}: the edge served a session"
    wait_for(lambda: e.metric("strait_tls_handshakes", result="failed", reason=reason) == before + 1, 10,
             what=f"tls_handshakes{{result=failed,reason={reason}}} counted once")
    assert len(warn_lines(e, reason)) == 1, f"one WARN line with reason={reason}"
    assert e.metric("strait_tls_handshakes", result="failed") == before + 1, "only this refusal failed"
    assert e.alive()


def test_tls_garbage_after_handshake(broker, edge, tmp_path):
    """Bytes that are not TLS records on an established mTLS connection: closed, one WARN line (a TLS
    error on an established connection), no frame counted as rejected, no handshake counted as failed."""
    listener = listener_for("mtls", broker, edge, tmp_path)
    e = listener.edge
    failed_before = e.metric("strait_tls_handshakes", result="failed")
    with WellBehaved(listener):
        s = listener.open()
        try:
            # A request answered first: the server side of the handshake is over (in TLS 1.3 the client
            # is done before the server has read its Finished).
            s.sendall(frame(request_v0_header(API_VERSIONS, 0, 3)))
            assert struct.unpack(">i", recv_frame(s)[:4])[0] == 3
            # Under the TLS layer, straight onto the TCP connection.
            os.write(s.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
            assert closed_by_peer(s, timeout=30), "connection not closed"
        finally:
            s.close()
    wait_for(lambda: [l for l in e.proc.all_logs().splitlines()
                      if '"level":"WARN"' in l and "TLS error on an established connection" in l], 10,
             what="a WARN line for the TLS error")
    assert e.metric("strait_frames_rejected") == 0
    assert e.metric("strait_tls_handshakes", result="failed") == failed_before
    assert e.alive()
