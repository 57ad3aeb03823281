"""The mesh's KMS path on identities from the control plane's CA, with real processes: strait-control (CA of
test.example), a strait-kms-broker and a strait-edge that both join with tokens from `straitctl token create`.

- the broker joins as `spiffe://test.example/kms-broker/kms-1` and serves that SVID (`tls: { identity: svid }`),
  issued by the CA, with its listen IP; its callers' roots come from the control plane's TrustBundle;
- the edge joins as `spiffe://test.example/edge/edge-east` and reaches the broker with
  `broker: { identity: svid }` and no `ca` (verified against the trust domain's bundle from its SVID);
- a Kafka client with a `straitctl cert issue` certificate produces through the edge: the records are
  ciphertext at the broker naming the KMS `mesh`, and read back as plaintext through the edge;
- the same edge configuration without a join token (no SVID) is refused at start, naming why.
"""

import stat
from pathlib import Path

from lib.ports import free_port, free_range
from lib.procs import Proc
from lib.wait import wait_for
from tests.test_control_plane import DOMAIN, accepts, binary
from tests.test_encryption import parse_cipher
from tests.test_identity import (EDGE_ID, CaControl, consume, control_pki, create_topic, kafka_config,
                                 produce_one, served_certificate, start_edge, uris)

BROKER_ID = f"spiffe://{DOMAIN}/kms-broker/kms-1"
# One 32-byte KEK for the development keyring behind the broker.
KEYRING = '{"keys":{"kek-a":["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="]}}'


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


def edge_file(path: Path, kafka: str, port: int, ports: range, bundle: Path, kms_port: int) -> Path:
    path.write_text(f"""
virtual_clusters:
  - name: shop
    bootstrap: 127.0.0.1:{port}
    brokers: {{ advertised_host: 127.0.0.1, port_range: {ports.start}-{ports.stop - 1} }}
    upstream: {{ bootstrap_servers: ["{kafka}"] }}
    tls:
      identity: svid
      client_trust_bundles: [{{ trust_domain: {DOMAIN}, pem_file: "{bundle}" }}]
    encryption:
      rules: [{{ topic: "identity-*", kms: mesh, kek: kek-a }}]
kms:
  - name: mesh
    broker: {{ endpoints: ["https://127.0.0.1:{kms_port}"], identity: svid }}
""")
    return path


def raw_values(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """What the Kafka broker stores, read around the edge."""
    return consume({"bootstrap.servers": bootstrap}, topic, count)


def test_edge_encrypts_through_a_kms_broker_both_on_their_svids(broker, logs, tmp_path):
    from confluent_kafka import Producer
    t = broker()
    topic = create_topic(t.bootstrap)
    control = CaControl(logs, tmp_path / "control", control_pki(tmp_path / "pki")).start()
    client = control.issue(tmp_path / "orders")
    kms_port = free_port()
    kms_dir = tmp_path / "kms-broker"
    token = control.ctl("token", "create", "--spiffe-id", BROKER_ID, "--ttl", "10m", "--uses", "1")
    assert token.returncode == 0, token.stderr
    kms = Proc("kms-broker", [binary("strait-kms-broker"), "--config", str(broker_file(kms_dir, kms_port)),
                              "--control", control.endpoint, "--name", "kms-1",
                              "--join-token", token.stdout.strip(), "--cache-dir", str(kms_dir / "cache"),
                              "--heartbeat-interval", "1s"], logs, env={"NO_COLOR": "1"})
    kms.start()
    edge = None
    try:
        wait_for(lambda: accepts(kms_port), 60, what="kms-broker serving after joining with its token")
        cert = served_certificate(kms_port, client)
        assert uris(cert) == [BROKER_ID]
        from cryptography import x509
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.IPAddress)
        assert [str(ip) for ip in ips] == ["127.0.0.1"]
        for name in ["cert.pem", "key.pem", "bundle.pem", "server-ca.pem"]:
            mode = stat.S_IMODE((kms_dir / "cache" / "svid" / name).stat().st_mode)
            assert mode == 0o600, f"{name}: {oct(mode)}"
        # The edges' roots: the CA's TrustBundle, followed over the broker's SVID.
        wait_for(lambda: f'trust_domains=["{DOMAIN}"]' in kms.current_log(), 30,
                 what="the broker trusting the CA's bundle")

        port, ports, admin = free_port(), free_range(8), free_port()
        config = edge_file(tmp_path / "edge.yaml", t.bootstrap, port, ports, client / "bundle.pem", kms_port)

        # Without an SVID the edge cannot present identity: svid to the broker: it does not start.
        alone = Proc("edge-no-svid", [binary("strait-edge"), "--config", str(config)], logs)
        alone.start()
        assert alone.wait(60) not in (0, None)
        assert "broker identity: svid, but this process has no SVID of its own" in alone.current_log()

        edge = start_edge(logs, control, config, tmp_path / "edge-cache", admin, control.token())
        wait_for(lambda: accepts(port), 60, what="edge serving after joining with its token")
        assert uris(served_certificate(port, client)) == [EDGE_ID]

        producer = Producer({**kafka_config(port, client), "message.timeout.ms": 15000})
        assert produce_one(producer, topic, b"secret-via-mesh") is None
        assert consume(kafka_config(port, client), topic, 1) == [b"secret-via-mesh"]
        stored = raw_values(t.bootstrap, topic, 1)
        assert len(stored) == 1 and b"secret-via-mesh" not in stored[0]
        assert parse_cipher(stored[0])["kms"] == "mesh"

        # Both heartbeats went out on their SVIDs.
        wait_for(lambda: control.ctl("get", "KmsBroker", "kms-1").returncode == 0, 20,
                 what="the broker's heartbeat")
        assert "SVID renewal failed" not in kms.current_log()
    finally:
        if edge:
            edge.stop()
        kms.stop()
        control.stop()
