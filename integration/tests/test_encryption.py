"""Record encryption end to end: real Tansu, real OpenBao (Vault Transit), real moto (AWS KMS), the real
strait-edge binary, real confluent-kafka, kafka-python and Java (kafka-clients) clients.

What the broker stores is read DIRECTLY from Tansu (bypassing the edge) to prove it is ciphertext; what
clients get through the edge (and through a second, freshly started edge with a cold DEK cache) must be
the exact plaintext. Failure scenarios (missing KEK, KMS outage, KEK rotation, tampered record) check that
ciphertext is never handed out as plaintext and plaintext never reaches an encrypted topic.

Run: ~/.cache/strait/venv/bin/python -m pytest integration/tests/test_encryption.py -q -p no:cacheprovider
Binaries: STRAIT_EDGE_BIN, STRAIT_TANSU_BIN, STRAIT_BAO_BIN (bao), STRAIT_MOTO_BIN (moto_server); the KMS ones
default to PATH, then ~/.cache/strait/venv/bin (lib/kms.py). A missing binary fails the test with the paths tried.
"""

import copy
import os
import struct
import time

import pytest

from lib.clients import unique
from lib.edge import VirtualCluster
from lib.kms import AWS_DUMMY_ENV, ROOT_TOKEN, Moto, OpenBao
from lib.wait import wait_for

MARKER = "strait.enc"
FORMAT_VERSION = 2  # what the edge writes (FORMAT.md); version 1 is still read
MIB = 1 << 20
BIG_FETCH = {"fetch.max.bytes": 8 * MIB, "max.partition.fetch.bytes": 8 * MIB,
             "receive.message.max.bytes": 16 * MIB}
# Tansu answers Produce v0-11; every client here negotiates v3+ (record batches), which the filter needs.
CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def private_bao(logs):
    """An OpenBao only this test uses (the outage scenario freezes it)."""
    b = OpenBao(logs)
    try:
        yield b.start()
    finally:
        b.stop()


@pytest.fixture
def moto(logs):
    m = Moto(logs)
    try:
        yield m.start()
    finally:
        m.stop()


@pytest.fixture(autouse=True)
def kms_env(monkeypatch):
    """The edge inherits this process's environment: Vault token and dummy AWS credentials for moto."""
    monkeypatch.setenv("VAULT_TOKEN", ROOT_TOKEN)
    for k, v in AWS_DUMMY_ENV.items():
        monkeypatch.setenv(k, v)


# ---------------------------------------------------------------- helpers

def enc_cluster(broker, rules, name="enc", **encryption) -> VirtualCluster:
    return VirtualCluster(name=name, upstream=broker.bootstrap_servers,
                          extra={"encryption": {"rules": rules, **encryption}})


def cold_copy(vc: VirtualCluster) -> VirtualCluster:
    """Same cluster config on fresh ports, for a second edge process (its own, empty DEK cache)."""
    return VirtualCluster(name=vc.name, upstream=list(vc.upstream), extra=copy.deepcopy(vc.extra))


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=30)[topic].result(timeout=30)

    def visible():
        t = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        return t is not None and t.error is None and len(t.partitions) == partitions
    wait_for(visible, 30, what=f"topic {topic} in metadata")


class Sent:
    """A record as produced: key, value, headers, explicit CreateTime timestamp, partition."""

    def __init__(self, key, value, headers, ts, partition=0):
        self.key, self.value, self.headers, self.ts, self.partition = key, value, headers, ts, partition


class Got:
    def __init__(self, msg):
        self.key = msg.key()
        self.value = msg.value()
        self.headers = list(msg.headers() or [])
        self.ts = msg.timestamp()[1]
        self.partition = msg.partition()
        self.offset = msg.offset()


def workload(n: int = 24, big: bool = True) -> list[Sent]:
    """Compressible and random values, tombstones, binary/duplicate/empty headers, one 1 MiB value."""
    base_ts = int(time.time() * 1000) - 3_600_000  # an hour ago: clearly not a broker-assigned time
    out = []
    for i in range(n):
        key = b"key-%d" % i if i % 6 else None
        if i % 7 == 3:
            value = None  # tombstone
            key = b"deleted-%d" % i
        elif i % 2:
            value = os.urandom(100 + 37 * i)
        else:
            value = (b"plaintext record %d, readable words " % i) * 12
        headers = []
        if i % 3 == 0:
            headers = [("trace", b"t-%d" % i), ("bin", bytes(range(0, 256, 9))), ("trace", b"dup"), ("empty", b"")]
        out.append(Sent(key, value, headers, base_ts + 1000 * i))
    if big:
        out.append(Sent(b"big", os.urandom(MIB), [("size", b"1MiB")], base_ts + 1000 * n))
    return out


def produce_confluent(bootstrap: str, topic: str, records: list[Sent], timeout: float = 60.0, **conf) -> list:
    """Produce and wait for every delivery report; returns the delivery errors (None for success) in order."""
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.timeout.ms": int(timeout * 1000),
                  "message.max.bytes": 4 * MIB, **conf})
    results: list = [False] * len(records)
    offsets: list = [None] * len(records)

    def cb(i):
        def done(err, msg):
            results[i] = err
            offsets[i] = None if err else (msg.partition(), msg.offset())
        return done

    for i, r in enumerate(records):
        kw = {"key": r.key, "value": r.value, "timestamp": r.ts, "partition": r.partition, "on_delivery": cb(i)}
        if r.headers:
            kw["headers"] = r.headers
        p.produce(topic, **kw)
        p.poll(0)
    assert p.flush(timeout + 10) == 0, "records still queued after flush"
    return results, offsets


def produce_ok_confluent(bootstrap, topic, records, **conf) -> list:
    errors, offsets = produce_confluent(bootstrap, topic, records, **conf)
    bad = [e for e in errors if e is not None]
    assert not bad, f"{len(bad)} delivery errors, first: {bad[0]}"
    return offsets


def produce_ok_kafka_python(bootstrap, topic, records, **conf) -> list:
    from kafka import KafkaProducer
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, request_timeout_ms=30000,
                      max_request_size=4 * MIB, **conf)
    try:
        futures = [p.send(topic, key=r.key, value=r.value, headers=r.headers or None, partition=r.partition,
                          timestamp_ms=r.ts) for r in records]
        p.flush(timeout=60)
        return [(md.partition, md.offset) for md in (f.get(timeout=60) for f in futures)]
    finally:
        p.close(timeout=10)


def produce_ok_java(bootstrap, topic, records, **conf) -> list:
    """The Java client (lib/java_client.py): explicit partition and CreateTime per record, like the others."""
    from lib.clients import Rec
    from lib.java_client import JavaClient
    p = JavaClient(bootstrap).producer(**{"linger.ms": 5, "max.request.size": 4 * MIB,
                                          "delivery.timeout.ms": 60000, **conf})
    try:
        delivered = p.send_all(topic, [Rec(r.key, r.value, r.headers, r.partition, timestamp=r.ts) for r in records],
                               timeout=60)
        return [(d.partition, d.offset) for d in delivered]
    finally:
        p.close()


# The Java consumer's names for BIG_FETCH (it has no receive.message.max.bytes: fetch.max.bytes bounds a response).
JAVA_BIG_FETCH = {"fetch.max.bytes": 8 * MIB, "max.partition.fetch.bytes": 8 * MIB}


def consumer(bootstrap: str, topic: str, partitions=(0,), **conf):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("g"), "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", **BIG_FETCH, **conf})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    return c


def poll_into(c, out: list, errors: list, seconds: float) -> None:
    """Poll for `seconds`, appending records to `out` and error events to `errors`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m = c.poll(0.1)
        if m is None:
            continue
        if m.error():
            errors.append((m.partition(), m.error()))
            continue
        out.append(Got(m))


def read(bootstrap: str, topic: str, n: int, partitions=(0,), timeout: float = 60.0) -> list[Got]:
    """Exactly the first `n` records (by offset) of the partitions; more would be a failure."""
    c = consumer(bootstrap, topic, partitions)
    out: list[Got] = []
    errors: list = []
    try:
        wait_for(lambda: poll_into(c, out, errors, 0.2) or len(out) >= n, timeout,
                 interval=0, what=f"{n} records of {topic} from {bootstrap} (got {len(out)}, errors {errors[:3]})")
        poll_into(c, out, errors, 0.5)  # anything beyond n shows up here
    finally:
        c.close()
    assert len(out) == n, f"expected {n} records, got {len(out)}"
    return sorted(out, key=lambda g: (g.partition, g.offset))


def end_offset(bootstrap: str, topic: str, partition: int = 0) -> int:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("w")})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
    finally:
        c.close()


def parse_cipher(value: bytes) -> dict:
    """Split an encrypted value per FORMAT.md (the layout is the same in versions 1 and 2)."""
    assert value[0] == FORMAT_VERSION, f"format version {value[0]}"
    (k,) = struct.unpack(">H", value[1:3])
    ref = value[3:3 + k]
    kms_len = ref[0]
    kms = ref[1:1 + kms_len].decode()
    (key_len,) = struct.unpack(">H", ref[1 + kms_len:3 + kms_len])
    key_id = ref[3 + kms_len:3 + kms_len + key_len].decode()
    ver_len = ref[3 + kms_len + key_len]
    version = ref[4 + kms_len + key_len:4 + kms_len + key_len + ver_len].decode()
    (w,) = struct.unpack(">H", value[3 + k:5 + k])
    wrapped = value[5 + k:5 + k + w]
    nonce = value[5 + k + w:17 + k + w]
    ciphertext = value[17 + k + w:]
    return {"kms": kms, "key_id": key_id, "key_version": version, "wrapped": wrapped, "nonce": nonce,
            "ciphertext": ciphertext}


def assert_stored_encrypted(raw: list[Got], sent: list[Sent], kms: str) -> list[dict]:
    """What Tansu holds: ciphertext for every non-null value, everything else as produced."""
    assert len(raw) == len(sent)
    parsed = []
    nonces = set()
    for r, s in zip(raw, sent):
        assert r.key == s.key, f"offset {r.offset}: key changed"
        assert r.ts == s.ts, f"offset {r.offset}: timestamp {r.ts} != {s.ts}"
        if s.value is None:
            assert r.value is None, f"offset {r.offset}: tombstone not null at the broker"
            assert r.headers == s.headers, f"offset {r.offset}: tombstone headers changed"
            continue
        assert r.value != s.value, f"offset {r.offset}: PLAINTEXT stored at the broker"
        assert s.value[:32] not in r.value, f"offset {r.offset}: plaintext bytes visible in the stored value"
        assert r.headers[:-1] == s.headers, f"offset {r.offset}: user headers changed: {r.headers}"
        assert r.headers[-1] == (MARKER, bytes([FORMAT_VERSION, 1])), f"offset {r.offset}: marker header {r.headers[-1:]}"
        p = parse_cipher(r.value)
        assert p["kms"] == kms
        assert len(p["ciphertext"]) == len(s.value) + 16, "AES-GCM ciphertext + tag length"
        assert p["nonce"] not in nonces, "nonce reused"
        nonces.add(p["nonce"])
        parsed.append(p)
    return parsed


def assert_plaintext(got: list[Got], sent: list[Sent]) -> None:
    assert len(got) == len(sent)
    for g, s in zip(got, sent):
        assert g.value == s.value, f"offset {g.offset}: value differs (len {len(g.value or b'')} vs {len(s.value or b'')})"
        assert g.key == s.key, f"offset {g.offset}: key"
        assert g.headers == s.headers, f"offset {g.offset}: headers {g.headers} != {s.headers}"
        assert g.ts == s.ts, f"offset {g.offset}: timestamp"


# vaultrs and rustify log every failed HTTP call to Vault at ERROR (their own targets, not Strait's); during
# a deliberate KMS outage those lines are the expected behaviour of the dependency, not an edge failure.
VAULT_CLIENT_ERRORS = r'"target":"(rustify::[a-z:]+|vaultrs::api)"'


def start_enc_edge(edge, vc: VirtualCluster, kms_list: list[dict]):
    return edge([vc], extra={"kms": kms_list})


# ---------------------------------------------------------------- 1. Vault round trip, both libraries

@pytest.mark.parametrize("producer_lib,codec",
                         [(lib, c) for lib in ("confluent", "kafka-python", "java") for c in CODECS])
def test_vault_round_trip_ciphertext_at_rest(broker, edge, bao, producer_lib, codec):
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}])
    e = start_enc_edge(edge, vc, [bao.kms_entry()])
    topic = unique("secret-rt")
    create_topic(e.bootstrap, topic)
    sent = workload()

    if producer_lib == "confluent":
        offsets = produce_ok_confluent(e.bootstrap, topic, sent, **{
            "enable.idempotence": True, "acks": "all", "compression.type": codec})
    elif producer_lib == "java":
        offsets = produce_ok_java(e.bootstrap, topic, sent, **{
            "enable.idempotence": True, "acks": "all", "compression.type": codec})
    else:
        offsets = produce_ok_kafka_python(e.bootstrap, topic, sent, enable_idempotence=True, acks="all",
                                          compression_type=None if codec == "none" else codec)
    # Idempotent, in order, no duplicates or gaps.
    assert offsets == [(0, i) for i in range(len(sent))]

    raw = read(t.bootstrap, topic, len(sent))
    parsed = assert_stored_encrypted(raw, sent, kms="vault")
    assert all(p["key_id"] == kek and p["wrapped"].startswith(b"vault:v1:") and p["key_version"] == "1"
               for p in parsed), {(p["key_id"], p["key_version"], p["wrapped"][:9]) for p in parsed}

    assert_plaintext(read(e.bootstrap, topic, len(sent)), sent)
    assert e.metric("strait_encryption_encrypted_records") == len([s for s in sent if s.value is not None])

    cold = start_enc_edge(edge, cold_copy(vc), [bao.kms_entry()])
    assert_plaintext(read(cold.bootstrap, topic, len(sent)), sent)
    assert cold.metric("strait_encryption_dek_cache_misses") >= 1
    assert cold.metric("strait_encryption_kms_calls", operation="unwrap_dek") >= 1


# Regression: Tansu 0.6.0 ends its FetchResponse v12 with top-level tagged field 0 (NodeEndpoints, defined only
# for v16+); the edge, which decodes every Fetch response once a cluster has an encryption rule, used to reject
# it and close kafka-python's connections (fixed in main 6129063).
def test_kafka_python_consumer_reads_plaintext(broker, edge, bao):
    """kafka-python on the consuming side too (subscribe, group), after a confluent produce."""
    from kafka import KafkaConsumer
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}])
    e = start_enc_edge(edge, vc, [bao.kms_entry()])
    topic = unique("secret-kp")
    create_topic(e.bootstrap, topic)
    sent = workload(big=False)
    produce_ok_confluent(e.bootstrap, topic, sent, **{"compression.type": "lz4"})
    c = KafkaConsumer(topic, bootstrap_servers=e.bootstrap, group_id=unique("g"), auto_offset_reset="earliest",
                      enable_auto_commit=False, consumer_timeout_ms=15000)
    try:
        got = [m for _, m in zip(range(len(sent)), c)]
    finally:
        c.close()
    assert [m.value for m in got] == [s.value for s in sent]
    assert [m.key for m in got] == [s.key for s in sent]
    assert [list(m.headers or []) for m in got] == [s.headers for s in sent]
    assert [m.timestamp for m in got] == [s.ts for s in sent]


def test_java_consumer_reads_plaintext(broker, edge, bao):
    """The Java client on the consuming side (subscribe, group; its Fetch names topics by id), after a
    confluent produce, the 1 MiB record included."""
    from lib.java_client import JavaClient
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}])
    e = start_enc_edge(edge, vc, [bao.kms_entry()])
    topic = unique("secret-jv")
    create_topic(e.bootstrap, topic)
    sent = workload()
    produce_ok_confluent(e.bootstrap, topic, sent, **{"compression.type": "lz4"})
    got = JavaClient(e.bootstrap).consumer(topic, **JAVA_BIG_FETCH).take(len(sent), timeout=60, settle=0.5)
    assert len(got) == len(sent)
    assert [r.value for r in got] == [s.value for s in sent]
    assert [r.key for r in got] == [s.key for s in sent]
    assert [r.headers for r in got] == [s.headers for s in sent]
    assert [r.timestamp for r in got] == [s.ts for s in sent]


# ---------------------------------------------------------------- 2. AWS KMS (moto)

def test_aws_kms_round_trip(broker, edge, moto):
    t = broker()
    alias = unique("kek-aws")
    key_id = moto.create_key(alias)
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "aws", "kek": alias}])
    e = start_enc_edge(edge, vc, [moto.kms_entry()])
    topic = unique("secret-aws")
    create_topic(e.bootstrap, topic)
    sent = workload()
    produce_ok_confluent(e.bootstrap, topic, sent, **{"enable.idempotence": True, "compression.type": "zstd"})

    parsed = assert_stored_encrypted(read(t.bootstrap, topic, len(sent)), sent, kms="aws")
    for p in parsed:
        assert key_id in p["key_id"] or p["key_id"] == f"alias/{alias}", p["key_id"]
        assert not p["wrapped"].startswith(b"vault:")
        assert len(p["wrapped"]) > 32  # a CiphertextBlob, not a bare 32-byte key

    assert_plaintext(read(e.bootstrap, topic, len(sent)), sent)
    cold = start_enc_edge(edge, cold_copy(vc), [moto.kms_entry()])
    assert_plaintext(read(cold.bootstrap, topic, len(sent)), sent)
    assert cold.metric("strait_kms_operations", kms="aws", operation="unwrap_dek", outcome="success") >= 1
    assert cold.metric("strait_encryption_kms_calls", operation="unwrap_dek") >= 1


# ---------------------------------------------------------------- 3. unencrypted topic beside an encrypted one

def test_unencrypted_topic_beside_encrypted(broker, edge, bao):
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}])
    e = start_enc_edge(edge, vc, [bao.kms_entry()])
    secret, plain = unique("secret-side"), unique("plain-side")
    for topic in (secret, plain):
        create_topic(e.bootstrap, topic)
    sent = workload(n=12, big=False)
    produce_ok_confluent(e.bootstrap, secret, sent, **{"compression.type": "snappy"})
    encrypted_before = e.metric("strait_encryption_encrypted_records")
    produce_ok_confluent(e.bootstrap, plain, sent, **{"compression.type": "snappy"})
    assert e.metric("strait_encryption_encrypted_records") == encrypted_before

    assert_stored_encrypted(read(t.bootstrap, secret, len(sent)), sent, kms="vault")
    plain_raw = read(t.bootstrap, plain, len(sent))
    assert_plaintext(plain_raw, sent)  # stored as produced, no marker header
    assert all(MARKER not in [k for k, _ in r.headers] for r in plain_raw)

    assert_plaintext(read(e.bootstrap, secret, len(sent)), sent)
    assert_plaintext(read(e.bootstrap, plain, len(sent)), sent)


# ---------------------------------------------------------------- 4. missing KEK: reject / passthrough

def test_missing_kek_reject_and_passthrough(broker, edge, bao):
    from confluent_kafka import KafkaError
    t = broker()
    missing = unique("kek-missing")  # never created in Vault
    rule = [{"topic": "secret-*", "kms": "vault", "kek": missing}]
    strict = enc_cluster(t, rule, name="strict", on_missing_key="reject")
    lax = enc_cluster(t, rule, name="lax", on_missing_key="passthrough")
    e = edge([strict, lax], extra={"kms": [bao.kms_entry()]})
    # vaultrs/rustify log every non-2xx answer at ERROR, including the 404 for the missing key (see report).
    e.expect_error(r'"target":"(rustify::client|rustify::endpoint|vaultrs::api)".*' + missing)
    e.expect_error(r'"(Server returned error|The Vault server returned an error \(status code 404\))".*' + missing)
    topic_r, topic_p = unique("secret-rej"), unique("secret-pass")
    create_topic(t.bootstrap, topic_r)
    create_topic(t.bootstrap, topic_p)
    sent = workload(n=6, big=False)

    errors, _ = produce_confluent(strict.bootstrap, topic_r, sent, timeout=20)
    codes = {err.code() if err else None for err, s in zip(errors, sent)}
    assert codes == {KafkaError.POLICY_VIOLATION}, f"delivery results: {errors}"
    assert end_offset(t.bootstrap, topic_r) == 0, "a rejected produce reached the broker"
    assert e.metric("strait_encryption_partition_errors", direction="produce", error="missing_key") >= 1

    produce_ok_confluent(lax.bootstrap, topic_p, sent)
    raw = read(t.bootstrap, topic_p, len(sent))
    assert_plaintext(raw, sent)
    assert e.metric("strait_encryption_passthrough_records") >= len([s for s in sent if s.value is not None])
    assert "on_missing_key = passthrough" in e.log_text()


# ---------------------------------------------------------------- 5. KMS outage

def test_a_filter_stalled_past_filter_timeout_closes_its_connection_then_the_client_recovers(
        broker, edge, private_bao):
    """`limits.filter_timeout`: a record whose DEK needs a KMS that stopped answering (frozen OpenBao,
    KMS call timeout far longer) holds its produce in the encryption filter; after filter_timeout the
    edge closes that connection (WARN, `connections_limited_total{reason="filter_timeout"}`) and
    nothing reaches the broker. Once the KMS answers again the same producer delivers, encrypted."""
    bao = private_bao
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    kms = [bao.kms_entry(retry={"attempts": 1, "timeout": "120s", "min_backoff": "100ms", "max_backoff": "200ms"})]
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}])
    e = edge([vc], extra={"kms": kms, "limits": {"filter_timeout": "2s"}})
    e.expect_error(VAULT_CLIENT_ERRORS)
    topic = unique("secret-stall")
    create_topic(e.bootstrap, topic)
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": e.bootstrap, "linger.ms": 0, "message.timeout.ms": 120000})
    errors: list = []
    bao.freeze()
    try:
        p.produce(topic, value=b"stalled", on_delivery=lambda err, msg: errors.append(err))
        p.poll(0)
        wait_for(lambda: e.metric("strait_connections_limited", virtual_cluster="enc", reason="filter_timeout") >= 1,
                 30, what="the stalled connection closed at filter_timeout")
        assert any("a filter did not finish within 2s" in line and "WARN" in line.upper()
                   for line in e.log_text().splitlines())
        assert end_offset(t.bootstrap, topic) == 0
    finally:
        bao.thaw()
    # librdkafka retries the request on a new connection; the KMS answers now.
    assert p.flush(60) == 0
    assert len(errors) == 1 and errors[0] is None, errors
    raw = read(t.bootstrap, topic, 1)
    assert raw[0].value != b"stalled" and b"stalled" not in (raw[0].value or b"")



def test_kms_outage_cached_deks_then_clean_errors_then_recovery(broker, edge, private_bao):
    bao = private_bao
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    kms = [bao.kms_entry(retry={"attempts": 2, "timeout": "1s", "min_backoff": "100ms", "max_backoff": "200ms"})]
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}])
    e = start_enc_edge(edge, vc, kms)
    e.expect_error(VAULT_CLIENT_ERRORS)
    topic = unique("secret-outage")
    create_topic(e.bootstrap, topic)
    before = workload(n=10, big=False)
    produce_ok_confluent(e.bootstrap, topic, before, **{"enable.idempotence": True})
    generated = e.metric("strait_encryption_deks_generated")

    try:
        bao.freeze()
        during = [Sent(b"during-%d" % i, b"written while the KMS is down %d" % i, [("h", b"%d" % i)],
                       before[-1].ts + 1000 * (i + 1)) for i in range(10)]
        produce_ok_confluent(e.bootstrap, topic, during, timeout=30, **{"enable.idempotence": True})
        assert e.metric("strait_encryption_deks_generated") == generated, "a DEK was generated with the KMS down"
        sent = before + during
        assert_stored_encrypted(read(t.bootstrap, topic, len(sent)), sent, kms="vault")
        # The edge that generated the DEK still decrypts from its cache.
        assert_plaintext(read(e.bootstrap, topic, len(sent)), sent)

        cold = start_enc_edge(edge, cold_copy(vc), kms)
        cold.expect_error(VAULT_CLIENT_ERRORS)
        c = consumer(cold.bootstrap, topic)
        got: list[Got] = []
        errs: list = []
        t0 = time.monotonic()
        try:
            def withheld():
                poll_into(c, got, errs, 0.2)
                return (cold.metric("strait_encryption_partition_errors", direction="fetch",
                                    error="kms_unavailable") >= 2
                        and "records withheld" in cold.log_text() and time.monotonic() - t0 > 4)
            wait_for(withheld, 40, interval=0, what="the cold edge to withhold records while the KMS is down")
            # KAFKA_STORAGE_ERROR is retriable: the client retries quietly, it neither fails nor gets data.
            assert [err for _, err in errs if not err.retriable() and err.code() >= 0] == []
            assert got == [], f"{len(got)} records delivered with the KMS down: {[g.value[:20] for g in got]}"

            bao.thaw()
            wait_for(lambda: poll_into(c, got, errs, 0.2) or len(got) >= len(sent), 60, interval=0,
                     what=f"all {len(sent)} records after the KMS came back (got {len(got)})")
            poll_into(c, got, errs, 0.5)
        finally:
            c.close()
        assert_plaintext(sorted(got, key=lambda g: g.offset), sent)
        assert [g.offset for g in sorted(got, key=lambda g: g.offset)] == list(range(len(sent)))
    finally:
        bao.thaw()


# ---------------------------------------------------------------- 6. KEK rotation

def test_kek_rotation_new_deks_use_new_version(broker, edge, bao):
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    max_age = 2.0
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}], dek={"max_age": "2s"})
    e = start_enc_edge(edge, vc, [bao.kms_entry()])
    topic = unique("secret-rot")
    create_topic(e.bootstrap, topic)

    old = workload(n=8, big=False)
    produce_ok_confluent(e.bootstrap, topic, old)
    bao.rotate_key(kek)
    rotated_at = time.monotonic()
    assert bao.latest_version(kek) == 2
    # The DEK age limit is the contract: after rotation + max_age every new DEK is wrapped under v2.
    wait_for(lambda: time.monotonic() > rotated_at + max_age + 0.5, max_age + 5, what="the DEK age limit")
    new = [Sent(b"new-%d" % i, b"after rotation %d " % i * 10, [], old[-1].ts + 1000 * (i + 1)) for i in range(8)]
    produce_ok_confluent(e.bootstrap, topic, new)

    sent = old + new
    parsed = assert_stored_encrypted(read(t.bootstrap, topic, len(sent)), sent, kms="vault")
    n_old = len([s for s in old if s.value is not None])
    assert all(p["wrapped"].startswith(b"vault:v1:") and p["key_version"] == "1" for p in parsed[:n_old])
    assert all(p["wrapped"].startswith(b"vault:v2:") and p["key_version"] == "2" for p in parsed[n_old:]), \
        [(p["key_version"], p["wrapped"][:9]) for p in parsed[n_old:]]

    assert_plaintext(read(e.bootstrap, topic, len(sent)), sent)
    cold = start_enc_edge(edge, cold_copy(vc), [bao.kms_entry()])
    assert_plaintext(read(cold.bootstrap, topic, len(sent)), sent)


# ---------------------------------------------------------------- 7. tampered record

def test_tampered_record_never_delivered(broker, edge, bao):
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}])
    e = start_enc_edge(edge, vc, [bao.kms_entry()])
    topic = unique("secret-tamper")
    create_topic(e.bootstrap, topic, partitions=2)
    base = int(time.time() * 1000)
    good0 = [Sent(b"p0-%d" % i, b"partition zero record %d" % i, [("n", b"%d" % i)], base + i, 0) for i in range(3)]
    good1 = [Sent(b"p1-%d" % i, b"partition one record %d" % i, [("n", b"%d" % i)], base + i, 1) for i in range(3)]
    produce_ok_confluent(e.bootstrap, topic, good0 + good1)

    victim = read(t.bootstrap, topic, 3, partitions=(1,))[0]
    assert victim.headers[-1][0] == MARKER
    forged = bytearray(victim.value)
    forged[-17] ^= 0x01  # last ciphertext byte, just before the 16-byte tag
    forged = bytes(forged)
    produce_ok_confluent(t.bootstrap, topic, [Sent(b"tampered", forged, victim.headers, base + 10, 1)])
    assert end_offset(t.bootstrap, topic, 1) == 4

    c = consumer(e.bootstrap, topic, partitions=(0, 1))
    got: list[Got] = []
    errs: list = []
    t0 = time.monotonic()
    try:
        def settled():
            poll_into(c, got, errs, 0.2)
            return (len([g for g in got if g.partition == 0]) >= 3
                    and e.metric("strait_encryption_partition_errors", direction="fetch", error="tampered") >= 2
                    and time.monotonic() - t0 > 3)
        wait_for(settled, 40, interval=0, what="partition 0 delivered and partition 1 failed as tampered")
    finally:
        c.close()
    # The client saw the partition fail with CORRUPT_MESSAGE (2; librdkafka calls it "Invalid message").
    assert {(p, err.code()) for p, err in errs} == {(1, 2)}, [(p, err.str()) for p, err in errs]
    plaintexts = {s.value for s in good0 + good1}
    assert all(g.value in plaintexts for g in got), "something other than plaintext was delivered"
    assert not any(g.key == b"tampered" or g.value == forged or g.value == victim.value for g in got)
    assert sorted((g.partition, g.offset) for g in got if g.partition == 0) == [(0, 0), (0, 1), (0, 2)]
    # The partition holding the tampered record is failed as a whole: no record of it reaches the client.
    assert [g for g in got if g.partition == 1] == []
    log = e.log_text()
    assert "records withheld" in log and topic in log


# ---------------------------------------------------------------- injected marker / injected plaintext

def test_forged_marker_rejected_and_injected_plaintext_policy(broker, edge, bao):
    """A producer cannot smuggle "ciphertext" through the edge (marker header -> INVALID_RECORD, nothing stored);
    plaintext written behind the edge's back is passed (`on_plaintext_fetch: pass`) or the partition is failed
    with POLICY_VIOLATION (`reject`), never mixed up with decrypted data."""
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    rule = [{"topic": "secret-*", "kms": "vault", "kek": kek}]
    passing = enc_cluster(t, rule, name="passing", on_plaintext_fetch="pass")
    strict = enc_cluster(t, rule, name="strict", on_plaintext_fetch="reject")
    e = edge([passing, strict], extra={"kms": [bao.kms_entry()]})
    topic = unique("secret-inject")
    create_topic(t.bootstrap, topic)

    forged = [Sent(b"forged", b"\x01not really ciphertext", [(MARKER, b"\x01\x01")], int(time.time() * 1000))]
    errors, _ = produce_confluent(passing.bootstrap, topic, forged, timeout=20)
    assert [err.code() if err else None for err in errors] == [87], errors  # INVALID_RECORD
    assert end_offset(t.bootstrap, topic) == 0, "a record carrying a forged marker reached the broker"
    assert e.metric("strait_encryption_partition_errors", direction="produce", error="marker_injected") >= 1

    injected = [Sent(b"raw-%d" % i, b"written directly to the broker %d" % i, [], int(time.time() * 1000) + i)
                for i in range(3)]
    produce_ok_confluent(t.bootstrap, topic, injected)
    assert_plaintext(read(passing.bootstrap, topic, len(injected)), injected)

    c = consumer(strict.bootstrap, topic)
    got: list[Got] = []
    errs: list = []
    t0 = time.monotonic()
    try:
        def refused():
            poll_into(c, got, errs, 0.2)
            return (e.metric("strait_encryption_partition_errors", direction="fetch", error="plaintext") >= 2
                    and errs and time.monotonic() - t0 > 2)
        wait_for(refused, 30, interval=0, what="the strict cluster to refuse the injected plaintext")
    finally:
        c.close()
    assert got == [], f"plaintext delivered despite on_plaintext_fetch: reject: {[g.value for g in got]}"
    assert {(p, err.code()) for p, err in errs} == {(0, 44)}, [(p, err.str()) for p, err in errs]


# ---------------------------------------------------------------- metric names

def test_metric_names_as_documented(broker, edge, bao):
    """Regression: the edge once exported strait_strait_encryption_* / strait_strait_kms_* (double prefix)."""
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    vc = enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}])
    e = start_enc_edge(edge, vc, [bao.kms_entry()])
    topic = unique("secret-metrics")
    create_topic(e.bootstrap, topic)
    produce_ok_confluent(e.bootstrap, topic, workload(n=4, big=False))
    assert e.metric("strait_encryption_encrypted_records") == 3
    assert e.metric("strait_kms_operations", kms="vault", operation="generate_dek", outcome="success") == 1
    assert "strait_strait_" not in e.metrics_text()


def test_kafka_python_consumes_unencrypted_topic_beside_encrypted(broker, edge, bao):
    from kafka import KafkaConsumer
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    e = start_enc_edge(edge, enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}]), [bao.kms_entry()])
    plain = unique("plain-kp")
    create_topic(e.bootstrap, plain)
    sent = workload(n=6, big=False)
    produce_ok_confluent(e.bootstrap, plain, sent)
    c = KafkaConsumer(plain, bootstrap_servers=e.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=15000)
    try:
        got = [m.value for _, m in zip(range(len(sent)), c)]
    finally:
        c.close()
    assert got == [s.value for s in sent]


def test_java_consumes_unencrypted_topic_beside_encrypted(broker, edge, bao):
    from lib.java_client import JavaClient
    t = broker()
    kek = unique("kek")
    bao.create_key(kek)
    e = start_enc_edge(edge, enc_cluster(t, [{"topic": "secret-*", "kms": "vault", "kek": kek}]), [bao.kms_entry()])
    plain = unique("plain-jv")
    create_topic(e.bootstrap, plain)
    sent = workload(n=6, big=False)
    produce_ok_confluent(e.bootstrap, plain, sent)
    got = JavaClient(e.bootstrap).consumer(plain).take(len(sent), timeout=60, settle=0.5)
    assert [r.value for r in got] == [s.value for s in sent]
