"""Federated KMS (issue 13): records encrypted at east decrypt at west through west's own KMS, even with
east's KMS and kms-broker gone.

Everything is real: two dedicated single-node Kafka clusters (east, west), OpenBao (Transit) as east's realm
`vault-east`, moto as west's realm `aws-west`, a strait-kms-broker per site (east.example, west.example:
two CAs, mTLS, callers authorized by SPIFFE ID and `grants`), the strait-edge binary per site, librdkafka
and the Java client producing, MirrorMaker 2 (or a re-producing copy) moving the records byte for byte.

East's edge makes each DEK in vault-east and wraps it for aws-west through west's broker in the background
(grant: east's edges may only `wrap` there); the wraps go to east's keys topic `strait.keys`, which is
copied with the data (as `east.strait.keys`). West's edge reads it and unwraps through aws-west only.
"""

import json
import struct
import time

import pytest

from lib.clients import unique
from lib.edge import VirtualCluster
from lib.kms import AWS_DUMMY_ENV, ROOT_TOKEN, KmsBroker, Moto, OpenBao
from lib.mirrormaker import MirrorMaker, copy_topic, wait_mirrored
from lib.pki import Pki
from lib.ports import free_port
from lib.wait import wait_for
from tests.test_encryption import (MARKER, Sent, assert_plaintext, create_topic, poll_into, consumer,
                                   produce_ok_confluent, produce_ok_java, read, workload)

EAST, WEST, NORTH = "east.example", "west.example", "north.example"
KEYS = "strait.keys"
FORMAT_V3 = 3


@pytest.fixture(autouse=True)
def kms_env(monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", ROOT_TOKEN)
    for k, v in AWS_DUMMY_ENV.items():
        monkeypatch.setenv(k, v)


def site_pki(directory) -> Pki:
    p = Pki(directory)
    for ca in ("east-ca", "west-ca", "north-ca"):
        p.ca(ca)
    p.leaf("east-broker", ca="east-ca", ips=["127.0.0.1"], uris=[f"spiffe://{EAST}/kms-broker/east"])
    p.leaf("west-broker", ca="west-ca", ips=["127.0.0.1"], uris=[f"spiffe://{WEST}/kms-broker/west"])
    p.leaf("east-edge", ca="east-ca", uris=[f"spiffe://{EAST}/edge/east"])
    p.leaf("west-edge", ca="west-ca", uris=[f"spiffe://{WEST}/edge/west"])
    p.leaf("north-edge", ca="north-ca", uris=[f"spiffe://{NORTH}/edge/north"])
    return p


ALL_OPS = ["generate", "unwrap", "wrap", "resolve"]


class Sites:
    """East and west, each with its cluster, realm, kms-broker and edge factory."""

    def __init__(self, broker, edge, logs, tmp_path, control=None):
        self.edge_factory = edge
        self.logs = logs
        self.east_kafka = broker(dedicated=True, name="kafka-east")
        self.west_kafka = broker(dedicated=True, name="kafka-west")
        self.bao = OpenBao(logs).start()
        self.moto = Moto(logs).start()
        self.pki = site_pki(tmp_path / "pki")
        p = self.pki

        def follow(name: str) -> tuple[str, ...]:
            """Flags that make a broker follow `control` (KmsGrants, KekShreds) as kms-broker/<name>."""
            if control is None:
                return ()
            d = control.pki
            d.leaf(f"{name}-control", uris=[f"spiffe://{name}.example/kms-broker/{name}"])
            return ("--control", control.endpoints, "--name", name, "--control-ca", str(d.pem("ca")),
                    "--control-cert", str(d.pem(f"{name}-control")), "--control-key", str(d.key(f"{name}-control")),
                    "--cache-dir", str(tmp_path / f"kms-{name}-cache"), "--heartbeat-interval", "1s")
        # East's broker: its own edges do everything; west's edges may only unwrap kek-* (remote unwrap);
        # north is a known caller with no grant at all.
        self.east_broker = KmsBroker(
            logs, "east", EAST, p.pem("east-broker"), p.key("east-broker"), p.pem("east-ca"),
            kms=[self.bao.kms_entry("vault-east")],
            trust={WEST: p.pem("west-ca"), NORTH: p.pem("north-ca")},
            callers=[f"spiffe://{EAST}/edge/*", f"spiffe://{WEST}/edge/*", f"spiffe://{NORTH}/edge/*"],
            grants=[{"callers": [f"spiffe://{EAST}/edge/*"], "kms": ["*"], "operations": ALL_OPS},
                    {"callers": [f"spiffe://{WEST}/edge/*"], "kms": ["vault-east"], "keks": ["kek-*"],
                     "operations": ["unwrap"]}], args=follow("east")).start()
        # West's broker: east's edges may only wrap DEKs for aws-west.
        self.west_broker = KmsBroker(
            logs, "west", WEST, p.pem("west-broker"), p.key("west-broker"), p.pem("west-ca"),
            kms=[self.moto.kms_entry("aws-west")],
            trust={EAST: p.pem("east-ca")},
            callers=[f"spiffe://{WEST}/edge/*", f"spiffe://{EAST}/edge/*"],
            grants=[{"callers": [f"spiffe://{WEST}/edge/*"], "kms": ["*"], "operations": ALL_OPS},
                    {"callers": [f"spiffe://{EAST}/edge/*"], "kms": ["aws-west"], "operations": ["wrap"]}],
            args=follow("west")).start()
        self.topic = unique("secret-orders")
        self.kek = f"kek-{self.topic}"
        self.bao.create_key(self.kek)
        self.moto.create_key(self.kek)  # alias/kek-<topic>

    def stop(self):
        for s in (self.east_broker, self.west_broker, self.bao, self.moto):
            s.stop()

    def east_kms(self) -> list[dict]:
        p = self.pki
        return [self.east_broker.client_entry("vault-east", p.pem("east-ca"), p.pem("east-edge"),
                                              p.key("east-edge"), backend="vault-east"),
                self.west_broker.client_entry("aws-west", p.pem("west-ca"), p.pem("east-edge"),
                                              p.key("east-edge"), backend="aws-west",
                                              retry={"attempts": 1, "timeout": "5s"})]

    def east_edge(self, dek: dict | None = None):
        rules = [{"topic": "secret-*", "kms": "vault-east", "kek": "kek-$(topic)",
                  "also_wrap_for": [{"kms": "aws-west", "kek": "alias/kek-$(topic)"}]},
                 {"topic": "legacy-*", "kms": "vault-east", "kek": "kek-$(topic)"}]
        enc = {"rules": rules, **({"dek": dek} if dek else {})}
        vc = VirtualCluster("orders", self.east_kafka.bootstrap_servers, extra={"encryption": enc})
        return self.edge_factory([vc], extra={"kms": self.east_kms()})

    def west_edge(self, remote_unwrap: bool = False, identity: str = "west-edge", dek: dict | None = None):
        """A fresh west edge (cold caches): aws-west only, plus east's realm for remote unwrap if asked."""
        p = self.pki
        kms = [self.west_broker.client_entry("aws-west", p.pem("west-ca"), p.pem(identity), p.key(identity),
                                             backend="aws-west")]
        if remote_unwrap:
            kms.append(self.east_broker.client_entry("vault-east", p.pem("east-ca"), p.pem(identity),
                                                     p.key(identity), backend="vault-east",
                                                     retry={"attempts": 1, "timeout": "5s"}))
        rules = [{"topic": pattern, "kms": "aws-west", "kek": "alias/kek-$(topic)"}
                 for pattern in ("east.secret-*", "secret-*", "east.legacy-*")]
        enc = {"rules": rules, "keys_topic": {"also_read": [f"east.{KEYS}"]}, **({"dek": dek} if dek else {})}
        vc = VirtualCluster("orders", self.west_kafka.bootstrap_servers, extra={"encryption": enc})
        return self.edge_factory([vc], extra={"kms": kms})


@pytest.fixture
def sites(broker, edge, logs, tmp_path):
    s = Sites(broker, edge, logs, tmp_path)
    try:
        yield s
    finally:
        s.stop()


def produce_both_clients(bootstrap: str, topic: str) -> list[Sent]:
    """librdkafka (idempotent, zstd) then the Java client (idempotent, lz4): keys, headers, tombstones."""
    first = workload(18, big=False)
    second = workload(12, big=False)
    for s in second:
        s.ts += 100_000
    produce_ok_confluent(bootstrap, topic, first, **{"enable.idempotence": True, "acks": "all",
                                                    "compression.type": "zstd"})
    produce_ok_java(bootstrap, topic, second, **{"enable.idempotence": "true", "acks": "all",
                                                 "compression.type": "lz4"})
    return first + second


def prefix_of(value: bytes) -> bytes:
    """Version through the realm list (FORMAT.md, v3): the same for every value of one DEK."""
    (k,) = struct.unpack(">H", value[1:3])
    (w,) = struct.unpack(">H", value[3 + k:5 + k])
    end = 5 + k + w
    for _ in range(value[end]):
        end += 1 + value[end + 1]
    return value[:end + 1]


def encrypted_values(raw) -> list[bytes]:
    return [g.value for g in raw if g.value is not None]


def assert_federated_ciphertext(raw, sent):
    """East's broker holds v3 values naming aws-west as the other realm; keys, headers, timestamps kept."""
    assert len(raw) == len(sent)
    for r, s in zip(raw, sent):
        assert r.key == s.key and r.ts == s.ts
        if s.value is None:
            assert r.value is None
            continue
        assert r.value != s.value and s.value[:24] not in r.value, "plaintext at the broker"
        assert r.headers[-1] == (MARKER, bytes([FORMAT_V3, 1]))
        assert r.value[0] == FORMAT_V3
        assert b"aws-west" in r.value[:400], "the v3 prefix names the other realm"


def pending(edge_proc) -> tuple[float, float]:
    return (edge_proc.metric("strait_encryption_federation_pending_wraps", realm="aws-west"),
            edge_proc.metric("strait_encryption_federation_pending_records", realm="aws-west"))


def copy_to_west(sites: Sites, how: str, topic: str, count: int) -> str:
    """Moves the topic and east's keys topic to west byte for byte; returns the topic's name at west."""
    east, west = sites.east_kafka.bootstrap, sites.west_kafka.bootstrap
    if how == "reproduce":
        copy_topic(east, topic, west, f"east.{topic}")
        copy_topic(east, KEYS, west, f"east.{KEYS}")
        return f"east.{topic}"
    mm = MirrorMaker(sites.east_kafka, sites.west_kafka, sites.logs, topics=f"{topic}|strait\\.keys")
    mm.start()
    try:
        wait_mirrored(west, f"east.{topic}", count, timeout=120, mirror=mm)
        from lib.mirrormaker import count_records
        wait_mirrored(west, f"east.{KEYS}", count_records(east, KEYS), timeout=60, mirror=mm)
    finally:
        mm.stop()
    return f"east.{topic}"


@pytest.mark.parametrize("how", ["reproduce", "mirrormaker2"])
def test_east_records_decrypt_at_west_with_easts_kms_and_broker_gone(sites, how):
    east = sites.east_edge()
    create_topic(east.bootstrap, sites.topic)
    sent = produce_both_clients(east.bootstrap, sites.topic)
    wait_for(lambda: pending(east) == (0.0, 0.0) and
             east.metric("strait_encryption_federation_wraps", realm="aws-west", outcome="success") >= 1,
             60, what="every DEK wrapped for aws-west")
    raw_east = read(sites.east_kafka.bootstrap, sites.topic, len(sent))
    assert_federated_ciphertext(raw_east, sent)

    west_topic = copy_to_west(sites, how, sites.topic, len(sent))
    raw_west = read(sites.west_kafka.bootstrap, west_topic, len(sent))
    assert encrypted_values(raw_west) == encrypted_values(raw_east), "copied byte for byte"

    # East's realm and broker are gone; west starts cold and knows no way to east's KMS.
    sites.east_broker.stop()
    sites.bao.stop()
    west = sites.west_edge()
    assert_plaintext(read(west.bootstrap, west_topic, len(sent), timeout=90), sent)
    # One DEK per KEK at east, one unwrap per DEK at west, through aws-west.
    assert west.metric("strait_encryption_kms_calls", operation="unwrap_dek") == 1
    assert west.metric("strait_kms_operations", kms="aws-west", operation="unwrap_dek", outcome="success") == 1
    assert west.unexpected_errors() == []


def test_produce_never_waits_for_a_remote_realm_and_its_wraps_follow(sites):
    east = sites.east_edge()
    create_topic(east.bootstrap, sites.topic)
    sites.west_broker.stop()  # west's realm unreachable from east
    east.expect_error(r"aws-west|kms-broker|transport error|connect")
    sent = workload(20, big=False)
    started = time.monotonic()
    produce_ok_confluent(east.bootstrap, sites.topic, sent, **{"enable.idempotence": True, "acks": "all"})
    produced_in = time.monotonic() - started
    values = len([s for s in sent if s.value is not None])
    wait_for(lambda: pending(east) == (1.0, float(values)), 30,
             what=f"1 DEK and {values} records pending for aws-west (got {pending(east)})")
    print(f"produce took {produced_in:.2f} s with aws-west down")

    sites.west_broker.start()
    wait_for(lambda: pending(east) == (0.0, 0.0), 90, what=f"the wrap made once aws-west is back ({pending(east)})")
    west_topic = copy_to_west(sites, "reproduce", sites.topic, len(sent))
    sites.east_broker.stop()
    west = sites.west_edge()
    assert_plaintext(read(west.bootstrap, west_topic, len(sent), timeout=90), sent)


def test_remote_unwrap_for_records_without_a_wrap_here_and_an_unauthorized_site_refused(sites, edge):
    east = sites.east_edge()
    topic = unique("legacy-orders")
    sites.bao.create_key(f"kek-{topic}")
    create_topic(east.bootstrap, topic)
    sent = workload(8, big=False)
    produce_ok_confluent(east.bootstrap, topic, sent)
    west_topic = copy_to_west(sites, "reproduce", topic, len(sent))

    # Without a wrap for aws-west and no way to east: fail closed, no plaintext, no ciphertext.
    west = sites.west_edge()
    c = consumer(west.bootstrap, west_topic)
    got, errors = [], []
    try:
        wait_for(lambda: poll_into(c, got, errors, 0.3) or errors, 60, interval=0,
                 what="a partition error for records this site cannot unwrap")
    finally:
        c.close()
    assert got == [] and "RESOURCE_NOT_FOUND" in str(errors[0][1]), errors[:2]

    # With east's realm reachable through east's broker: remote unwrap, authorized for west's edges.
    west_remote = sites.west_edge(remote_unwrap=True)
    assert_plaintext(read(west_remote.bootstrap, west_topic, len(sent), timeout=60), sent)
    assert west_remote.metric("strait_kms_operations", kms="vault-east", operation="unwrap_dek",
                              outcome="success") == 1

    # North holds a certificate east's broker trusts, but no grant: refused, audited, never plaintext.
    north = sites.west_edge(remote_unwrap=True, identity="north-edge")
    north.expect_error(r"denied|PERMISSION_DENIED|refused")
    c = consumer(north.bootstrap, west_topic)
    got, errors = [], []
    try:
        wait_for(lambda: poll_into(c, got, errors, 0.3) or errors, 60, interval=0,
                 what="north refused")
    finally:
        c.close()
    assert got == [] and "TOPIC_AUTHORIZATION_FAILED" in str(errors[0][1]), errors[:2]
    wait_for(lambda: f"spiffe://{NORTH}/edge/north" in sites.east_broker.log()
             and "refused" in sites.east_broker.log(), 10, what="the refusal audited at east's broker")


def test_a_rotated_kek_keeps_every_record_decryptable_at_both_sites(sites):
    east = sites.east_edge(dek={"max_encryptions": 10})
    create_topic(east.bootstrap, sites.topic)
    before = workload(15, big=False)
    produce_ok_confluent(east.bootstrap, sites.topic, before)
    sites.bao.rotate_key(sites.kek)
    after = workload(15, big=False)
    for s in after:
        s.ts += 100_000
    produce_ok_confluent(east.bootstrap, sites.topic, after)
    wait_for(lambda: pending(east) == (0.0, 0.0), 60, what="every DEK wrapped for aws-west")
    sent = before + after
    raw = read(sites.east_kafka.bootstrap, sites.topic, len(sent))
    def wrapped_version(value: bytes) -> bytes:
        at = value.index(b"vault:v")
        return value[at + 6:value.index(b":", at + 6)]
    versions = {wrapped_version(r.value) for r in raw if r.value is not None}
    assert versions == {b"v1", b"v2"}, versions
    assert_plaintext(read(east.bootstrap, sites.topic, len(sent)), sent)
    west_topic = copy_to_west(sites, "reproduce", sites.topic, len(sent))
    sites.bao.stop()
    west = sites.west_edge()
    assert_plaintext(read(west.bootstrap, west_topic, len(sent), timeout=90), sent)
    deks = {prefix_of(r.value) for r in raw if r.value is not None}
    assert len(deks) >= 3, len(deks)
    # One unwrap per DEK at west, each through its aws-west wrap; east's realm is gone.
    assert west.metric("strait_encryption_kms_calls", operation="unwrap_dek") == len(deks)


def partition_error(bootstrap: str, topic: str, timeout: float = 60.0) -> str:
    """What a fresh consumer gets: the first partition error (records would fail the test)."""
    c = consumer(bootstrap, topic)
    got, errors = [], []
    try:
        wait_for(lambda: poll_into(c, got, errors, 0.3) or errors or got, timeout, interval=0,
                 what=f"an answer for {topic} at {bootstrap}")
    finally:
        c.close()
    assert got == [], f"{len(got)} records delivered"
    return str(errors[0][1])


def test_kek_shred_everywhere_with_one_command(broker, edge, logs, tmp_path):
    """`straitctl kek shred` once: both brokers (following the control plane) shred the KEK in their realm
    (Vault: key deleted; AWS: disabled, deletion scheduled) and refuse it; both edges stop decrypting once
    their cached DEK is older than dek.cache_ttl."""
    from lib.control import ControlPlane
    # One control plane for the fleet; each site's broker keeps its own site's identity, given the
    # kms-broker role by an AccessRule (the control plane's own domain implies it only for its own IDs).
    rules = tmp_path / "access-rules.yaml"
    rules.write_text(json.dumps([{"name": "site-kms-brokers", "role": "kms_broker",
                                  "identities": [f"spiffe://{EAST}/kms-broker/*", f"spiffe://{WEST}/kms-broker/*"]}]))
    control = ControlPlane(tmp_path / "control", logs, extra_args=("--access-rules", str(rules))).start()
    s = Sites(broker, edge, logs, tmp_path, control=control)
    try:
        ttl = {"cache_ttl": "3s"}
        east = s.east_edge(dek=ttl)
        create_topic(east.bootstrap, s.topic)
        sent = workload(10, big=False)
        produce_ok_confluent(east.bootstrap, s.topic, sent)
        wait_for(lambda: pending(east) == (0.0, 0.0), 60, what="the DEK wrapped for aws-west")
        west_topic = copy_to_west(s, "reproduce", s.topic, len(sent))
        west = s.west_edge(dek=ttl)
        assert_plaintext(read(west.bootstrap, west_topic, len(sent), timeout=60), sent)
        assert_plaintext(read(east.bootstrap, s.topic, len(sent)), sent)
        for e in (east, west):
            e.expect_error(r"denied|PERMISSION_DENIED|shredded")

        out = control.ctl("kek", "shred", s.kek, "--reason", "test: customer erased", check=True).stdout
        assert f"{s.kek} is shredded in every realm" in out, out
        wait_for(lambda: s.bao.api("GET", f"/v1/transit/keys/{s.kek}")[0] == 404, 30,
                 what="the Vault key deleted by east's broker")
        kms = s.moto.kms_client()
        wait_for(lambda: kms.describe_key(KeyId=f"alias/{s.kek}")["KeyMetadata"]["KeyState"] == "PendingDeletion",
                 30, what="the AWS key disabled and scheduled for deletion by west's broker")
        reported = ["kms-broker east: vault-east shredded", "kms-broker west: aws-west shredded"]
        wait_for(lambda: all(line in control.ctl("kek", "shreds").stdout for line in reported), 30,
                 what="both brokers reporting the shred in their heartbeat")
        # Within the cache bound, neither site decrypts any more: refused, never plaintext.
        for e, topic in ((west, west_topic), (east, s.topic)):
            wait_for(lambda: "TOPIC_AUTHORIZATION_FAILED" in partition_error(e.bootstrap, topic, 20), 30,
                     what=f"{topic} refused at {e.bootstrap} after the shred")
        for b in (s.east_broker, s.west_broker):
            assert "strait::audit" in b.log() and s.kek in b.log(), "the shred audited"
        # A shred is irreversible.
        r = control.ctl("delete", "KekShred", s.kek)
        assert r.returncode != 0 and "irreversible" in r.stderr, r.stderr
    finally:
        s.stop()
        control.stop()


# ---- kms-broker to kms-broker through the mesh (issue 13 item 2) -----------------------------------------

EAST_KMS_NAME, WEST_KMS_NAME = "kms.east.example", "kms.west.example"
EAST_EDGE_ID, WEST_EDGE_ID = f"spiffe://{EAST}/edge/east", f"spiffe://{WEST}/edge/west"
EAST_BROKER_ID, WEST_BROKER_ID = f"spiffe://{EAST}/kms-broker/east", f"spiffe://{WEST}/kms-broker/west"
# The forwards listen on another loopback address than the brokers' certificates name (127.0.0.1): a broker
# dialing one is verified only through `server_name`, the real remote identity.
FORWARD_HOST = "127.0.0.2"


def mesh_broker_entry(name: str, forward_port: int, server_name: str, ca, cert, key, backend: str) -> dict:
    """A `broker:` backend reaching the other site's broker through this site's edge forward."""
    return {"name": name, "broker": {"endpoints": [f"https://{FORWARD_HOST}:{forward_port}"], "ca": str(ca),
                                     "cert": str(cert), "key": str(key), "backend": backend,
                                     "server_name": server_name},
            "retry": {"attempts": 1, "timeout": "5s"}}


def edge_mesh(pki: Pki, me: str, peer_name: str, peer_id: str, peer_ca, service: str, service_port: int,
              forward: tuple[int, str], listen: int | None = None, dial: int | None = None) -> dict:
    """`mesh:` of one site's edge: its kms-broker exported as `service` to the peer, a forward to the peer's."""
    peer = {"name": peer_name, "spiffe_id": peer_id, "export_services": [service]}
    if dial:
        peer["address"] = f"127.0.0.1:{dial}"
    mesh = {"identity": {"cert": str(pki.pem(f"{me}-edge")), "key": str(pki.key(f"{me}-edge"))},
            "trust_bundles": [{"trust_domain": peer_id.split("/")[2], "pem": str(peer_ca)}],
            "peers": [peer],
            "services": [{"name": service, "address": f"127.0.0.1:{service_port}"}],
            "forwards": [{"listen": f"{FORWARD_HOST}:{forward[0]}", "peer": peer_name, "service": forward[1]}]}
    if listen:
        mesh["listen"] = f"127.0.0.1:{listen}"
    return mesh


def test_west_broker_reaches_easts_broker_only_through_the_mesh(sites):
    """Each site's kms-broker reaches the other's only through its edge's forward → tunnel → the other edge →
    the exported broker; TLS between the brokers stays end to end, verified by `server_name`.

    Remote wrap (east's broker asking west's for aws-west) fails while west's edge, hence the tunnel, is not
    up: produce goes on, the missing-wrap count is 1 DEK; once the tunnel is up it returns to zero. Remote
    unwrap (west's broker asking east's for vault-east) decrypts at west records that have no aws-west wrap,
    with east's OpenBao reachable by east's broker alone."""
    p = sites.pki
    # Each site's broker: its own KMS directly, the other site's realm through its edge's forward.
    p.leaf("east-kms", ca="east-ca", dns=[EAST_KMS_NAME], ips=["127.0.0.1"], uris=[EAST_BROKER_ID])
    p.leaf("west-kms", ca="west-ca", dns=[WEST_KMS_NAME], ips=["127.0.0.1"], uris=[WEST_BROKER_ID])
    east_forward, west_forward, east_mesh = free_port(), free_port(), free_port()
    east_broker = KmsBroker(
        sites.logs, "east-mesh", EAST, p.pem("east-kms"), p.key("east-kms"), p.pem("east-ca"),
        kms=[sites.bao.kms_entry("vault-east"),
             mesh_broker_entry("aws-west", east_forward, WEST_KMS_NAME, p.pem("west-ca"), p.pem("east-kms"),
                               p.key("east-kms"), backend="aws-west")],
        trust={WEST: p.pem("west-ca")},
        callers=[f"spiffe://{EAST}/edge/*", WEST_BROKER_ID],
        grants=[{"callers": [f"spiffe://{EAST}/edge/*"], "kms": ["*"], "operations": ALL_OPS},
                {"callers": [WEST_BROKER_ID], "kms": ["vault-east"], "keks": ["kek-*"], "operations": ["unwrap"]}],
    ).start()
    west_broker = KmsBroker(
        sites.logs, "west-mesh", WEST, p.pem("west-kms"), p.key("west-kms"), p.pem("west-ca"),
        kms=[sites.moto.kms_entry("aws-west"),
             mesh_broker_entry("vault-east", west_forward, EAST_KMS_NAME, p.pem("east-ca"), p.pem("west-kms"),
                               p.key("west-kms"), backend="vault-east")],
        trust={EAST: p.pem("east-ca")},
        callers=[f"spiffe://{WEST}/edge/*", EAST_BROKER_ID],
        grants=[{"callers": [f"spiffe://{WEST}/edge/*"], "kms": ["*"], "operations": ALL_OPS},
                {"callers": [EAST_BROKER_ID], "kms": ["aws-west"], "operations": ["wrap"]}],
    ).start()
    try:
        run_brokers_through_the_mesh(sites, east_broker, west_broker, east_forward, west_forward, east_mesh)
    finally:
        east_broker.stop()
        west_broker.stop()


def run_brokers_through_the_mesh(sites, east_broker, west_broker, east_forward, west_forward, east_mesh):
    p = sites.pki
    legacy = unique("legacy-orders")
    sites.bao.create_key(f"kek-{legacy}")
    # East's edge: everything through east's broker; its mesh exports that broker to west.
    east_kms = [east_broker.client_entry(realm, p.pem("east-ca"), p.pem("east-edge"), p.key("east-edge"),
                                         backend=realm, retry={"attempts": 1, "timeout": "5s"})
                for realm in ("vault-east", "aws-west")]
    rules = [{"topic": "secret-*", "kms": "vault-east", "kek": "kek-$(topic)",
              "also_wrap_for": [{"kms": "aws-west", "kek": "alias/kek-$(topic)"}]},
             {"topic": "legacy-*", "kms": "vault-east", "kek": "kek-$(topic)"}]
    east = sites.edge_factory(
        [VirtualCluster("orders", sites.east_kafka.bootstrap_servers, extra={"encryption": {"rules": rules}})],
        extra={"kms": east_kms,
               "mesh": edge_mesh(p, "east", "edge-west", WEST_EDGE_ID, p.pem("west-ca"), "kms-east", east_broker.port,
                                 (east_forward, "kms-west"), listen=east_mesh)})
    east.expect_error(r"aws-west|kms-broker|transport error|connect")
    create_topic(east.bootstrap, sites.topic)
    create_topic(east.bootstrap, legacy)
    sent = workload(12, big=False)
    produce_ok_confluent(east.bootstrap, sites.topic, sent, **{"enable.idempotence": True, "acks": "all"})
    legacy_sent = workload(8, big=False)
    produce_ok_confluent(east.bootstrap, legacy, legacy_sent)
    # No west edge yet, so no tunnel: east's forward closes east broker's connections at once.
    values = len([s for s in sent if s.value is not None])
    wait_for(lambda: pending(east) == (1.0, float(values)), 30,
             what=f"1 DEK and {values} records missing their aws-west wrap (got {pending(east)})")
    assert east.metric("strait_mesh_service_streams", peer="edge-west", service="kms-west", outcome="no_tunnel") >= 1

    # West's edge comes up and dials east: the tunnel carries both brokers' gRPC.
    west_mesh = sites.edge_factory(
        [VirtualCluster("plain", sites.west_kafka.bootstrap_servers)],
        extra={"mesh": edge_mesh(p, "west", "edge-east", EAST_EDGE_ID, p.pem("east-ca"), "kms-west",
                                 west_broker.port, (west_forward, "kms-east"), dial=east_mesh)})
    wait_for(lambda: pending(east) == (0.0, 0.0), 90,
             what=f"the aws-west wrap made through the mesh once the tunnel is up ({pending(east)})")
    assert east.metric("strait_mesh_service_streams", peer="edge-west", service="kms-west", outcome="forwarded") >= 1
    assert west_mesh.metric("strait_mesh_service_streams", peer="edge-east", service="kms-west", outcome="served") >= 1
    assert west_mesh.metric("strait_mesh_service_bytes", peer="edge-east", service="kms-west",
                            direction="from_service") > 0
    assert f"caller={EAST_BROKER_ID}" in west_broker.log() and "wrap" in west_broker.log()

    # At west: a fresh edge (cold caches) knows only west's broker. east.secret-* decrypts from the aws-west
    # wraps in the keys topic; east.legacy-* has none, so west's broker asks east's through the mesh.
    west_topic = copy_to_west(sites, "reproduce", sites.topic, len(sent))
    copy_topic(sites.east_kafka.bootstrap, legacy, sites.west_kafka.bootstrap, f"east.{legacy}")
    west_kms = [west_broker.client_entry(realm, p.pem("west-ca"), p.pem("west-edge"), p.key("west-edge"),
                                         backend=realm, retry={"attempts": 1, "timeout": "10s"})
                for realm in ("aws-west", "vault-east")]
    west_rules = [{"topic": pattern, "kms": "aws-west", "kek": "alias/kek-$(topic)"}
                  for pattern in ("east.secret-*", "east.legacy-*")]
    west = sites.edge_factory(
        [VirtualCluster("orders", sites.west_kafka.bootstrap_servers,
                        extra={"encryption": {"rules": west_rules, "keys_topic": {"also_read": [f"east.{KEYS}"]}}})],
        extra={"kms": west_kms})
    forwarded_before = west_mesh.metric("strait_mesh_service_streams", peer="edge-east", service="kms-east",
                                        outcome="forwarded")
    assert_plaintext(read(west.bootstrap, west_topic, len(sent), timeout=90), sent)
    assert_plaintext(read(west.bootstrap, f"east.{legacy}", len(legacy_sent), timeout=90), legacy_sent)
    # The legacy DEK: one remote unwrap, made by west's broker at east's broker through the mesh.
    assert west.metric("strait_kms_operations", kms="vault-east", operation="unwrap_dek", outcome="success") == 1
    assert west.metric("strait_kms_operations", kms="aws-west", operation="unwrap_dek", outcome="success") == 1
    assert west_mesh.metric("strait_mesh_service_streams", peer="edge-east", service="kms-east",
                            outcome="forwarded") > forwarded_before
    assert east.metric("strait_mesh_service_streams", peer="edge-west", service="kms-east", outcome="served") >= 1
    wait_for(lambda: f"caller={WEST_BROKER_ID}" in east_broker.log() and "unwrap" in east_broker.log(), 10,
             what="east's broker audited west's broker's unwrap")
    # West knows east's broker and KMS by no address: only the forward, and east's name for the certificate.
    west_text = west_broker.config_path.read_text() + west.config_path.read_text() + west_mesh.config_path.read_text()
    assert f":{east_broker.port}" not in west_text and sites.bao.url not in west_text
    assert f"https://{FORWARD_HOST}:{west_forward}" in west_broker.config_path.read_text()
    for e in (west, west_mesh):
        assert e.unexpected_errors() == []
