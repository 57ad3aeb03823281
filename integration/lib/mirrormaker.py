"""MirrorMaker 2 (Apache Kafka 4.1) between two clusters, plus the helpers a replication test needs.

`MirrorMaker(source, target, log_dir, ...)` runs the real thing: `org.apache.kafka.connect.mirror.MirrorMaker`
in dedicated mode, from the jars scripts/setup.sh resolved (connect-mirror, connect-runtime), with a
generated `mm2.properties`. Clusters are aliased `east` (source) and `west` (target); `east->west` is
enabled, `west->east` is disabled and, with `west->east.emit.heartbeats.enabled=false`, gets no herder
at all (MM2 otherwise starts a herder for every pair, only to emit heartbeats). One JVM, one
Connect worker for `east->west` whose internal topics live on west (`mm2-configs|offsets|status.east.internal`).

Replication policy: the default (`DefaultReplicationPolicy`) names the copy `east.<topic>`;
`identity=True` sets `replication.policy.class=org.apache.kafka.connect.mirror.IdentityReplicationPolicy`
(names kept). Key, value and header converters are `ByteArrayConverter`, so records are copied byte for
byte: key, value (null stays null), headers in order, CreateTime timestamps, and the partition number.

Tuned for tests (MM2's defaults are in minutes):
  refresh.topics.interval.seconds=1       new source topics picked up within a second (default 600)
  refresh.groups.interval.seconds=1       new consumer groups picked up within a second (default 600)
  emit.checkpoints.interval.seconds=1     checkpoints to `east.checkpoints.internal` (default 60)
  sync.group.offsets.enabled=true         translated offsets committed to the target group (default false)
  sync.group.offsets.interval.seconds=1   (default 60)
  offset.lag.max=0                        an offset sync for every record (default 100); the 4.1 name is
                                          unchanged, and `emit.offset-syncs.enabled` (default true) gates it
  west.offset.flush.interval.ms=1000      the Connect worker's offset commit, which also flushes delayed
                                          offset syncs (default 60 s; a worker setting, so it is only
                                          honoured under the target cluster's prefix in dedicated mode)
  replication.factor=1 and every internal topic's factor 1 (offset-syncs, checkpoints, heartbeats,
  config/offset/status storage): single-node clusters (MM2's defaults are 2 and 3)
  tasks.max=1, sync.topic.acls.enabled=false (the test brokers have no authorizer), -Xmx384m.

Topic filter: `topics` is the caller's regex; MM2's `topics.exclude` default is kept. In 4.1 that default is
`mm2.*\\.internal, .*\\.replica, __.*` (KIP-1074; before 4.0 it was `.*[\\-\\.]internal, .*\\.replica, __.*`,
so a user topic like `orders.internal` is replicated now). Whatever the filters say, the replication
policy's own internal topics (names starting `__` or `.`, `mm2*.internal`, `*.checkpoints.internal`) are
never replicated. Groups: `groups` regex, with MM2's `groups.exclude` default
(`console-consumer-.*, connect-.*, __.*`).

Other helpers (confluent-kafka, no deserialization anywhere):
  read_records(bootstrap, topic)           every record of a topic, per partition in offset order
  count_records(bootstrap, topic)          sum over partitions of end offset minus start offset
  wait_mirrored(target, topic, count)      waits (a condition with a deadline) until the topic holds `count`
  copy_topic(src, topic, dst, new_topic)   a simple replication tool: consume raw, re-produce in new batches
  checkpoints(target, source_alias)        MM2's checkpoint records, decoded (Checkpoint.java's schema)
"""

from __future__ import annotations

import re
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .kafka import _log4j_config, classpath, java_bin
from .procs import Proc

SOURCE_ALIAS = "east"
TARGET_ALIAS = "west"
IDENTITY_POLICY = "org.apache.kafka.connect.mirror.IdentityReplicationPolicy"
BYTE_ARRAY_CONVERTER = "org.apache.kafka.connect.converters.ByteArrayConverter"
# The east->west herder is up: its Connect worker joined its group and read its config topic
# (`[Worker clientId=east->west, groupId=east-mm2] Herder started`, about 5 s after the JVM starts).
_HERDER_STARTED = re.compile(r"clientId=east->west, groupId=[^\]]*\] Herder started")
_SOURCE_CONNECTOR_CREATED = re.compile(r"Finished creating connector MirrorSourceConnector")
# Errors MM2 logs and survives, after which it replicates nothing (or no more): see MirrorMaker.check.
_FATAL = re.compile(r"ERROR (Failed to configure \S+ connector|.*Task threw an uncaught and unrecoverable"
                    r"|.*Failed to start connector|.*Uncaught exception in herder work thread)")


def _bootstrap(cluster) -> str:
    return cluster if isinstance(cluster, str) else cluster.bootstrap


class MirrorMakerDied(RuntimeError):
    pass


class MirrorMaker:
    """MM2 in dedicated mode replicating `east` (source) to `west` (target); see the module docstring.

    `extra` is added to mm2.properties last (so it overrides anything), e.g. `{"offset.lag.max": "100"}`
    or flow-scoped keys like `{"east->west.topics.exclude": "__.*"}`. `fail_on_errors=False` stops
    `check()` from treating MM2's own fatal ERROR lines as a failure (a scenario that provokes them).
    """

    def __init__(self, source, target, log_dir: Path, topics: str = ".*", identity: bool = False,
                 groups: str = ".*", extra: dict | None = None, heap: str = "384m", name: str = "mm2",
                 fail_on_errors: bool = True):
        self.source_bootstrap = _bootstrap(source)
        self.target_bootstrap = _bootstrap(target)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.topics = topics
        self.identity = identity
        self.groups = groups
        self.extra = dict(extra or {})
        self.name = name
        self.config_path = self.log_dir / f"{name}.properties"
        argv = [java_bin(), f"-Xms{heap}", f"-Xmx{heap}", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                "-Xshare:auto", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={_log4j_config('INFO')}",
                "-cp", classpath(), "org.apache.kafka.connect.mirror.MirrorMaker", str(self.config_path)]
        self.proc = Proc(name, argv, self.log_dir)
        self.fail_on_errors = fail_on_errors
        self.started_at: float | None = None
        self.startup_seconds: float | None = None
        self._scan_pos = 0

    # ---- configuration

    def remote_topic(self, topic: str) -> str:
        """The name `topic` gets at the target under this instance's replication policy."""
        return topic if self.identity else f"{SOURCE_ALIAS}.{topic}"

    def properties(self) -> dict[str, str]:
        s, t = SOURCE_ALIAS, TARGET_ALIAS
        props = {
            "clusters": f"{s}, {t}",
            f"{s}.bootstrap.servers": self.source_bootstrap,
            f"{t}.bootstrap.servers": self.target_bootstrap,
            f"{s}->{t}.enabled": "true",
            f"{t}->{s}.enabled": "false",
            # Without this MM2 still starts a west->east herder (and its internal topics on east) to emit
            # heartbeats into east.
            f"{t}->{s}.emit.heartbeats.enabled": "false",
            "topics": self.topics,
            "groups": self.groups,
            "tasks.max": "1",
            "key.converter": BYTE_ARRAY_CONVERTER,
            "value.converter": BYTE_ARRAY_CONVERTER,
            "header.converter": BYTE_ARRAY_CONVERTER,
            # Single-node clusters: every topic MM2 creates with replication factor 1.
            "replication.factor": "1",
            "offset-syncs.topic.replication.factor": "1",
            "checkpoints.topic.replication.factor": "1",
            "heartbeats.topic.replication.factor": "1",
            "config.storage.replication.factor": "1",
            "offset.storage.replication.factor": "1",
            "status.storage.replication.factor": "1",
            # Intervals for tests (see the module docstring).
            "refresh.topics.interval.seconds": "1",
            "refresh.groups.interval.seconds": "1",
            "emit.checkpoints.interval.seconds": "1",
            "emit.heartbeats.interval.seconds": "1",
            "sync.group.offsets.enabled": "true",
            "sync.group.offsets.interval.seconds": "1",
            "offset.lag.max": "0",
            f"{t}.offset.flush.interval.ms": "1000",
            "sync.topic.acls.enabled": "false",
            "task.shutdown.graceful.timeout.ms": "3000",
        }
        if self.identity:
            props["replication.policy.class"] = IDENTITY_POLICY
        props.update({k: str(v) for k, v in self.extra.items()})
        return props

    # ---- lifecycle

    def start(self, timeout: float = 60.0) -> "MirrorMaker":
        """Writes mm2.properties, starts the JVM and waits until the east->west herder is up and has
        created MirrorSourceConnector (about 5 s here); not until anything is replicated: use
        `wait_mirrored` for that. A JVM that exits or a connector MM2 rejects fails here, with the log."""
        self.config_path.write_text(
            "# generated by integration/lib/mirrormaker.py\n"
            + "".join(f"{k} = {v}\n" for k, v in self.properties().items()))
        self.started_at = time.monotonic()
        self._scan_pos = 0
        self.proc.start()
        try:
            self.wait_log(_HERDER_STARTED, timeout, what="the east->west herder started")
            self.wait_log(_SOURCE_CONNECTOR_CREATED, timeout, what="MirrorSourceConnector created")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - self.started_at
        return self

    def alive(self) -> bool:
        return self.proc.alive()

    def check(self) -> None:
        """Raises MirrorMakerDied with the log tail when the JVM has exited, or when MM2 logged one of
        the errors it survives but cannot replicate after (`_FATAL`: a connector configuration it refused,
        a task that died). MM2 keeps running in both cases, so waiting on records alone would only time out."""
        if self.proc.popen is None:
            return
        if not self.proc.alive():
            raise MirrorMakerDied(f"MirrorMaker exited with {self.proc.popen.returncode}; "
                                  f"log {self.proc.log_path}:\n{self.proc.tail(60)}")
        if not self.fail_on_errors or self.proc.log_path is None:
            return
        with open(self.proc.log_path, "rb") as f:
            f.seek(self._scan_pos)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # only whole lines; a partial one is read again next time
        text = chunk[:end].decode(errors="replace")
        m = _FATAL.search(text)
        if m:
            lines = text[m.start():].splitlines()[:12]
            raise MirrorMakerDied(f"MirrorMaker (pid {self.proc.pid}) logged a fatal error; "
                                  f"log {self.proc.log_path}:\n" + "\n".join(lines))
        self._scan_pos += end

    def log_text(self) -> str:
        return self.proc.current_log()

    def wait_log(self, pattern, timeout: float = 60.0, what: str | None = None) -> re.Match:
        """Waits for a log line matching `pattern` (the process dying fails at once, with the tail)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        return poll(lambda: rx.search(self.log_text()), timeout, what or f"/{rx.pattern}/ in the MM2 log",
                    mirror=self)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (MM2's shutdown hook stops the herders), SIGKILL after `timeout`."""
        if self.proc.popen is None:
            return None
        return self.proc.stop(timeout=timeout)

    def kill(self) -> None:
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def __enter__(self) -> "MirrorMaker":
        return self.start() if self.proc.popen is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- waiting

def poll(condition, timeout: float, what: str, mirror: MirrorMaker | None = None, interval: float = 0.25,
         describe=None):
    """Polls `condition()` until truthy and returns it. Unlike wait.wait_for, a dead MirrorMaker fails at
    once (with its log tail) instead of at the deadline. `describe()` adds the state to a timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        if mirror is not None:
            mirror.check()
        try:
            value = condition()
            if value:
                return value
        except (MirrorMakerDied, AssertionError):
            raise
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        if time.monotonic() >= deadline:
            state = f": {describe()}" if describe else ""
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{state}{detail}")
        time.sleep(interval)


# ---- reading topics raw

@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_type: int  # confluent_kafka.TIMESTAMP_CREATE_TIME (1) / TIMESTAMP_LOG_APPEND_TIME (2)
    timestamp: int

    def content(self) -> tuple:
        """What a faithful copy keeps: everything but the offset."""
        return (self.partition, self.key, self.value, self.headers, self.timestamp_type, self.timestamp)


def _partitions(client, topic: str, timeout: float = 10.0) -> list[int] | None:
    """Partition ids of `topic`, or None if the cluster does not know it."""
    md = client.list_topics(topic=topic, timeout=timeout)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return None
    return sorted(t.partitions)


def _consumer(bootstrap: str, **conf):
    from confluent_kafka import Consumer
    base = {"bootstrap.servers": bootstrap, "group.id": "strait-mm2-harness-reader",
            "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest",
            "fetch.max.bytes": 16 * 1024 * 1024, "max.partition.fetch.bytes": 8 * 1024 * 1024,
            "isolation.level": "read_uncommitted"}
    base.update(conf)
    return Consumer(base)


def _raw(msg) -> Record:
    ts_type, ts = msg.timestamp()
    return Record(msg.partition(), msg.offset(), msg.key(), msg.value(),
                  tuple((k, v) for k, v in (msg.headers() or [])), ts_type, ts)


def iter_records(bootstrap: str, topic: str, timeout: float = 60.0):
    """Yields every record of `topic` (from each partition's start to its end offset at the time of the
    call), raw bytes, partition by partition interleaved as fetched; per partition in offset order.
    The end of a partition is librdkafka's partition-EOF event, so transaction markers do not stall it."""
    from confluent_kafka import KafkaError, TopicPartition
    consumer = _consumer(bootstrap)
    try:
        parts = _partitions(consumer, topic)
        if parts is None:
            raise LookupError(f"topic {topic!r} does not exist at {bootstrap}")
        ends, assign = {}, []
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assign.append(TopicPartition(topic, p, low))
        if not assign:
            return
        consumer.assign(assign)
        pending = set(ends)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"reading {topic} at {bootstrap}: partitions {sorted(pending)} did not reach "
                                   f"their end offsets {[ends[p] for p in sorted(pending)]} in {timeout:.0f}s")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    if msg.offset() >= ends.get(msg.partition(), 0):
                        pending.discard(msg.partition())
                    continue
                raise RuntimeError(f"reading {topic} at {bootstrap}: {msg.error()}")
            if msg.offset() < ends[msg.partition()]:
                yield _raw(msg)
            if msg.offset() + 1 >= ends[msg.partition()]:
                pending.discard(msg.partition())
    finally:
        consumer.close()


def read_records(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Record]:
    """Every record of `topic`, sorted by (partition, offset)."""
    return sorted(iter_records(bootstrap, topic, timeout), key=lambda r: (r.partition, r.offset))


def partition_counts(bootstrap: str, topic: str, consumer=None) -> dict[int, int] | None:
    """partition -> end offset minus start offset, or None when the topic does not exist."""
    from confluent_kafka import TopicPartition
    own = consumer is None
    consumer = consumer or _consumer(bootstrap)
    try:
        parts = _partitions(consumer, topic)
        if parts is None:
            return None
        counts = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            counts[p] = high - low
        return counts
    finally:
        if own:
            consumer.close()


def count_records(bootstrap: str, topic: str) -> int:
    """Sum over partitions of end offset minus start offset (0 when the topic does not exist)."""
    return sum((partition_counts(bootstrap, topic) or {}).values())


def wait_mirrored(target_bootstrap: str, topic: str, count: int, timeout: float = 60.0,
                  mirror: MirrorMaker | None = None) -> dict[int, int]:
    """Waits until `topic` at the target holds `count` records (sum of end minus start offsets) and returns
    the per-partition counts. More than `count` fails at once (MM2 duplicated records). With `mirror`, a
    MirrorMaker that dies fails at once with its log tail."""
    consumer = _consumer(target_bootstrap)
    seen: dict = {"counts": None}

    def reached():
        counts = partition_counts(target_bootstrap, topic, consumer)
        seen["counts"] = counts
        total = sum((counts or {}).values())
        if total > count:
            raise AssertionError(f"{topic} at {target_bootstrap} holds {total} records, more than the {count} "
                                 f"expected (per partition {counts})")
        return counts if total == count else None

    def state():
        counts = seen["counts"]
        if counts is None:
            return f"topic {topic} does not exist at {target_bootstrap} (0 of {count} records)"
        return (f"{topic} at {target_bootstrap} holds {sum(counts.values())} of {count} records "
                f"(per partition {counts})")

    try:
        return poll(reached, timeout, f"{count} records in {topic} at {target_bootstrap}", mirror=mirror,
                    describe=state)
    finally:
        consumer.close()


# ---- a simple replication tool

def copy_topic(source_bootstrap: str, topic: str, target_bootstrap: str, new_topic: str, *,
               keep_partitions: bool = True, create: bool = True, linger_ms: int = 0,
               batch_records: int = 7, compression: str = "lz4", timeout: float = 120.0) -> int:
    """Copies every record of `topic` (source) to `new_topic` (target) the way a simple replication tool
    does: consumed raw (no deserialization) and re-produced with the same key, value (null stays null),
    headers (order, duplicates and null values kept) and timestamp (sent as CreateTime), in batches of its
    own (`batch_records`, `linger_ms`, `compression`: deliberately unlike a normal producer's, so nothing
    of the original batches survives but the records). With `keep_partitions` every record goes to the
    partition number it had (per-partition order kept); else the key decides. `create` makes `new_topic`
    with the source's partition count (broker default replication factor). Returns the number copied."""
    from confluent_kafka import KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    probe = _consumer(source_bootstrap)
    try:
        parts = _partitions(probe, topic)
    finally:
        probe.close()
    if parts is None:
        raise LookupError(f"topic {topic!r} does not exist at {source_bootstrap}")
    if create:
        admin = AdminClient({"bootstrap.servers": target_bootstrap})
        fut = admin.create_topics([NewTopic(new_topic, num_partitions=len(parts), replication_factor=-1)],
                                  operation_timeout=30)[new_topic]
        fut.result(timeout=60)
        poll(lambda: _partitions(admin, new_topic) == parts, 30, f"{new_topic} with partitions {parts}")

    errors: list = []
    delivered = [0]

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(err)
        else:
            delivered[0] += 1

    producer = Producer({
        "bootstrap.servers": target_bootstrap, "acks": "all", "enable.idempotence": True,
        "linger.ms": linger_ms, "batch.num.messages": batch_records, "compression.type": compression,
        "message.max.bytes": 8 * 1024 * 1024,
    })
    sent = 0
    for rec in iter_records(source_bootstrap, topic, timeout):
        kwargs = {"key": rec.key, "value": rec.value, "on_delivery": on_delivery}
        if rec.headers:
            kwargs["headers"] = list(rec.headers)
        if rec.timestamp_type != 0:  # TIMESTAMP_NOT_AVAILABLE
            kwargs["timestamp"] = rec.timestamp
        if keep_partitions:
            kwargs["partition"] = rec.partition
        while True:
            try:
                producer.produce(new_topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
            except KafkaException as e:
                raise RuntimeError(f"copy {topic} -> {new_topic}: {e}") from e
        sent += 1
        producer.poll(0)
    left = producer.flush(timeout)
    if left or errors or delivered[0] != sent:
        raise RuntimeError(f"copy {topic} -> {new_topic}: {sent} sent, {delivered[0]} delivered, {left} "
                           f"undelivered after {timeout:.0f}s, errors {errors[:5]}")
    return sent


# ---- MM2 checkpoints

def checkpoints_topic(source_alias: str = SOURCE_ALIAS) -> str:
    """Where MM2 writes checkpoints at the target (the same under the default and the identity policy)."""
    return f"{source_alias}.checkpoints.internal"


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    """Kafka protocol Type.STRING: int16 length, then UTF-8 (never null)."""
    (n,) = struct.unpack_from(">h", buf, pos)
    if n < 0:
        raise ValueError(f"null STRING at byte {pos}")
    pos += 2
    if pos + n > len(buf):
        raise ValueError(f"STRING of {n} bytes at {pos} runs past the end ({len(buf)} bytes)")
    return buf[pos:pos + n].decode("utf-8"), pos + n


def decode_checkpoint(key: bytes, value: bytes) -> dict:
    """One checkpoint record, as Checkpoint.java writes it:
    key   = struct{group: STRING, topic: STRING, partition: INT32}
    value = header struct{version: INT16} then (version 0) struct{upstreamOffset: INT64, offset: INT64,
            metadata: STRING}; `offset` is the downstream (target) offset.
    Strict: any other version or trailing bytes raise ValueError."""
    group, pos = _string(key, 0)
    topic, pos = _string(key, pos)
    (partition,) = struct.unpack_from(">i", key, pos)
    if pos + 4 != len(key):
        raise ValueError(f"checkpoint key has {len(key) - pos - 4} trailing bytes")
    (version,) = struct.unpack_from(">h", value, 0)
    if version != 0:
        raise ValueError(f"checkpoint value version {version}; only version 0 is known")
    upstream, downstream = struct.unpack_from(">qq", value, 2)
    metadata, pos = _string(value, 18)
    if pos != len(value):
        raise ValueError(f"checkpoint value has {len(value) - pos} trailing bytes")
    return {"group": group, "topic": topic, "partition": partition, "upstream_offset": upstream,
            "downstream_offset": downstream, "metadata": metadata, "version": version}


def checkpoints(target_bootstrap: str, source_alias: str = SOURCE_ALIAS, timeout: float = 30.0) -> list[dict]:
    """Every record of `<source_alias>.checkpoints.internal` at the target, decoded, in offset order (the
    topic has one partition). Each dict: group, topic (the TARGET-side name, e.g. `east.orders`), partition,
    upstream_offset (the group's committed offset at the source), downstream_offset (its translation at
    the target), metadata, version, plus offset and timestamp of the checkpoint record itself.
    An absent topic gives []."""
    topic = checkpoints_topic(source_alias)
    try:
        records = read_records(target_bootstrap, topic, timeout)
    except LookupError:
        return []
    out = []
    for r in records:
        if r.value is None:  # a tombstone in the compacted topic: no checkpoint
            continue
        d = decode_checkpoint(r.key, r.value)
        d.update(offset=r.offset, timestamp=r.timestamp)
        out.append(d)
    return out


def latest_checkpoints(target_bootstrap: str, source_alias: str = SOURCE_ALIAS,
                       group: str | None = None) -> dict[tuple[str, str, int], dict]:
    """The newest checkpoint per (group, topic, partition), optionally of one group."""
    latest = {}
    for c in checkpoints(target_bootstrap, source_alias):
        if group is None or c["group"] == group:
            latest[(c["group"], c["topic"], c["partition"])] = c
    return latest
