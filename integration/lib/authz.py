"""Helpers for the authorization scenarios: rules, mTLS client configs per principal, one-record
produce with the Kafka error code as result, and reads straight from the broker."""

import json
import os
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .clients import subscribe_kafka_python
from .edge import Edge, VirtualCluster
from .pki import SPIFFE_BILLING, SPIFFE_ORDERS, SPIFFE_OTHER_DOMAIN, Pki
from .wait import wait_for

TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
SHOP_ANY = "spiffe://example.org/ns/shop/sa/*"

# Certificate names in the test PKI and the SPIFFE ID each carries.
PRINCIPALS = {"orders": SPIFFE_ORDERS, "billing": SPIFFE_BILLING, "other-domain": SPIFFE_OTHER_DOMAIN,
              "nested-path": SPIFFE_ORDERS + "/extra"}


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def in_seconds(seconds: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


def example_rules() -> list[dict]:
    """The issue's example: orders writes orders-*, every shop account reads orders-* and shop-* groups."""
    return [
        {"principal": SPIFFE_ORDERS, "allow": ["Write", "Describe"], "topic": "orders-*"},
        {"principal": SHOP_ANY, "allow": ["Read", "Describe"], "topic": "orders-*"},
        {"principal": SHOP_ANY, "allow": ["Read"], "group": "shop-*"},
    ]


def authz_cluster(broker, pki: Pki, rules: list[dict], name: str = "secure", audit: dict | None = None,
                  ) -> VirtualCluster:
    extra = {"tls": pki.server_tls(), "authorization": {"rules": rules, "unknown_api_keys": "deny"}}
    if audit is not None:
        extra["audit"] = audit
    # Advertise "localhost": clients verify the edge's certificate by name.
    return VirtualCluster(name=name, upstream=broker.bootstrap_servers, advertised_host="localhost", extra=extra)


def write_config_atomically(edge: Edge) -> None:
    """Like `edge.write_config()`, but the edge's watcher never sees a half-written file."""
    tmp = edge.config_path.with_suffix(".tmp")
    edge.write_config()
    text = edge.config_path.read_text()
    tmp.write_text(text)
    os.replace(tmp, edge.config_path)


class Principal:
    """Client configs for one certificate of the test PKI against one virtual cluster."""

    def __init__(self, pki: Pki, vc: VirtualCluster, cert: str):
        self.pki = pki
        self.cert = cert
        self.spiffe = PRINCIPALS.get(cert)
        self.bootstrap = f"localhost:{vc.bootstrap_port}"

    def confluent(self, **extra) -> dict:
        return {"bootstrap.servers": self.bootstrap, **self.pki.confluent_ssl(self.cert),
                "socket.timeout.ms": 10000, **extra}

    def kafka_python(self, **extra) -> dict:
        return {"bootstrap_servers": self.bootstrap, **self.pki.kafka_python_ssl(self.cert), **extra}

    def java(self):
        """A JavaClient with this principal's certificate (the confluent settings, mapped by java_conf)."""
        from .java_client import JavaClient
        conf = self.confluent()
        conf.pop("bootstrap.servers")
        return JavaClient(self.bootstrap, **conf)

    def producer(self, lib: str, **extra) -> "OneByOneProducer":
        if lib == "java":
            # delivery.timeout.ms (librdkafka's message.timeout.ms) must cover linger + request timeout.
            return OneByOneProducer(lib, self.java().producer(**{
                "linger.ms": 0, "delivery.timeout.ms": 15000, "enable.idempotence": False,
                "max.block.ms": 15000, **extra}))
        if lib == "confluent":
            from confluent_kafka import Producer
            conf = self.confluent(**{"linger.ms": 0, "message.timeout.ms": 15000,
                                     "enable.idempotence": False, **extra})
            return OneByOneProducer(lib, Producer(conf))
        from kafka import KafkaProducer
        conf = self.kafka_python(**{"linger_ms": 0, "enable_idempotence": False, "retries": 0,
                                    "request_timeout_ms": 15000, "max_block_ms": 15000, **extra})
        return OneByOneProducer(lib, KafkaProducer(**conf))

    def list_topics(self, lib: str) -> set[str]:
        if lib == "java":
            return self.java().list_topics(timeout=15)
        if lib == "confluent":
            from confluent_kafka.admin import AdminClient
            admin = AdminClient(self.confluent())
            return set(admin.list_topics(timeout=15).topics)
        from kafka import KafkaConsumer
        c = KafkaConsumer(**self.kafka_python(request_timeout_ms=15000))
        try:
            return set(c.topics())
        finally:
            c.close()


class OneByOneProducer:
    """Sends one record at a time and waits for its outcome: None (written) or a Kafka error code."""

    def __init__(self, lib: str, producer):
        self.lib = lib
        self.p = producer

    def send(self, topic: str, value: bytes, timeout: float = 20.0) -> int | None:
        return self.send_many([(topic, value)], timeout)[0]

    def send_many(self, records: list[tuple[str, bytes]], timeout: float = 20.0) -> list[int | None]:
        """Sends all records before waiting, so the client may put them in one Produce request."""
        if self.lib == "java":
            from .clients import Rec
            from .java_client import JavaError
            # One driver call: every send() before the first wait. A failed record carries the code of
            # the exception the client raised (send() itself refuses a topic Metadata denied).
            results = self.p.send_results(records[0][0], [Rec(None, v, topic=t) for t, v in records], timeout)
            return [(r.kafka_code if r.kafka_code is not None else r.cls) if isinstance(r, JavaError) else None
                    for r in results]
        if self.lib == "confluent":
            results: list = [False] * len(records)

            def cb(i):
                def done(err, _msg):
                    results[i] = err.code() if err is not None else None
                return done
            from confluent_kafka import KafkaException
            for i, (topic, value) in enumerate(records):
                try:
                    self.p.produce(topic, value=value, on_delivery=cb(i))
                except KafkaException as e:
                    # librdkafka remembers a topic's authorization failure and refuses further
                    # records for it locally; the code is the one the edge sent.
                    results[i] = e.args[0].code()
            if self.p.flush(timeout) != 0:
                raise AssertionError(f"records not settled within {timeout}s")
            return results
        from kafka.errors import KafkaError
        outcomes: list = []
        futures = []
        for topic, value in records:
            try:
                futures.append(self.p.send(topic, value=value))
            except KafkaError as e:  # metadata refused before anything is sent
                futures.append(e)
        for f in futures:
            if isinstance(f, KafkaError):
                outcomes.append(f.errno)
                continue
            try:
                f.get(timeout=timeout)
                outcomes.append(None)
            except KafkaError as e:
                outcomes.append(getattr(e, "errno", None) or type(e).__name__)
        return outcomes

    def close(self):
        if self.lib == "confluent":
            self.p.flush(10)
        else:
            self.p.close(timeout=10)


def java_code(e) -> int | str:
    """The Kafka error code of a JavaError, else the Java exception class (client-side failures)."""
    return e.kafka_code if e.kafka_code is not None else e.cls


def consume_with_group(principal: Principal, lib: str, topic: str, group: str, n: int,
                       timeout: float = 45.0) -> list[bytes]:
    """Subscribe with `group`, read `n` records, commit synchronously, close. Raises on any error."""
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    if lib == "java":
        from .java_client import JavaError
        c = principal.java().consumer(topic, group)  # earliest, no auto commit, session timeout 10 s
        try:
            while len(out) < n and time.monotonic() < deadline:
                try:
                    out.extend(r.value for r in c.poll(0.2))
                except JavaError as e:
                    if e.retriable:
                        continue
                    raise AssertionError(f"consumer error: {e}") from e
            assert len(out) >= n, f"consumed {len(out)} of {n} within {timeout}s"
            c.commit()
        finally:
            c.close()
        return out
    if lib == "confluent":
        from confluent_kafka import Consumer
        c = Consumer(principal.confluent(**{"group.id": group, "auto.offset.reset": "earliest",
                                            "enable.auto.commit": False, "session.timeout.ms": 10000}))
        c.subscribe([topic])
        try:
            while len(out) < n and time.monotonic() < deadline:
                m = c.poll(0.2)
                if m is None:
                    continue
                if m.error():
                    if m.error().retriable():
                        continue
                    raise AssertionError(f"consumer error: {m.error()}")
                out.append(m.value())
            assert len(out) >= n, f"consumed {len(out)} of {n} within {timeout}s"
            c.commit(asynchronous=False)
        finally:
            c.close()
        return out
    from kafka import KafkaConsumer
    c = KafkaConsumer(**principal.kafka_python(group_id=group, auto_offset_reset="earliest",
                                               enable_auto_commit=False, session_timeout_ms=10000))
    try:
        subscribe_kafka_python(c, topic)
        while len(out) < n and time.monotonic() < deadline:
            for records in c.poll(timeout_ms=200).values():
                out.extend(r.value for r in records)
        assert len(out) >= n, f"consumed {len(out)} of {n} within {timeout}s"
        c.commit()
    finally:
        c.close()
    return out


def group_error(principal: Principal, lib: str, topic: str, group: str, timeout: float = 30.0) -> int:
    """Subscribe with `group` and return the first non-retriable Kafka error code the client reports
    (Java: the first one that is not the subscribed topic's own TOPIC_AUTHORIZATION_FAILED, see below)."""
    deadline = time.monotonic() + timeout
    if lib == "java":
        from .java_client import JavaError
        c = principal.java().consumer(topic, group)
        topic_denied = []
        try:
            while time.monotonic() < deadline:
                try:
                    got = c.poll(0.2)
                except JavaError as e:
                    if e.retriable:
                        continue
                    # A principal that may not Describe `topic` also gets its subscription's Metadata
                    # refused: the Java consumer raises that (TopicAuthorizationException) from whichever
                    # poll sees it first, then goes on to the group. That is the topic's refusal, not the
                    # group's: keep polling for the group's own error.
                    if e.kafka_code == TOPIC_AUTHORIZATION_FAILED:
                        topic_denied.append(e)
                        continue
                    return java_code(e)
                if got:
                    raise AssertionError(f"a record arrived although group {group} is not allowed")
        finally:
            c.close()
        raise AssertionError(f"no group error reported for group {group} within {timeout}s"
                             f" (topic refusals seen: {[str(e) for e in topic_denied[:2]]})")
    if lib == "confluent":
        from confluent_kafka import Consumer
        c = Consumer(principal.confluent(**{"group.id": group, "auto.offset.reset": "earliest",
                                            "enable.auto.commit": False}))
        c.subscribe([topic])
        try:
            while time.monotonic() < deadline:
                m = c.poll(0.2)
                if m is not None and m.error() and not m.error().retriable():
                    return m.error().code()
                if m is not None and not m.error():
                    raise AssertionError(f"a record arrived although group {group} is not allowed")
        finally:
            c.close()
        raise AssertionError(f"no error reported for group {group} within {timeout}s")
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError
    c = KafkaConsumer(**principal.kafka_python(group_id=group, auto_offset_reset="earliest",
                                               enable_auto_commit=False))
    c.subscribe([topic])
    try:
        while time.monotonic() < deadline:
            try:
                batches = c.poll(timeout_ms=200)
            except KafkaError as e:
                if not e.retriable:
                    return e.errno
                continue
            if batches:
                raise AssertionError(f"a record arrived although group {group} is not allowed")
    finally:
        c.close()
    raise AssertionError(f"no error reported for group {group} within {timeout}s")


def fetch_error(principal: Principal, lib: str, topic: str, timeout: float = 30.0) -> int:
    """Read partition 0 of `topic` from the beginning without a group; return the first non-retriable
    Kafka error code the client reports. Fails if any record arrives."""
    deadline = time.monotonic() + timeout
    if lib == "java":
        from .java_client import JavaError
        # No group.id: the Java client then needs no coordinator (like kafka-python).
        c = principal.java().assigned_consumer([(topic, 0)])
        try:
            while time.monotonic() < deadline:
                try:
                    got = c.poll(0.2)
                except JavaError as e:
                    if not e.retriable:
                        return java_code(e)
                    continue
                if got:
                    raise AssertionError(f"records arrived although {topic} may not be read: {got}")
        finally:
            c.close()
        raise AssertionError(f"no error reported for {topic} within {timeout}s")
    if lib == "confluent":
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        # librdkafka always looks up its group's coordinator: use one the shop accounts may use.
        c = Consumer(principal.confluent(**{"group.id": "shop-fetch", "enable.auto.commit": False}))
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        try:
            while time.monotonic() < deadline:
                m = c.poll(0.2)
                if m is None:
                    continue
                if not m.error():
                    raise AssertionError(f"record {m.value()!r} arrived although {topic} may not be read")
                if not m.error().retriable():
                    return m.error().code()
        finally:
            c.close()
        raise AssertionError(f"no error reported for {topic} within {timeout}s")
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError
    c = KafkaConsumer(**principal.kafka_python(enable_auto_commit=False, auto_offset_reset="earliest"))
    c.assign([TopicPartition(topic, 0)])
    c.seek_to_beginning()
    try:
        while time.monotonic() < deadline:
            try:
                batches = c.poll(timeout_ms=200)
            except KafkaError as e:
                if not e.retriable:
                    return e.errno
                continue
            if batches:
                raise AssertionError(f"records arrived although {topic} may not be read: {batches}")
    finally:
        c.close()
    raise AssertionError(f"no error reported for {topic} within {timeout}s")


class PollingConsumer:
    """Assigned to partition 0 from the beginning (no group protocol); `poll_once` returns the values
    that arrived and the non-retriable Kafka error codes the client reported."""

    def __init__(self, principal: Principal, lib: str, topic: str, group: str):
        self.lib = lib
        if lib == "java":
            # No group.id, as kafka-python: assignment and offsets need no coordinator.
            self.c = principal.java().assigned_consumer([(topic, 0)])
        elif lib == "confluent":
            from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
            self.c = Consumer(principal.confluent(**{"group.id": group, "enable.auto.commit": False}))
            self.c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        else:
            from kafka import KafkaConsumer, TopicPartition
            self.c = KafkaConsumer(**principal.kafka_python(enable_auto_commit=False,
                                                            auto_offset_reset="earliest"))
            self.c.assign([TopicPartition(topic, 0)])
            self.c.seek_to_beginning()

    def poll_once(self, timeout: float = 0.1) -> tuple[list[bytes], list[int]]:
        if self.lib == "java":
            from .java_client import JavaError
            try:
                return [r.value for r in self.c.poll(timeout)], []
            except JavaError as e:
                return [], ([] if e.retriable else [java_code(e)])
        if self.lib == "confluent":
            m = self.c.poll(timeout)
            if m is None:
                return [], []
            if m.error():
                return [], ([] if m.error().retriable() else [m.error().code()])
            return [m.value()], []
        from kafka.errors import KafkaError
        try:
            batches = self.c.poll(timeout_ms=int(timeout * 1000))
        except KafkaError as e:
            return [], ([] if e.retriable else [e.errno])
        return [r.value for records in batches.values() for r in records], []

    def close(self):
        self.c.close()


def create_topics_at_broker(bootstrap: str, topics: list[str]) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive while its futures are used
    futures = admin.create_topics([NewTopic(t, 1, 1) for t in topics], operation_timeout=30)
    for f in futures.values():
        f.result(timeout=30)
    wait_for(lambda: set(topics) <= set(admin.list_topics(timeout=10).topics), 30, what="topics in metadata")


SENTINEL_PREFIX = b"__strait-authz-sentinel-"


def read_at_broker(bootstrap: str, topic: str, timeout: float = 30.0) -> list[bytes]:
    """Every record of partition 0 of `topic`, read straight from the broker (no edge).

    Tansu 0.6's high watermark counts batches, not records, so it cannot tell where the log ends: a
    sentinel record is produced directly first, and the log is read up to it. Anything the edge let
    through before this call precedes the sentinel. Sentinels are left out of the result.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
    sentinel = SENTINEL_PREFIX + uuid.uuid4().hex.encode()
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    p.produce(topic, value=sentinel, partition=0)
    assert p.flush(timeout) == 0, "sentinel not delivered"
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "strait-authz-check",
                  "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            if m.value() == sentinel:
                return [v for v in out if not (v or b"").startswith(SENTINEL_PREFIX)]
            out.append(m.value())
        raise AssertionError(f"sentinel not read back from {topic} within {timeout}s (read {len(out)})")
    finally:
        c.close()


def read_audit(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def parse_time(value: str) -> datetime:
    """RFC 3339 with `Z` and up to nanoseconds (Python's parser takes at most microseconds)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", value)
    assert m, f"not an RFC 3339 timestamp: {value!r}"
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}")
