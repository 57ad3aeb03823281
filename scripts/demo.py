"""The quick-start demo on the trust model of docs/security.md: Tansu, a single-node control plane that
is the certificate authority of `demo.example` (CA key sealed with a development key file), a local
(development) KMS keyring, and strait-edge configured only by the control plane.

- a bootstrap PKI made here gives the control node its first serving certificate and straitctl its
  admin identity (`spiffe://demo.example/admin/demo`, admin by `--admin-identity`);
- the edge has no certificate file: it joins with a one-time token from `straitctl token create` and
  gets `spiffe://demo.example/edge/edge-local` from the CA (key generated in memory), which it serves
  on the virtual cluster's mTLS listener and presents to the control plane;
- the Kafka client's certificate (`spiffe://demo.example/ns/shop/sa/orders`) comes from
  `straitctl cert issue`; the authorization policy names that SPIFFE ID;
- records to `payments-orders` are encrypted at the edge (the broker stores ciphertext), records to
  `demo` are not; both read back in clear through the edge.

- a second site: `edge-west` (its certificate from `straitctl cert issue`, configured by a file) links to
  `edge-local` through a QUIC tunnel (docs/mesh.md) and serves the same cluster at its own bootstrap;
  a client there produces and consumes `payments-orders` through west only, authorized and encrypted at
  `edge-local` under the client's own SPIFFE ID.

- federated encryption (docs/federation.md): every DEK of `payments-*` is also wrapped for realm
  `dev-west` (site west's KMS; here a second local keyring) into the `strait.keys` topic. The demo copies
  `payments-orders` and `strait.keys` record by record to site west's own cluster (a second Tansu) as
  `east.payments-orders` and `east.strait.keys`, as a replication tool would; west's edge, which knows only
  realm `dev-west`, decrypts them.

Ports: Tansu 9092, control plane 7001, edge 19092 (brokers 19100+), admin 9901, mesh 7443 (UDP);
west edge 29092 (brokers 29100+), admin 9902; west's Tansu 9093, served by west's edge at 39092
(brokers 39100+)."""

import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integration"))

from confluent_kafka import Consumer, Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from lib.edge import default_target_dir  # noqa: E402
from lib.mirrormaker import copy_topic  # noqa: E402
from lib.pki import Pki  # noqa: E402
from lib.procs import Proc  # noqa: E402
from lib.tansu import Tansu  # noqa: E402
from lib.wait import wait_for  # noqa: E402

BIN = default_target_dir() / "debug"

# edge-local's file: its tunnel endpoint, on its own certificate from the CA (source: svid).
MESH_LOCAL = """
mesh:
  listen: 127.0.0.1:7443
  identity: {{ source: svid }}
  trust_bundles: [{{ trust_domain: {domain}, pem: "{bundle}" }}]
  peers:
    - name: edge-west
      spiffe_id: spiffe://{domain}/edge/edge-west
      may_assert: ["spiffe://{domain}/ns/shop/*"]
      exports: [quickstart]
"""

# Site west: the quick-start cluster served at west's own bootstrap, through the tunnel.
MESH_WEST = """
admin: {{ listen: 127.0.0.1:9902 }}
mesh:
  identity: {{ cert: "{dir}/cert.pem", key: "{dir}/key.pem" }}
  trust_bundles: [{{ trust_domain: {domain}, pem: "{bundle}" }}]
  peers:
    - name: edge-local
      address: 127.0.0.1:7443
      spiffe_id: spiffe://{domain}/edge/edge-local
kms:
  - name: dev-west                 # DEVELOPMENT ONLY keyring: stands for west's own KMS
    local: {{ path: "{keyring_west}" }}
virtual_clusters:
  - name: payments-west            # west's own cluster, holding what was copied from east
    bootstrap: 127.0.0.1:39092
    brokers: {{ advertised_host: 127.0.0.1, port_range: 39100-39199 }}
    upstream: {{ bootstrap_servers: [127.0.0.1:9093] }}
    tls:
      cert: "{dir}/cert.pem"
      key: "{dir}/key.pem"
      client_trust_bundles: [{{ trust_domain: {domain}, pem_file: "{bundle}" }}]
    encryption:
      rules:
        - {{ topic: "east.payments-*", kms: dev-west, kek: "kek-$(topic)" }}
      keys_topic: {{ also_read: [east.strait.keys] }}   # east's keys topic as copied here
  - name: quickstart-west
    bootstrap: 127.0.0.1:29092
    brokers: {{ advertised_host: 127.0.0.1, port_range: 29100-29199 }}
    upstream: {{ remote: {{ peer: edge-local, virtual_cluster: quickstart }} }}
    tls:
      cert: "{dir}/cert.pem"
      key: "{dir}/key.pem"
      client_trust_bundles: [{{ trust_domain: {domain}, pem_file: "{bundle}" }}]
"""


def metric(admin_port: int, name: str, labels: str) -> float:
    """One sample of an edge's /metrics (0 when absent)."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def consume(client: dict, topic: str, count: int, group: str):
    c = Consumer({**client, "group.id": group, "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got, errors = [], []

    def poll():
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append(m)
        elif m is not None:
            errors.append(m.error())
        return len(got) >= count
    try:
        wait_for(poll, 60, interval=0, what=f"{count} records from {topic}")
    except Exception as e:
        raise SystemExit(f"[demo] FAILED: {e}; errors: {errors[-3:]}") from None
    c.close()
    return got


def tls_handshake(host: str, port: int, client_dir: Path) -> bool:
    """Whether the edge completes an mTLS handshake for the client's certificate, verifying its name."""
    import socket
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(client_dir / "bundle.pem"))
    ctx.load_cert_chain(str(client_dir / "cert.pem"), str(client_dir / "key.pem"))
    try:
        with socket.create_connection((host, port), timeout=2) as raw, ctx.wrap_socket(raw, server_hostname=host):
            return True
    except OSError:
        return False


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="strait-demo-"))
    logs = work / "logs"
    print(f"[demo] working directory {work}")
    keyring, keyring_west = work / "keyring.json", work / "keyring-west.json"
    keyring.write_text(json.dumps({"keys": {"kek-payments-orders": [base64.b64encode(os.urandom(32)).decode()]}}))
    keyring_west.write_text(json.dumps({"keys": {"kek-payments-orders": [base64.b64encode(os.urandom(32)).decode()]}}))
    keyring_west.chmod(0o600)
    keyring.chmod(0o600)
    mesh = work / "mesh.yaml"
    mesh.write_text((ROOT / "examples/quickstart/mesh.yaml").read_text().replace("@KEYRING@", str(keyring))
                    .replace("@KEYRING_WEST@", str(keyring_west)))

    domain = "demo.example"
    pki = Pki(work / "pki")
    pki.ca("ca")
    pki.leaf("control", ips=["127.0.0.1"], dns=["localhost"], uris=[f"spiffe://{domain}/control/1"])
    pki.leaf("admin", uris=[f"spiffe://{domain}/admin/demo"])

    # SQLite storage: Tansu 0.6's memory engine reports a high watermark of the last batch's base offset + 1,
    # which stops a copy (and a keys-topic follower) short of the batch's other records.
    tansu = Tansu(logs, port=9092, storage=f"sqlite:///{work}/tansu.db")
    tansu_west = Tansu(logs, port=9093, name="tansu-west", storage=f"sqlite:///{work}/tansu-west.db")
    edge = west = None
    control = Proc("strait-control", [
        str(BIN / "strait-control"), "--dev", "--data-dir", str(work / "control"), "--listen", "127.0.0.1:7001",
        "--tls-cert", str(pki.pem("control")), "--tls-key", str(pki.key("control")),
        "--tls-client-ca", str(pki.pem("ca")), "--trust-domain", domain,
        "--ca-seal-key-file", str(work / "ca-seal.key"),  # DEVELOPMENT ONLY: use --ca-seal-kms in production
        "--admin-identity", f"spiffe://{domain}/admin/*", "--audit-log", str(work / "audit.jsonl")], logs)
    straitctl = [str(BIN / "straitctl"), "--endpoints", "127.0.0.1:7001", "--ca", str(pki.pem("ca")),
                 "--cert", str(pki.pem("admin")), "--key", str(pki.key("admin"))]

    def ctl(*args: str) -> str:
        return subprocess.run(straitctl + list(args), check=True, capture_output=True, text=True).stdout.strip()
    try:
        print("[demo] starting Tansu on 127.0.0.1:9092 and the control plane on 127.0.0.1:7001")
        tansu.start()
        control.start()
        wait_for(lambda: subprocess.run(straitctl + ["members"], capture_output=True).returncode == 0, 30,
                 what="control plane")
        print("[demo] straitctl apply -f examples/quickstart/mesh.yaml")
        subprocess.run(straitctl + ["apply", "-f", str(mesh)], check=True)
        token = ctl("token", "create", "--spiffe-id", f"spiffe://{domain}/edge/edge-local", "--ttl", "10m",
                    "--uses", "1")
        print(f"[demo] straitctl token create --spiffe-id spiffe://{domain}/edge/edge-local --uses 1 "
              f"-> {token.rsplit('.', 2)[0]}.<secret>.<pin>")
        client_dir = work / "orders"
        ctl("cert", "issue", "--spiffe-id", f"spiffe://{domain}/ns/shop/sa/orders", "--ttl", "1h",
            "--out", str(client_dir))
        print(f"[demo] straitctl cert issue --spiffe-id spiffe://{domain}/ns/shop/sa/orders --out {client_dir}")
        print("[demo] starting strait-edge with --join-token only (configured by the control plane)")
        # The file adds what the control plane does not carry yet: the edge's tunnel endpoint for peers.
        local_file = work / "edge-local.yaml"
        local_file.write_text(MESH_LOCAL.format(bundle=client_dir / "bundle.pem", domain=domain))
        edge = Proc("strait-edge", [
            str(BIN / "strait-edge"), "--control", "127.0.0.1:7001", "--name", "edge-local",
            "--join-token", token, "--cache-dir", str(work / "edge-cache"), "--admin", "127.0.0.1:9901",
            "--config", str(local_file)], logs)
        edge.start()

        def edge_ready():
            if not edge.alive():
                raise SystemExit(f"strait-edge exited:\n{edge.tail()}")
            return tls_handshake("127.0.0.1", 19092, client_dir)
        wait_for(edge_ready, 60, what="strait-edge serving its SVID on 127.0.0.1:19092")

        client = {"bootstrap.servers": "127.0.0.1:19092", "security.protocol": "SSL",
                  "ssl.ca.location": str(client_dir / "bundle.pem"),
                  "ssl.certificate.location": str(client_dir / "cert.pem"),
                  "ssl.key.location": str(client_dir / "key.pem")}
        admin = AdminClient(client)  # must outlive its futures
        for topic in ("payments-orders", "demo"):
            admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
        p = Producer({**client, "enable.idempotence": True})
        for i in range(3):
            p.produce("payments-orders", key=f"order-{i}".encode(), value=f"card=4111-0000-0000-{i:04d}".encode())
            p.produce("demo", key=f"key-{i}".encode(), value=f"hello strait #{i}".encode())
        assert p.flush(30) == 0
        print("[demo] produced 3 records to payments-orders (encrypted) and 3 to demo (plain) through the edge")

        for topic in ("payments-orders", "demo"):
            for m in consume(client, topic, 3, f"demo-{topic}"):
                print(f"[demo] via edge   {topic:16} key={m.key().decode():9} value={m.value().decode()}")
        for topic in ("payments-orders", "demo"):
            for m in consume({"bootstrap.servers": tansu.bootstrap}, topic, 3, f"direct-{topic}"):
                headers = [k for k, _ in (m.headers() or [])]
                shown = m.value()[:40].hex() + "..." if topic.startswith("payments") else m.value().decode()
                print(f"[demo] at broker  {topic:16} key={m.key().decode():9} headers={headers} value={shown}")

        # Site west: its own edge, linked to edge-local by a QUIC tunnel.
        west_dir = work / "edge-west"
        ctl("cert", "issue", "--spiffe-id", f"spiffe://{domain}/edge/edge-west", "--ip", "127.0.0.1",
            "--ttl", "1h", "--out", str(west_dir))
        west_file = work / "edge-west.yaml"
        # Federation: once east's edge has wrapped the DEK for dev-west (strait.keys), copy the topic and the
        # keys topic to west's cluster record by record (new batches, renamed), as a replication tool does.
        def wrapped_for_west():
            return metric(9901, "strait_encryption_federation_wraps_total", 'realm="dev-west",outcome="success"') >= 1 \
                and metric(9901, "strait_encryption_federation_pending_wraps", 'realm="dev-west"') == 0
        wait_for(wrapped_for_west, 60, what="east's edge wrapping the DEK for realm dev-west")
        print("[demo] starting site west's own cluster (Tansu on 127.0.0.1:9093)")
        tansu_west.start()
        copied = copy_topic(tansu.bootstrap, "payments-orders", tansu_west.bootstrap, "east.payments-orders")
        keys = copy_topic(tansu.bootstrap, "strait.keys", tansu_west.bootstrap, "east.strait.keys")
        print(f"[demo] copied {copied} records of payments-orders and {keys} of strait.keys to west's cluster "
              "(east.payments-orders, east.strait.keys)")
        west_file.write_text(MESH_WEST.format(dir=west_dir, bundle=client_dir / "bundle.pem", domain=domain,
                                              keyring_west=keyring_west))
        print("[demo] starting strait-edge for site west (127.0.0.1:29092), tunnel to edge-local on 127.0.0.1:7443")
        west = Proc("strait-edge-west", [str(BIN / "strait-edge"), "--config", str(west_file)], logs)
        west.start()

        def west_ready():
            if not west.alive():
                raise SystemExit(f"strait-edge (west) exited:\n{west.tail()}")
            return tls_handshake("127.0.0.1", 29092, client_dir)
        wait_for(west_ready, 60, what="strait-edge (west) serving on 127.0.0.1:29092")
        west_client = {**client, "bootstrap.servers": "127.0.0.1:29092"}
        p = Producer({**west_client, "enable.idempotence": True})
        for i in range(3, 6):
            p.produce("payments-orders", key=f"order-{i}".encode(), value=f"card=4111-0000-0000-{i:04d}".encode())
        assert p.flush(30) == 0
        print("[demo] west: produced 3 more records to payments-orders through 127.0.0.1:29092 (west's edge only)")
        for m in consume(west_client, "payments-orders", 6, "demo-west"):
            print(f"[demo] via west   payments-orders  key={m.key().decode():9} value={m.value().decode()}")
        for m in consume({"bootstrap.servers": tansu.bootstrap}, "payments-orders", 6, "direct-west")[3:]:
            print(f"[demo] at broker  payments-orders  key={m.key().decode():9} value={m.value()[:40].hex()}...")
        west_local = {**client, "bootstrap.servers": "127.0.0.1:39092"}
        for m in consume(west_local, "east.payments-orders", 3, "demo-west-local"):
            print(f"[demo] via west   east.payments-orders key={m.key().decode():9} value={m.value().decode()} "
                  "(decrypted with realm dev-west only)")
        print("[demo] control plane view of the edge and of the certificates its CA issued:")
        subprocess.run(straitctl + ["get", "Edge"], check=False)
        subprocess.run(straitctl + ["get", "IssuedCertificate"], check=False)
        print("[demo] OK: the broker holds ciphertext for payments-*, clients see plaintext through the edge,")
        print("[demo]     a client at site west reached the same cluster through west's own edge and a tunnel,")
        print("[demo]     and records copied to west's cluster decrypt there with west's realm alone")
        return 0
    finally:
        if west is not None:
            west.stop()
        if edge is not None:
            edge.stop()
        control.stop()
        tansu_west.stop()
        tansu.stop()


if __name__ == "__main__":
    sys.exit(main())
