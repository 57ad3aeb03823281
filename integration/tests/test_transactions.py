"""Transactions through the edge (Tansu has no EndTxn; Apache Kafka does): init, produce, commit and
abort with each client library; `read_committed` consumers see only committed records, and the same
through an encrypting edge, where the commit/abort markers (control batches) must reach the broker and
come back to consumers intact while every data record is stored encrypted."""

import pytest

from lib.clients import Rec, client, unique
from lib.edge import VirtualCluster
from lib.wait import wait_for

MARKER = "strait.enc"


@pytest.fixture(autouse=True)
def vault_token(monkeypatch):
    from lib.kms import ROOT_TOKEN
    monkeypatch.setenv("VAULT_TOKEN", ROOT_TOKEN)


def txn_conf(lib: str) -> dict:
    txid = unique("txid")
    if lib == "kafka-python":
        return {"transactional_id": txid, "enable_idempotence": True, "acks": "all"}
    return {"transactional.id": txid, "enable.idempotence": True, "acks": "all"}


def read_conf(lib: str, level: str) -> dict:
    return {"isolation_level": level} if lib == "kafka-python" else {"isolation.level": level}


def run_transactions(c, lib: str, topic: str) -> tuple[list[bytes], list[bytes]]:
    """Commit 5, abort 5, commit 2 more; returns (committed, aborted) values in produce order."""
    committed = [b"commit-%d" % i for i in range(5)]
    aborted = [b"abort-%d" % i for i in range(5)]
    late = [b"late-%d" % i for i in range(2)]
    p = c.producer(**txn_conf(lib))
    try:
        p.init_transactions()
        for values, commit in ((committed, True), (aborted, False), (late, True)):
            p.begin_transaction()
            p.send_all(topic, [Rec(None, v) for v in values], timeout=60)
            if commit:
                p.commit_transaction()
            else:
                p.abort_transaction()
    finally:
        p.close()
    return committed + late, aborted


def consume_values(c, lib: str, topic: str, n: int, level: str) -> list[bytes]:
    consumer = c.consumer(topic, **read_conf(lib, level))
    try:
        # `settle` keeps polling after n arrived: one aborted record slipping through shows up here.
        return [r.value for r in consumer.take(n, timeout=90, settle=2.0)]
    finally:
        consumer.close()


def test_commit_and_abort_read_committed(via, lib, make_target):
    target = make_target()
    c = target.client(lib)
    topic = unique("txn")
    c.create_topic(topic)
    committed, aborted = run_transactions(c, lib, topic)
    assert consume_values(c, lib, topic, len(committed), "read_committed") == committed
    got = consume_values(c, lib, topic, len(committed) + len(aborted), "read_uncommitted")
    assert sorted(got) == sorted(committed + aborted)


@pytest.mark.edge_only
def test_transactions_through_an_encrypting_edge(via, lib, broker, edge, bao):
    k = broker()
    kek = unique("kek-txn")
    bao.create_key(kek)
    vc = VirtualCluster(name="enc-txn", upstream=k.bootstrap_servers,
                        extra={"encryption": {"rules": [{"topic": "txn-*", "kms": "vault", "kek": kek}]}})
    e = edge([vc], extra={"kms": [bao.kms_entry()]})
    c = client(lib, e.bootstrap)
    topic = unique("txn-enc")
    c.create_topic(topic)
    committed, aborted = run_transactions(c, lib, topic)
    # Through the edge: plaintext, committed only, in order.
    assert consume_values(c, lib, topic, len(committed), "read_committed") == committed
    # At the broker: the same records, committed only (the markers survived the edge), all ciphertext.
    direct = client("confluent", k.bootstrap).consumer(topic, **{"isolation.level": "read_committed"})
    try:
        stored = direct.take(len(committed), timeout=60, settle=2.0)
    finally:
        direct.close()
    assert len(stored) == len(committed)
    for r in stored:
        assert r.value not in committed + aborted
        assert any(h == MARKER for h, _ in r.headers), r.headers
    wait_for(lambda: e.metric("strait_encryption_encrypted_records") >= len(committed) + len(aborted), 10,
             what="every transactional record encrypted")
