"""Encrypted topics across a failover (issue 14, item 7): records encrypted at the primary and copied to
the standby byte for byte (a re-producing replication tool, as MM2 does with ByteArrayConverter) still
decrypt through the same edge once it serves the standby; both clusters hold only ciphertext, and what is
produced after the switch is encrypted on the standby too. Across sites with different KMSs the same
holds through federation (test_federation.py)."""

from lib.clients import unique
from lib.edge import VirtualCluster
from lib.mirrormaker import copy_topic, read_records
from lib.wait import wait_for
from tests.test_encryption import create_topic, parse_cipher
from tests.test_failover import switch_in_place
from tests.test_mesh import KEYRING


def through_edge(bootstrap: str, topic: str, n: int) -> list[str]:
    from tests.test_encryption import consumer, poll_into
    c = consumer(bootstrap, topic)
    got, errors = [], []
    try:
        wait_for(lambda: poll_into(c, got, errors, 0.3) or errors or len(got) >= n, 60, interval=0,
                 what=f"{n} records of {topic} through the edge")
    finally:
        c.close()
    assert not errors, errors[:3]
    return [g.value.decode() for g in got]


def assert_ciphertext(bootstrap: str, topic: str, plain: list[str]) -> None:
    stored = read_records(bootstrap, topic)
    assert len(stored) == len(plain)
    for r in stored:
        assert not any(p.encode() in r.value for p in plain), "plaintext stored"
        # The cipher format (FORMAT.md), the DEK wrapped by the `dev` realm.
        assert parse_cipher(r.value)["kms"] == "dev"


def test_encrypted_records_decrypt_on_the_standby_after_the_switch(broker, edge, tmp_path):
    from confluent_kafka import Producer
    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    (tmp_path / "keys.json").write_text(KEYRING)
    topic = unique("secret-dr")
    vc = VirtualCluster("orders", primary.bootstrap_servers, extra={
        "encryption": {"rules": [{"topic": "secret-*", "kms": "dev", "kek": "kek-a"}]}})
    e = edge([vc], extra={"kms": [{"name": "dev", "local": {"path": str(tmp_path / "keys.json")}}]})
    create_topic(e.bootstrap, topic)
    before = [f"before-{n}" for n in range(20)]
    p = Producer({"bootstrap.servers": e.bootstrap, "enable.idempotence": True})
    for v in before:
        p.produce(topic, value=v.encode())
    assert p.flush(30) == 0
    assert_ciphertext(primary.bootstrap_servers[0], topic, before)
    # Replication copies the ciphertext as it is.
    assert copy_topic(primary.bootstrap_servers[0], topic, standby.bootstrap_servers[0], topic) == len(before)

    switch_in_place(e, vc, standby)
    after = [f"after-{n}" for n in range(20)]
    p = Producer({"bootstrap.servers": e.bootstrap, "enable.idempotence": True})
    for v in after:
        p.produce(topic, value=v.encode())
    assert p.flush(30) == 0
    assert through_edge(e.bootstrap, topic, len(before) + len(after)) == before + after
    assert_ciphertext(standby.bootstrap_servers[0], topic, before + after)
