"""A transactional producer across a failover (issue 14, item 6): producer ids, epochs and transaction
state live in the cluster's transaction coordinator, which the standby does not have. What a client sees,
with librdkafka and with the Java client, and a file-configured edge whose upstream is swapped in place (what every control-plane
decision does): the open transaction cannot commit, nothing of it becomes visible, and a producer that
initialises again with the same transactional.id works on the standby through the same bootstrap."""

from confluent_kafka import KafkaException, Producer

from lib.clients import unique
from lib.edge import VirtualCluster
from lib.wait import wait_for
from tests.test_encryption import create_topic, end_offset
from tests.test_failover import switch_in_place


def committed_values(bootstrap: str, topic: str) -> list[str]:
    """What a read_committed consumer sees in partition 0, read until its position reaches the end offset
    (transaction markers take offsets but are no records)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    end = end_offset(bootstrap, topic)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("txn-read"), "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    tp = TopicPartition(topic, 0, OFFSET_BEGINNING)
    c.assign([tp])
    got = []
    try:
        def at_end():
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                got.append(m.value().decode())
            return c.position([TopicPartition(topic, 0)])[0].offset >= end
        wait_for(at_end, 60, interval=0, what=f"{topic} read to offset {end} at {bootstrap}")
    finally:
        c.close()
    return got


def test_an_open_transaction_fails_cleanly_and_a_new_producer_continues_on_the_standby(broker, edge):
    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    topic, tid = unique("txn-dr"), unique("payments-tx")
    vc = VirtualCluster("orders", primary.bootstrap_servers)
    e = edge([vc])
    create_topic(e.bootstrap, topic)
    create_topic(standby.bootstrap_servers[0], topic)
    conf = {"bootstrap.servers": e.bootstrap, "transactional.id": tid, "transaction.timeout.ms": 10000,
            "message.timeout.ms": 10000, "socket.timeout.ms": 5000}
    p = Producer(conf)
    p.init_transactions(30)
    p.begin_transaction()
    for n in range(5):
        p.produce(topic, value=f"committed-{n}".encode())
    p.commit_transaction(30)
    # A second transaction is open when the upstream changes.
    p.begin_transaction()
    for n in range(5):
        p.produce(topic, value=f"open-{n}".encode())
    p.flush(30)
    switch_in_place(e, vc, standby)
    try:
        p.commit_transaction(30)
        raise AssertionError("a transaction begun on the primary committed on the standby")
    except KafkaException as exc:
        err = exc.args[0]
        print(f"commit of the open transaction after the switch: {err.name()} ({err.str()}); "
              f"fatal={err.fatal()} retriable={err.retriable()} abortable={err.txn_requires_abort()}")
        assert err.fatal() or err.txn_requires_abort(), err
    # A new producer (same transactional.id) initialises against the standby's coordinator.
    p2 = Producer(conf)
    p2.init_transactions(30)
    p2.begin_transaction()
    for n in range(5):
        p2.produce(topic, value=f"after-{n}".encode())
    p2.commit_transaction(30)
    # Read again until it is whole: under load a read_committed consumer has been seen to stop after the
    # first record (its position past an end offset read a moment before).
    after = [f"after-{n}" for n in range(5)]
    wait_for(lambda: committed_values(standby.bootstrap_servers[0], topic) == after, 60,
             what="the new producer's transaction committed on the standby")
    # The primary holds the first transaction only: the open one never commits there (the coordinator
    # aborts it at transaction.timeout.ms, which ends it for read_committed readers).
    wait_for(lambda: committed_values(primary.bootstrap_servers[0], topic) == [f"committed-{n}" for n in range(5)]
             and end_offset(primary.bootstrap_servers[0], topic) == 12, 60,
             what="the open transaction aborted at the primary (5 + marker, 5 + abort marker)")


def test_the_java_clients_open_transaction_fails_cleanly_and_a_new_producer_continues_on_the_standby(broker, edge):
    """The same scenario with the Java client (kafka-clients 4.1): the commit of the transaction open at
    the switch is refused by the standby's coordinator, which never saw the producer id; nothing of it
    becomes visible anywhere, and a new producer with the same transactional.id commits on the standby."""
    from lib.clients import Rec
    from lib.java_client import JavaClient, JavaError
    primary = broker(dedicated=True, name="kafka-primary")
    standby = broker(dedicated=True, name="kafka-standby")
    topic, tid = unique("txn-dr-java"), unique("payments-tx-java")
    vc = VirtualCluster("orders", primary.bootstrap_servers)
    e = edge([vc])
    create_topic(e.bootstrap, topic)
    create_topic(standby.bootstrap_servers[0], topic)
    java = JavaClient(e.bootstrap)
    conf = {"transactional.id": tid, "transaction.timeout.ms": "10000", "delivery.timeout.ms": "20000",
            "request.timeout.ms": "5000"}
    p = java.producer(**conf)
    try:
        p.init_transactions(30)
        p.begin_transaction()
        p.send_all(topic, [Rec(None, f"committed-{n}".encode()) for n in range(5)])
        p.commit_transaction(30)
        p.begin_transaction()
        p.send_all(topic, [Rec(None, f"open-{n}".encode()) for n in range(5)])
        switch_in_place(e, vc, standby)
        try:
            p.commit_transaction(30)
            raise AssertionError("a transaction begun on the primary committed on the standby")
        except JavaError as err:
            print(f"Java commit of the open transaction after the switch: {err}")
            refused = err
    finally:
        p.close()
    # The standby's coordinator does not know the producer id the primary's issued.
    assert refused.kafka_error == "INVALID_PRODUCER_ID_MAPPING", refused
    p2 = java.producer(**conf)
    try:
        p2.init_transactions(30)
        p2.begin_transaction()
        p2.send_all(topic, [Rec(None, f"after-{n}".encode()) for n in range(5)])
        p2.commit_transaction(30)
    finally:
        p2.close()
    after = [f"after-{n}" for n in range(5)]
    wait_for(lambda: committed_values(standby.bootstrap_servers[0], topic) == after, 60,
             what="the new Java producer's transaction committed on the standby")
    wait_for(lambda: committed_values(primary.bootstrap_servers[0], topic) == [f"committed-{n}" for n in range(5)]
             and end_offset(primary.bootstrap_servers[0], topic) == 12, 60,
             what="the open transaction aborted at the primary (5 + marker, 5 + abort marker)")
