"""The Java client driver itself (lib/java_client.py + integration/jvm), straight to a real Kafka broker:
what the edge scenarios rely on it for, checked without the edge in the way."""

import os

import pytest

from lib.clients import Rec, unique
from lib.java_client import JavaClient, JavaError, java_conf, java_driver
from lib.wait import wait_for

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


@pytest.fixture
def java(shared_kafka) -> JavaClient:
    # Always Kafka (transactions and KIP-848 groups need it), whatever STRAIT_BROKER says.
    return JavaClient(shared_kafka().bootstrap)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_headers_and_codec(java, codec):
    topic = unique(f"jv-{codec}")
    java.create_topic(topic)
    headers = [("trace", b"abc"), ("empty", b""), ("null", None), ("binary", bytes(range(256))), ("dup", b"1"),
               ("dup", b"2")]
    sent = [Rec(b"k%d" % i, (b"abc" * 100 if i % 2 else os.urandom(300)), headers) for i in range(40)]
    sent += [Rec(None, b"no-key"), Rec(b"tomb", None)]
    delivered = java.produce(topic, sent, **{"compression.type": codec, "acks": "all"})
    assert [r.offset for r in delivered] == list(range(len(sent)))
    got = java.consumer(topic).take(len(sent), timeout=60, settle=0.5)
    assert [(r.key, r.value, r.headers) for r in got] == [(r.key, r.value, r.headers or []) for r in sent]


def test_transactions_commit_abort_read_committed(java):
    topic, group = unique("jv-txn"), unique("jv-txn-g")
    java.create_topic(topic)
    p = java.producer(**{"transactional.id": unique("txid"), "enable.idempotence": True, "acks": "all"})
    try:
        p.init_transactions()
        p.begin_transaction()
        p.send_all(topic, [Rec(b"k", b"committed-%d" % i) for i in range(5)])
        p.commit_transaction()
        p.begin_transaction()
        p.send_all(topic, [Rec(b"k", b"aborted-%d" % i) for i in range(5)])
        p.abort_transaction()
        # Offsets committed for a group inside a transaction land only with its commit.
        p.begin_transaction()
        p.send_all(topic, [Rec(b"k", b"last-%d" % i) for i in range(2)])
        p.send_offsets_to_transaction({(topic, 0): 3}, group)
        p.commit_transaction()
    finally:
        p.close()

    committed = java.consumer(topic, **{"isolation.level": "read_committed"}).take(7, timeout=60, settle=1.0)
    assert [r.value for r in committed] == [b"committed-%d" % i for i in range(5)] + [b"last-0", b"last-1"]
    everything = java.consumer(topic, **{"isolation.level": "read_uncommitted"}).take(12, timeout=60, settle=1.0)
    assert sum(r.value.startswith(b"aborted-") for r in everything) == 5
    # The group resumes at the offset the transaction committed.
    resumed = java.consumer(topic, group, **{"isolation.level": "read_committed"}).take(1, timeout=60)
    assert resumed[0].offset == 3 and resumed[0].value == b"committed-3"


def test_kip848_consumer_group(java):
    topic, group = unique("jv-848"), unique("jv-848-g")
    java.create_topic(topic, partitions=4)
    conf = {"group.protocol": "consumer"}
    a, b = java.consumer(topic, group, **conf), java.consumer(topic, group, **conf)
    try:
        # Records only once the broker-side assignor has split the partitions: before that the first
        # member owns all four and may read what later moves to the second.
        def split():
            a.poll(0.2), b.poll(0.2)  # nothing to read yet; polling lets the members take their assignment
            mine, theirs = a.assignment(), b.assignment()
            return mine and theirs and not mine & theirs and len(mine | theirs) == 4
        wait_for(split, 60, interval=0, what="two KIP-848 members splitting 4 partitions")
        java.produce(topic, [Rec(b"key-%d" % i, b"v%d" % i) for i in range(40)])
        got_a, got_b = [], []

        def both_have_records():
            got_a.extend(a.poll(0.2))
            got_b.extend(b.poll(0.2))
            return len(got_a) + len(got_b) >= 40 and got_a and got_b
        wait_for(both_have_records, 60, interval=0, what="two KIP-848 members sharing 4 partitions")
        parts_a, parts_b = {r.partition for r in got_a}, {r.partition for r in got_b}
        assert not parts_a & parts_b, "a partition was delivered to both members"
        assert sorted(r.value for r in got_a + got_b) == sorted(b"v%d" % i for i in range(40))
        a.commit()
        b.commit()
    finally:
        a.close()
        b.close()
    java.produce(topic, [Rec(b"key-0", b"after")])
    resumed = java.consumer(topic, group, **conf).take(1, timeout=60, settle=1.0)
    assert [r.value for r in resumed] == [b"after"]


def test_errors_are_structured_and_bounded(java):
    topic = unique("jv-err")
    java.create_topic(topic)
    with pytest.raises(JavaError) as e:
        java.create_topic(topic)
    assert (e.value.kafka_error, e.value.kafka_code) == ("TOPIC_ALREADY_EXISTS", 36)
    with pytest.raises(JavaError) as e:
        java.producer(**{"no.such.setting": 1})
    assert e.value.cls == "org.apache.kafka.common.config.ConfigException"
    # Nothing listens there: an error well within the deadline, not a hang.
    dead = JavaClient("127.0.0.1:1")
    with pytest.raises(JavaError):
        dead.brokers()
    assert java_driver().alive()


def test_mtls_with_the_test_pki_pem_files(kafka, tmp_path):
    """confluent-style PEM paths (what scenarios pass) work: PEM trust store, inline PKCS#8 key store."""
    from lib.kafka import BrokerTls
    from lib.pki import standard_pki
    pki = standard_pki(tmp_path / "pki")
    k = kafka(name="kafka-mtls", tls=BrokerTls(pki.pem("server"), pki.key("server"), client_ca=pki.pem("ca")))
    bootstrap = k.ssl_bootstrap_servers[0]
    java = JavaClient(bootstrap, **pki.confluent_ssl("orders"))
    topic = unique("jv-mtls")
    java.create_topic(topic)
    java.produce(topic, [Rec(b"k", b"over-mtls")])
    assert [r.value for r in java.consumer(topic).take(1, timeout=60)] == [b"over-mtls"]
    # kafka-python's names for the same files.
    assert JavaClient(bootstrap, **pki.kafka_python_ssl("orders")).partitions(topic) == [0]
    # A certificate from another CA: refused, reported as a TLS failure, not a hang.
    with pytest.raises(JavaError) as e:
        JavaClient(bootstrap, **pki.confluent_ssl("rogue")).brokers()
    assert "Ssl" in e.value.cls or "SSL" in e.value.message, e.value


def test_conf_translation(tmp_path):
    key = tmp_path / "c.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n")
    cert = tmp_path / "c.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")
    conf = java_conf({"security.protocol": "SSL", "ssl.ca.location": "/ca.pem", "ssl.certificate.location": str(cert),
                      "ssl.key.location": str(key), "message.max.bytes": 1 << 22, "enable.idempotence": True,
                      "compression_type": None, "delivery_timeout_ms": 60000, "ssl_check_hostname": False,
                      "sasl.mechanisms": "SCRAM-SHA-256", "sasl.username": "u", "sasl.password": 'p"w'}, "producer")
    assert conf == {
        "security.protocol": "SSL", "ssl.truststore.type": "PEM", "ssl.truststore.location": "/ca.pem",
        "ssl.keystore.type": "PEM", "ssl.keystore.certificate.chain": cert.read_text(),
        "ssl.keystore.key": key.read_text(), "max.request.size": 1 << 22, "enable.idempotence": "true",
        "delivery.timeout.ms": 60000, "ssl.endpoint.identification.algorithm": "", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.jaas.config": 'org.apache.kafka.common.security.scram.ScramLoginModule required username="u" '
                            'password="p\\"w";'}
