"""The same operations through confluent-kafka (librdkafka) and kafka-python, with deadlines.

Each library is wrapped by a class with the same methods so scenarios are written once and run with both.
"""

import time
import uuid
from dataclasses import dataclass, field

from .wait import wait_for

LIBS = ["confluent", "kafka-python", "java"]


@dataclass
class Rec:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int | None = None
    offset: int | None = None
    topic: str | None = None
    # CreateTime in ms. Only the Java client sends it (JavaProducer) and fills it in (JavaConsumer).
    timestamp: int | None = None


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Confluent:
    name = "confluent"
    codecs = ["none", "gzip", "snappy", "lz4", "zstd"]

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self._admin_client = None

    def _admin(self):
        # Kept alive on the instance: futures of a garbage-collected AdminClient fail with _DESTROY.
        from confluent_kafka.admin import AdminClient
        if self._admin_client is None:
            self._admin_client = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin_client

    def create_topic(self, topic: str, partitions: int = 1, timeout: float = 30.0) -> None:
        from confluent_kafka.admin import NewTopic
        futures = self._admin().create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)], operation_timeout=timeout
        )
        futures[topic].result(timeout=timeout)
        wait_for(lambda: len(self.partitions(topic)) == partitions, timeout, what=f"{topic} metadata")

    def partitions(self, topic: str) -> list[int]:
        md = self._admin().list_topics(topic=topic, timeout=10)
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            return []
        return sorted(t.partitions)

    def brokers(self) -> list[tuple[str, int]]:
        md = self._admin().list_topics(timeout=10)
        return sorted((b.host, b.port) for b in md.brokers.values())

    def described_brokers(self) -> list[tuple[str, int]]:
        """Brokers from DescribeCluster."""
        desc = self._admin().describe_cluster(request_timeout=10).result(timeout=15)
        return sorted((n.host, n.port) for n in desc.nodes)

    def coordinator(self, group: str) -> tuple[str, int]:
        desc = self._admin().describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
        return (desc.coordinator.host, desc.coordinator.port)

    def producer(self, **conf):
        from confluent_kafka import Producer
        base = {"bootstrap.servers": self.bootstrap, "linger.ms": 5, "message.timeout.ms": 30000}
        base.update(conf)
        return ConfluentProducer(Producer(base))

    def produce(self, topic: str, records: list[Rec], timeout: float = 30.0, **conf) -> list[Rec]:
        p = self.producer(**conf)
        return p.send_all(topic, records, timeout)

    def consumer(self, topic: str, group: str | None = None, **conf):
        from confluent_kafka import Consumer
        base = {
            "bootstrap.servers": self.bootstrap,
            "group.id": group or unique("g"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 10000,
        }
        base.update(conf)
        if base.get("group.protocol") == "consumer":
            # KIP-848: the broker owns session timeouts and assignment; librdkafka refuses these keys.
            base.pop("session.timeout.ms", None)
        c = Consumer(base)
        c.subscribe([topic])
        return ConfluentConsumer(c)


class ConfluentProducer:
    def __init__(self, p):
        self.p = p

    def send_all(self, topic: str, records: list[Rec], timeout: float = 30.0) -> list[Rec]:
        """Produce and wait for every delivery report; returns records with partition/offset; raises on error."""
        results: list = [None] * len(records)

        def cb(i):
            def done(err, msg):
                results[i] = err if err is not None else Rec(
                    msg.key(), msg.value(), list(msg.headers() or []), msg.partition(), msg.offset(), msg.topic()
                )
            return done

        for i, r in enumerate(records):
            kwargs = {"key": r.key, "value": r.value, "on_delivery": cb(i)}
            if r.headers:
                kwargs["headers"] = r.headers
            if r.partition is not None:
                kwargs["partition"] = r.partition
            self.p.produce(topic, **kwargs)
            self.p.poll(0)
        remaining = self.p.flush(timeout)
        if remaining:
            raise AssertionError(f"{remaining} records not delivered within {timeout}s")
        errors = [r for r in results if not isinstance(r, Rec)]
        if errors:
            raise AssertionError(f"{len(errors)} delivery errors, first: {errors[0]}")
        return results

    # Transactions (the producer needs a `transactional.id`).
    def init_transactions(self, timeout: float = 60.0) -> None:
        self.p.init_transactions(timeout)

    def begin_transaction(self) -> None:
        self.p.begin_transaction()

    def commit_transaction(self, timeout: float = 60.0) -> None:
        self.p.commit_transaction(timeout)

    def abort_transaction(self, timeout: float = 60.0) -> None:
        self.p.abort_transaction(timeout)

    def close(self):
        self.p.flush(10)


def transient_local_errors() -> frozenset[int]:
    """librdkafka's own (negative) codes for a connection that dropped and is being re-established,
    and the end-of-partition event: what a consumer sees while a broker or edge restarts."""
    from confluent_kafka import KafkaError
    return frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._PARTITION_EOF})


class ConfluentConsumer:
    def __init__(self, c):
        self.c = c

    def take(self, n: int, timeout: float = 30.0, settle: float = 0.0) -> list[Rec]:
        """Poll until `n` records arrived (then keep polling `settle` seconds to catch extras)."""
        out: list[Rec] = []
        transient = transient_local_errors()
        deadline = time.monotonic() + timeout
        extra_until = None
        while time.monotonic() < deadline:
            if len(out) >= n:
                if extra_until is None:
                    extra_until = time.monotonic() + settle
                if time.monotonic() >= extra_until:
                    break
            m = self.c.poll(0.2)
            if m is None:
                continue
            if m.error():
                if m.error().retriable() or m.error().code() in transient:
                    continue
                # Every other local error (_SSL, _AUTHENTICATION, _BAD_MSG: a record the client could
                # not parse, ...) is a failure of what is under test.
                raise AssertionError(f"consumer error: {m.error()}")
            out.append(Rec(m.key(), m.value(), list(m.headers() or []), m.partition(), m.offset(), m.topic()))
        if len(out) < n:
            raise AssertionError(f"consumed {len(out)} of {n} records within {timeout}s")
        return out

    def commit(self):
        self.c.commit(asynchronous=False)

    def close(self):
        self.c.close()


class KafkaPython:
    name = "kafka-python"
    codecs = ["none", "gzip", "snappy", "lz4", "zstd"]

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap

    def _admin(self):
        from kafka import KafkaAdminClient
        return KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=15000)

    def create_topic(self, topic: str, partitions: int = 1, timeout: float = 30.0) -> None:
        from kafka.admin import NewTopic
        admin = self._admin()
        try:
            admin.create_topics([NewTopic(topic, partitions, 1)], timeout_ms=int(timeout * 1000))
        finally:
            admin.close()
        wait_for(lambda: len(self.partitions(topic)) == partitions, timeout, what=f"{topic} metadata")

    def partitions(self, topic: str) -> list[int]:
        from kafka import KafkaConsumer
        c = KafkaConsumer(bootstrap_servers=self.bootstrap, request_timeout_ms=15000,
                          allow_auto_create_topics=False)
        try:
            return sorted(c.partitions_for_topic(topic) or [])
        finally:
            c.close()

    def brokers(self) -> list[tuple[str, int]]:
        from kafka import KafkaConsumer
        c = KafkaConsumer(bootstrap_servers=self.bootstrap, request_timeout_ms=15000)
        try:
            c.topics()  # forces a full metadata request
            return sorted((b.host, b.port) for b in c._client.cluster.brokers())
        finally:
            c.close()

    def coordinator(self, group: str) -> tuple[str, int]:
        # kafka-python 3 has no public "which broker coordinates this group" call: FindCoordinator via the
        # admin client's own (private) helper, then the address it learned.
        admin = self._admin()
        try:
            node_id = admin._manager.run(admin._find_coordinator_id, group)
            b = admin._manager.cluster.broker_metadata(node_id)
            return (b.host, b.port)
        finally:
            admin.close()

    def described_brokers(self) -> list[tuple[str, int]]:
        """Brokers from DescribeCluster (falls back to Metadata when the broker lacks DescribeCluster)."""
        admin = self._admin()
        try:
            md = admin.describe_cluster()
            return sorted((b["host"], b["port"]) for b in md["brokers"])
        finally:
            admin.close()

    def producer(self, **conf):
        from kafka import KafkaProducer
        base = {"bootstrap_servers": self.bootstrap, "linger_ms": 5, "request_timeout_ms": 30000,
                "enable_idempotence": False}
        base.update(conf)
        if base.get("compression_type") == "none":
            base["compression_type"] = None
        return KafkaPythonProducer(KafkaProducer(**base))

    def produce(self, topic: str, records: list[Rec], timeout: float = 30.0, **conf) -> list[Rec]:
        p = self.producer(**conf)
        try:
            return p.send_all(topic, records, timeout)
        finally:
            p.close()

    def consumer(self, topic: str, group: str | None = None, **conf):
        from kafka import KafkaConsumer
        base = {
            "bootstrap_servers": self.bootstrap,
            "group_id": group or unique("g"),
            "auto_offset_reset": "earliest",
            "enable_auto_commit": False,
            "session_timeout_ms": 10000,
        }
        base.update(conf)
        c = KafkaConsumer(**base)
        subscribe_kafka_python(c, topic)
        return KafkaPythonConsumer(c)


class KafkaPythonProducer:
    def __init__(self, p):
        self.p = p

    def send_all(self, topic: str, records: list[Rec], timeout: float = 30.0) -> list[Rec]:
        futures = []
        for r in records:
            futures.append(self.p.send(topic, key=r.key, value=r.value, headers=r.headers or None,
                                       partition=r.partition))
        self.p.flush(timeout=timeout)
        out = []
        for r, f in zip(records, futures):
            md = f.get(timeout=timeout)
            out.append(Rec(r.key, r.value, r.headers, md.partition, md.offset, md.topic))
        return out

    # Transactions (the producer needs a `transactional_id`).
    def init_transactions(self, timeout: float = 60.0) -> None:
        self.p.init_transactions()

    def begin_transaction(self) -> None:
        self.p.begin_transaction()

    def commit_transaction(self, timeout: float = 60.0) -> None:
        self.p.commit_transaction()

    def abort_transaction(self, timeout: float = 60.0) -> None:
        self.p.abort_transaction()

    def close(self):
        self.p.close(timeout=10)


def subscribe_kafka_python(consumer, topic: str) -> None:
    """Subscribe a kafka-python KafkaConsumer to `topic` once its metadata has the topic.

    kafka-python 3.0.12 can lead the group's first join before its metadata has a just-created topic
    and assign nothing. The rejoin that follows then sometimes never completes: when poll() times out
    while its SyncGroup is in flight, the leader has already recorded the new assignment snapshot, so
    `need_rejoin()` is False and the finished join is never collected (no partitions, no heartbeats;
    seen directly against Kafka 4.1, under CPU load). With the topic's metadata fetched first, the
    first assignment already has the partitions."""
    wait_for(lambda: consumer.partitions_for_topic(topic), 30, what=f"{topic} in kafka-python's metadata")
    consumer.subscribe([topic])


class KafkaPythonConsumer:
    def __init__(self, c):
        self.c = c

    def take(self, n: int, timeout: float = 30.0, settle: float = 0.0) -> list[Rec]:
        out: list[Rec] = []
        deadline = time.monotonic() + timeout
        extra_until = None
        while time.monotonic() < deadline:
            if len(out) >= n:
                if extra_until is None:
                    extra_until = time.monotonic() + settle
                if time.monotonic() >= extra_until:
                    break
            batches = self.c.poll(timeout_ms=200)
            for tp, msgs in batches.items():
                for m in msgs:
                    out.append(Rec(m.key, m.value, [(k, v) for k, v in (m.headers or [])], tp.partition,
                                   m.offset, tp.topic))
        if len(out) < n:
            raise AssertionError(f"consumed {len(out)} of {n} records within {timeout}s")
        return out

    def commit(self):
        self.c.commit()

    def close(self):
        self.c.close()


def client(lib: str, bootstrap: str):
    if lib == "java":
        # The Java client (kafka-clients) through the session's JVM; imported here, it imports this module.
        from .java_client import JavaClient
        return JavaClient(bootstrap)
    return {"confluent": Confluent, "kafka-python": KafkaPython}[lib](bootstrap)
