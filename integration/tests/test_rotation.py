"""Every certificate of the mesh rotating at once, under load, through a CA rotation, with real processes:
a 3-node strait-control on mTLS (the CA of rotation.example), a strait-kms-broker and a strait-edge that both
join with tokens and are configured by the control plane, Apache Kafka, and a confluent-kafka producer and
consumer whose certificate came from `straitctl cert issue`.

- control nodes, the edge and the kms-broker get 1-minute certificates (renewed at half-life);
- `straitctl ca rotate` at the start: the new root is in the bundle at once and signs after
  `--ca-publish-delay` (30 s), while the old one keeps verifying what it signed;
- the edge encrypts through the kms-broker (a `KmsRealm` with `provider: broker`, reached on the edge's SVID);
- for STRAIT_ROTATION_SECONDS (90 s by default; `make soak-rotation` runs 300) the client produces and
  consumes with zero failed requests and reads back every record; the edge and the kms-broker each
  present at least 3 certificates (read from TLS handshakes) signed by both roots; each control node has at
  least 2 recorded certificates (`IssuedCertificate`, read every 10 s: expired ones are pruned), of both
  generations; Kafka stores only ciphertext, and a record encrypted
  after the rotations (a new DEK wrapped through the broker) still round-trips.
"""

import json
import os
import time
from pathlib import Path

from lib.clients import unique
from lib.control import ControlPlane, binary
from lib.ports import free_port, free_range
from lib.procs import Proc
from lib.wait import wait_for
from tests.test_control_plane import accepts
from tests.test_encryption import parse_cipher
from tests.test_identity import consume as read
from tests.test_identity import kafka_config
from tests.test_identity import served_certificate as served

DOMAIN = "rotation.example"
CLIENT_ID = f"spiffe://{DOMAIN}/ns/shop/sa/orders"
# Two 32-byte KEKs for the development keyring behind the broker: kek-b wraps the DEK made at the end.
KEYRING = ('{"keys":{"kek-a":["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="],'
           '"kek-b":["HxscGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQAfHh0="]}}')
ONE_MINUTE = ("--cert-ttl-control", "1m", "--cert-ttl-edge", "1m", "--cert-ttl-kms-broker", "1m",
              "--ca-publish-delay", "30s")


def mesh(kafka: str, port: int, ports: range, kms_port: int) -> str:
    return f"""
kind: KafkaCluster
name: east
spec: {{ bootstrap_servers: ["{kafka}"] }}
---
kind: Edge
name: edge-east
spec: {{ cluster: east, advertised_addresses: ["127.0.0.1:{port}"] }}
---
kind: VirtualCluster
name: shop
spec:
  edge: edge-east
  cluster: east
  bootstrap: 127.0.0.1:{port}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {ports.start}-{ports.stop - 1} }}
  tls: {{ identity: svid, client_trust_bundles: [{DOMAIN}] }}
---
kind: KmsRealm
name: mesh
spec: {{ provider: broker, endpoints: ["https://127.0.0.1:{kms_port}"], backend: dev }}
---
kind: EncryptionPolicy
name: shop
spec:
  rules:
  - {{ topics: ["rotation-a-*"], kms: mesh, kek_template: kek-a }}
  - {{ topics: ["rotation-b-*"], kms: mesh, kek_template: kek-b }}
  unresolved_key_policy: reject
---
kind: AuthorizationPolicy
name: shop
spec:
  rules:
  - {{ principal: "spiffe://{DOMAIN}/ns/shop/sa/*", allow: [all], topics: ["*"], groups: ["*"] }}
"""


def broker_file(directory: Path, port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "keys.json").write_text(KEYRING)
    path = directory / "broker.yaml"
    path.write_text(f"""
listen: "127.0.0.1:{port}"
trust_domain: {DOMAIN}
tls: {{ identity: svid }}
kms:
  - name: dev
    local: {{ path: keys.json }}
""")
    return path


def roots_of(bundle: Path) -> list:
    from cryptography import x509
    return x509.load_pem_x509_certificates(bundle.read_bytes())


def signer(cert, roots: list) -> int:
    """The index in `roots` of the root that signed `cert`."""
    for i, root in enumerate(roots):
        try:
            cert.verify_directly_issued_by(root)
            return i
        except Exception:  # noqa: BLE001 - another root's signature
            continue
    raise AssertionError(f"certificate {cert.serial_number:x} is signed by none of the bundle's roots")


def create_topics(bootstrap: str, *names: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the results are in
    for future in admin.create_topics([NewTopic(n, 1, 1) for n in names]).values():
        future.result(30)


def issued(control: ControlPlane) -> list[dict]:
    out = control.ctl("get", "IssuedCertificate", "-o", "json", check=True).stdout
    return [r["spec"] for r in json.loads(out)]


def mesh_processes(control: ControlPlane, kafka, tmp_path: Path, logs: Path) -> tuple[Proc, Proc, int, int]:
    """Applies `mesh()` for `kafka` and returns, not yet started, the edge and the kms-broker that join
    with tokens and follow `control`: (edge, kms-broker, the edge's bootstrap port, the broker's port)."""
    port, ports, kms_port = free_port(), free_range(8), free_port()
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh(kafka.bootstrap, port, ports, kms_port))
    control.ctl("apply", "-f", str(path), check=True)
    kms_dir = tmp_path / "kms-broker"
    kms = Proc("kms-broker", [binary("strait-kms-broker"), "--config", str(broker_file(kms_dir, kms_port)),
                              "--control", control.endpoints, "--name", "kms-1",
                              "--join-token", control.token_create(f"spiffe://{DOMAIN}/kms-broker/kms-1"),
                              "--cache-dir", str(kms_dir / "cache"), "--heartbeat-interval", "1s"], logs)
    edge = Proc("edge", [binary("strait-edge"), "--control", control.endpoints, "--name", "edge-east",
                         "--join-token", control.token_create(f"spiffe://{DOMAIN}/edge/edge-east"),
                         "--cache-dir", str(tmp_path / "edge-cache"), "--admin", f"127.0.0.1:{free_port()}"],
                logs)
    return edge, kms, port, kms_port


def test_every_certificate_rotates_through_a_ca_rotation_under_load(broker, logs, tmp_path):
    from confluent_kafka import Consumer, Producer
    duration = float(os.environ.get("STRAIT_ROTATION_SECONDS", "90"))
    kafka = broker()
    topic, late_topic = unique("rotation-a"), unique("rotation-b")
    create_topics(kafka.bootstrap, topic, late_topic)
    control = ControlPlane(tmp_path / "control", logs, trust_domain=DOMAIN, nodes=3, extra_args=ONE_MINUTE).start()
    rotate = control.ctl("ca", "rotate")
    assert rotate.returncode == 0, rotate.stderr
    client = control.cert_issue(CLIENT_ID, tmp_path / "orders", ttl="30m")
    roots = roots_of(client / "bundle.pem")
    assert len(roots) == 2, "the prepared root is in the bundle at once"
    # Until the publication delay has passed, the old root (first generation) signs.
    old = signer(x509_of(client / "cert.pem"), roots)

    edge, kms, port, kms_port = mesh_processes(control, kafka, tmp_path, logs)
    kms.start()
    edge.start()
    try:
        wait_for(lambda: accepts(kms_port), 60, what="kms-broker serving after joining")
        wait_for(lambda: accepts(port), 60, what="edge serving its configuration from the control plane")
        producer = Producer({**kafka_config(port, client), "message.timeout.ms": 15000, "linger.ms": 5})
        consumer = Consumer({**kafka_config(port, client), "group.id": unique("g"),
                             "auto.offset.reset": "earliest"})
        consumer.subscribe([topic])
        failures: list = []
        sent = consumed = 0
        edge_certs: dict[int, object] = {}
        kms_certs: dict[int, object] = {}
        # Records of expired certificates are pruned: collect them as they appear.
        records: dict[str, dict] = {}
        end = time.monotonic() + duration
        next_probe = next_record = 0.0
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
                for certs, probed in ((edge_certs, port), (kms_certs, kms_port)):
                    cert = served(probed, client)
                    certs[cert.serial_number] = cert
                next_probe = time.monotonic() + 2
            if time.monotonic() >= next_record:
                records.update((r["serial"], r) for r in issued(control))
                next_record = time.monotonic() + 10
        assert producer.flush(30) == 0
        deadline = time.monotonic() + 30
        while consumed < sent and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                consumed += 1
        consumer.close()
        assert failures == [], failures[:5]
        assert consumed == sent, f"consumed {consumed} of {sent}"

        new = 1 - old
        for name, certs in (("edge", edge_certs), ("kms-broker", kms_certs)):
            assert len(certs) >= 3, f"the {name} presented {len(certs)} certificates in {duration:.0f}s"
            signers = {signer(c, roots) for c in certs.values()}
            assert signers == {old, new}, f"the {name}'s certificates were signed by roots {signers}"
        records.update((r["serial"], r) for r in issued(control))
        for node in (1, 2, 3):
            mine = [r for r in records.values() if r["spiffe_id"] == f"spiffe://{DOMAIN}/control/{node}"]
            assert len(mine) >= 2, f"control node {node} has {len(mine)} recorded certificates"
            assert len({r["ca_generation"] for r in mine}) == 2, mine

        # Kafka holds ciphertext; a DEK made now (another KEK) is wrapped through the broker after all the
        # rotations and still round-trips.
        stored = read({"bootstrap.servers": kafka.bootstrap}, topic, 1)
        assert len(stored) == 1 and not stored[0].startswith(b"m")
        assert parse_cipher(stored[0])["kms"] == "mesh"
        late = Producer(kafka_config(port, client))
        late.produce(late_topic, value=b"after-rotation")
        assert late.flush(20) == 0
        assert read(kafka_config(port, client), late_topic, 1) == [b"after-rotation"]
        assert parse_cipher(read({"bootstrap.servers": kafka.bootstrap}, late_topic, 1)[0])["kms"] == "mesh"

        for proc in (edge, kms):
            log = proc.current_log()
            assert log.count("SVID renewed; new handshakes use it") >= 2, proc.name
            assert "SVID renewal failed" not in log, proc.name
    finally:
        edge.stop()
        kms.stop()
        control.stop()


def x509_of(path: Path):
    from cryptography import x509
    return x509.load_pem_x509_certificate(path.read_bytes())
