"""The Java client (org.apache.kafka:kafka-clients) as a client library of the test suite.

One JVM per test session (`java_driver()`, started on first use, stopped at exit or by
`stop_java_driver()`) hosts every Java producer, consumer and admin client: JVM start costs about a
second and there are hundreds of tests. It runs `integration/jvm` (see Driver.java), built once per
change of its sources into ~/.cache/strait/jvm/<hash>/ and talked to in JSON lines over stdin/stdout.

`JavaClient` has the methods of `Confluent` and `KafkaPython` in clients.py, and takes their conf
keys too: confluent (librdkafka) names are translated to the Java client's (`java_conf`), kafka-python
snake_case names become the dotted Java names they were copied from. A key the Java client does not
know is refused by the driver rather than ignored.
"""

from __future__ import annotations

import atexit
import base64
import fcntl
import hashlib
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path

from .clients import Rec, unique
from .wait import wait_for

JVM_PROJECT = Path(__file__).resolve().parents[1] / "jvm"
CACHE = Path(os.environ.get("STRAIT_CACHE", Path.home() / ".cache/strait")) / "jvm"
JAR_NAME = "strait-java-driver.jar"
# Slack on top of a command's own timeout before the Python side gives up on an answer: the driver
# bounds every Kafka call by the timeout it is sent, so only a wedged JVM gets near this.
GRACE = 15.0


# ---- build


def _sources() -> list[Path]:
    return sorted([JVM_PROJECT / "pom.xml", *(p for p in (JVM_PROJECT / "src").rglob("*") if p.is_file())])


def sources_hash() -> str:
    h = hashlib.sha256()
    for p in _sources():
        h.update(str(p.relative_to(JVM_PROJECT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def driver_jar() -> Path:
    """`$STRAIT_JAVA_DRIVER_JAR`, else the cached build of the current sources (built when missing).

    The build runs in a copy of the project under the cache, so no `target/` appears in the repo, and
    under a lock, so parallel sessions build once."""
    explicit = os.environ.get("STRAIT_JAVA_DRIVER_JAR")
    if explicit:
        return Path(explicit)
    digest = sources_hash()
    jar = CACHE / digest / JAR_NAME
    if jar.is_file():
        return jar
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the holder's build is bounded by its mvn timeout
        if jar.is_file():
            return jar
        work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
        try:
            shutil.copy2(JVM_PROJECT / "pom.xml", work / "pom.xml")
            shutil.copytree(JVM_PROJECT / "src", work / "src")
            out = subprocess.run([_tool("mvn"), "-q", "-B", "-Dstyle.color=never", "package"], cwd=work,
                                 capture_output=True, text=True, timeout=900)
            built = work / "target" / "strait-java-driver-jar-with-dependencies.jar"
            if out.returncode != 0 or not built.is_file():
                raise RuntimeError(f"building the Java driver failed (mvn exit {out.returncode}):\n"
                                   f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
            jar.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built, jar)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return jar


def _tool(name: str) -> str:
    home = os.environ.get("JAVA_HOME")
    if name == "java" and home and (Path(home) / "bin/java").exists():
        return str(Path(home) / "bin/java")
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; run scripts/setup.sh")
    return found


# ---- the driver process


class JavaError(Exception):
    """A failed driver command: the Java exception class, the Kafka error name (broker errors) and message."""

    def __init__(self, op: str, error: dict):
        self.op = op
        self.cls = error.get("class")
        self.kafka_error = error.get("kafka_error")  # e.g. TOPIC_AUTHORIZATION_FAILED
        self.kafka_code = error.get("kafka_code")  # e.g. 29
        self.message = error.get("message")
        self.retriable = bool(error.get("retriable"))
        code = f" [{self.kafka_error}]" if self.kafka_error else ""
        super().__init__(f"{op}: {self.cls}{code}: {self.message}")


class JavaDriver:
    """A JVM running the driver. `jvm_args` go before `-jar` (e.g. `-Djdk.net.hosts.file=...`); a driver
    with its own arguments is the test's to stop, `java_driver()` is the session's shared one."""

    def __init__(self, jar: Path | None = None, start_timeout: float = 60.0, jvm_args: tuple[str, ...] = ()):
        self.log_path = Path(tempfile.gettempdir()) / f"strait-java-driver-{os.getpid()}-{int(time.time())}.log"
        self._log = open(self.log_path, "wb")
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}  # id -> [Event, answer]
        # Lines go out through a queue and one writer thread: SimpleQueue.put is safe to call from a
        # garbage-collection finalizer that interrupts a thread in the middle of sending.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        ready = self._expect(0)
        self.proc = subprocess.Popen(
            [_tool("java"), "-Xmx512m", "-XX:+UseSerialGC", *jvm_args, "-jar", str(jar or driver_jar())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        for target in (self._read, self._write):
            threading.Thread(target=target, name=f"java-driver{target.__name__}", daemon=True).start()
        self.info = self._await(0, ready, "start", start_timeout)

    def call(self, op: str, timeout: float = 30.0, **args):
        """Runs one command; the driver bounds it by `timeout`, this side by `timeout` + GRACE."""
        if not self.alive():
            raise RuntimeError(f"java driver exited (code {self.proc.poll()}) before {op}:\n{self.log_tail()}")
        cid = next(self._ids)
        slot = self._expect(cid)
        self._send({"id": cid, "op": op, "timeout_ms": int(timeout * 1000), **args})
        return self._await(cid, slot, op, timeout + GRACE)

    def call_nowait(self, op: str, **args) -> None:
        """Fire and forget (the answer is dropped): for closing clients from garbage-collection finalizers."""
        if self.alive():
            self._send({"id": -2, "op": op, **args})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self._send({"id": -3, "op": "shutdown"})
            self._outbox.put(None)  # then end of stdin
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        if self.log_path.exists() and self.log_path.stat().st_size == 0:
            self.log_path.unlink()  # a quiet session leaves nothing behind

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "".join(deque(open(self.log_path, errors="replace"), maxlen=lines))
        except OSError:
            return ""

    def _expect(self, cid: int) -> list:
        slot = [threading.Event(), None]
        self._waiting[cid] = slot
        return slot

    def _send(self, msg: dict) -> None:
        self._outbox.put((json.dumps(msg) + "\n").encode())

    def _write(self) -> None:
        try:
            while (line := self._outbox.get()) is not None:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass  # the JVM is gone: the reader sees end of its stdout and wakes every waiter

    def _await(self, cid: int, slot: list, op: str, timeout: float):
        answered = slot[0].wait(timeout)
        self._waiting.pop(cid, None)
        if not answered:
            raise TimeoutError(f"java driver: no answer to {op} within {timeout:.0f}s (log {self.log_path})")
        msg = slot[1]
        if msg is None:
            raise RuntimeError(f"java driver exited (code {self.proc.poll()}) during {op}:\n{self.log_tail()}")
        if not msg["ok"]:
            raise JavaError(op, msg["error"])
        return msg.get("result")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            slot = self._waiting.get(msg.get("id"))
            if slot is not None:
                slot[1] = msg
                slot[0].set()
        # EOF: the JVM is gone; wake every waiter (they see no answer).
        self.proc.wait()
        for slot in list(self._waiting.values()):
            slot[0].set()


_driver: JavaDriver | None = None
_driver_lock = threading.Lock()


def java_driver() -> JavaDriver:
    """The session's JVM, started on first use (restarted if it died)."""
    global _driver
    with _driver_lock:
        if _driver is None or not _driver.alive():
            _driver = JavaDriver()
            atexit.register(stop_java_driver)
        return _driver


def stop_java_driver() -> None:
    global _driver
    with _driver_lock:
        if _driver is not None:
            _driver.stop()
            _driver = None


# ---- configuration

# librdkafka names whose Java counterpart is named differently.
CONFLUENT_RENAMES = {
    "message.timeout.ms": "delivery.timeout.ms",
    "queue.buffering.max.ms": "linger.ms",
    "message.send.max.retries": "retries",
    "fetch.wait.max.ms": "fetch.max.wait.ms",
    "socket.timeout.ms": "request.timeout.ms",
    "topic.metadata.refresh.interval.ms": "metadata.max.age.ms",
    "compression.codec": "compression.type",
    "sasl.mechanisms": "sasl.mechanism",
}
# kafka-python names that are not simply Java's with `_` for `.`.
KAFKA_PYTHON_RENAMES = {
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
}
ASSIGNORS = {
    "range": "org.apache.kafka.clients.consumer.RangeAssignor",
    "roundrobin": "org.apache.kafka.clients.consumer.RoundRobinAssignor",
    "cooperative-sticky": "org.apache.kafka.clients.consumer.CooperativeStickyAssignor",
}


def java_conf(conf: dict, role: str) -> dict:
    """Client properties for the Java client from confluent-, kafka-python- or Java-style `conf`.

    `role` is producer, consumer or admin (librdkafka's `message.max.bytes` limits what a producer
    sends: Java's `max.request.size`). PEM files become the Java client's inline PEM key store (the
    Java client reads a PEM trust store from a file, but a PEM key store only inline or as one file
    with key and chain)."""
    out: dict = {}
    username = password = None
    for key, value in conf.items():
        if value is None:
            continue
        key = KAFKA_PYTHON_RENAMES.get(key, key)
        if "_" in key and "." not in key:
            key = key.replace("_", ".")
        key = CONFLUENT_RENAMES.get(key, key)
        if key == "message.max.bytes" and role == "producer":
            key = "max.request.size"
        if key == "ssl.ca.location":
            out.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": str(value)})
        elif key == "ssl.certificate.location":
            out.update({"ssl.keystore.type": "PEM", "ssl.keystore.certificate.chain": Path(value).read_text()})
        elif key == "ssl.key.location":
            out.update({"ssl.keystore.type": "PEM", "ssl.keystore.key": _pkcs8_pem(Path(value))})
        elif key == "ssl.check.hostname":
            if not value:
                out["ssl.endpoint.identification.algorithm"] = ""
        elif key == "ssl.endpoint.identification.algorithm" and value == "none":
            out[key] = ""
        elif key == "sasl.username":
            username = value
        elif key == "sasl.password":
            password = value
        elif key == "partition.assignment.strategy":
            out[key] = ",".join(ASSIGNORS.get(s.strip(), s.strip()) for s in str(value).split(","))
        else:
            out[key] = value
    if username is not None:
        mech = str(out.get("sasl.mechanism", "PLAIN")).upper()
        module = ("org.apache.kafka.common.security.plain.PlainLoginModule" if mech == "PLAIN"
                  else "org.apache.kafka.common.security.scram.ScramLoginModule")
        out["sasl.jaas.config"] = f'{module} required username="{_jaas(username)}" password="{_jaas(password or "")}";'
    return {k: (("true" if v else "false") if isinstance(v, bool) else v) for k, v in out.items()}


def _pkcs8_pem(path: Path) -> str:
    text = path.read_text()
    if "-----BEGIN PRIVATE KEY-----" not in text and "-----BEGIN ENCRYPTED PRIVATE KEY-----" not in text:
        raise ValueError(f"{path}: the Java client's PEM key store takes PKCS#8 keys only (BEGIN PRIVATE KEY); "
                         "convert with `openssl pkcs8 -topk8 -nocrypt`")
    return text


def _jaas(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"')


# ---- records


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


def _rec(r: dict) -> Rec:
    return Rec(_unb64(r["key"]), _unb64(r["value"]), [(k, _unb64(v)) for k, v in r["headers"]],
               r["partition"], r["offset"], r["topic"], r.get("timestamp"))


# ---- the client


class JavaClient:
    """The same operations as clients.Confluent / clients.KafkaPython, through the session's JVM.

    `common` conf (e.g. TLS settings) is applied to every client this object makes, admin included."""

    name = "java"
    codecs = ["none", "gzip", "snappy", "lz4", "zstd"]

    def __init__(self, bootstrap: str, driver: JavaDriver | None = None, **common):
        self.bootstrap = bootstrap
        self.driver = driver or java_driver()
        self.common = common
        self._admin_handle = None

    def _conf(self, role: str, base: dict, conf: dict) -> dict:
        return java_conf({"bootstrap.servers": self.bootstrap, **base, **self.common, **conf}, role)

    def _admin(self) -> int:
        if self._admin_handle is None:
            self._admin_handle = self.driver.call("admin.new", conf=self._conf("admin", {}, {}))
            weakref.finalize(self, self.driver.call_nowait, "close", handle=self._admin_handle)
        return self._admin_handle

    def create_topic(self, topic: str, partitions: int = 1, timeout: float = 30.0) -> None:
        self.driver.call("admin.create_topic", timeout, handle=self._admin(), topic=topic, partitions=partitions,
                         replication_factor=1)
        wait_for(lambda: self._writable(topic, partitions), timeout, what=f"{topic} metadata with leaders")

    def _writable(self, topic: str, partitions: int) -> bool:
        t = self.metadata([topic])["topics"].get(topic)
        return (t is not None and t["error"] is None and len(t["partitions"]) == partitions
                and not t.get("leaderless"))

    def metadata(self, topics: list[str] | None = None, timeout: float = 10.0) -> dict:
        """One Metadata request to the bootstrap server: {"brokers": [...], "topics": {name: {error, partitions}}}."""
        return self.driver.call("metadata", timeout, conf=self._conf("admin", {}, {}), topics=topics)

    def partitions(self, topic: str) -> list[int]:
        t = self.metadata([topic])["topics"].get(topic)
        if t is None or t["error"] is not None:
            return []
        return sorted(t["partitions"])

    def brokers(self) -> list[tuple[str, int]]:
        return sorted((b["host"], b["port"]) for b in self.metadata()["brokers"])

    def list_topics(self, timeout: float = 15.0) -> set[str]:
        """Every topic name the cluster shows this client (Admin.listTopics, internal topics included)."""
        return set(self.driver.call("admin.list_topics", timeout, handle=self._admin()))

    def described_brokers(self) -> list[tuple[str, int]]:
        """Brokers from DescribeCluster (Admin.describeCluster)."""
        nodes = self.driver.call("admin.describe_cluster", 15, handle=self._admin())
        return sorted((n["host"], n["port"]) for n in nodes)

    def coordinator(self, group: str) -> tuple[str, int]:
        n = self.driver.call("find_coordinator", 15, conf=self._conf("admin", {}, {}), group=group)
        return (n["host"], n["port"])

    def producer(self, **conf) -> "JavaProducer":
        # max.block.ms bounds send() waiting for metadata and the transaction calls: below the driver deadline.
        props = self._conf("producer", {"linger.ms": 5, "max.block.ms": 30000}, conf)
        return JavaProducer(self.driver, self.driver.call("producer.new", conf=props),
                            int(props["max.block.ms"]) / 1000)

    def produce(self, topic: str, records: list[Rec], timeout: float = 30.0, **conf) -> list[Rec]:
        p = self.producer(**conf)
        try:
            return p.send_all(topic, records, timeout)
        finally:
            p.close()

    def consumer(self, topic: str | list[str], group: str | None = None, **conf) -> "JavaConsumer":
        base = {"group.id": group or unique("g"), "auto.offset.reset": "earliest", "enable.auto.commit": False}
        # The KIP-848 protocol refuses the classic group's session timeout (the broker owns it there).
        if str(conf.get("group.protocol", conf.get("group_protocol", "classic"))).lower() != "consumer":
            base["session.timeout.ms"] = 10000
        topics = [topic] if isinstance(topic, str) else list(topic)
        h = self.driver.call("consumer.new", conf=self._conf("consumer", base, conf), topics=topics)
        return JavaConsumer(self.driver, h)

    def assigned_consumer(self, partitions: list[tuple[str, int]], group: str | None = None,
                          seek_to_beginning: bool = True, **conf) -> "JavaConsumer":
        """A consumer assigned `partitions` (no group protocol; without `group` no coordinator either),
        reading from the beginning (seekToBeginning) unless told otherwise."""
        base = {"auto.offset.reset": "earliest", "enable.auto.commit": False}
        if group is not None:
            base["group.id"] = group
        h = self.driver.call("consumer.new", conf=self._conf("consumer", base, conf),
                             assign=[{"topic": t, "partition": p} for t, p in partitions],
                             seek_to_beginning=seek_to_beginning)
        return JavaConsumer(self.driver, h)


class _Handle:
    """A driver-side client; closed when the wrapper is garbage-collected if the test did not close it
    (scenarios often write `c.consumer(topic).take(n)`), so a long session does not pile up JVM clients."""

    def __init__(self, driver: JavaDriver, handle: int):
        self.driver = driver
        self.handle = handle
        self._finalizer = weakref.finalize(self, driver.call_nowait, "close", handle=handle)

    def _call(self, op: str, timeout: float = 30.0, **args):
        return self.driver.call(op, timeout, handle=self.handle, **args)

    def close(self, timeout: float = 10.0) -> None:
        if self._finalizer.detach():
            self._call("close", timeout)


class JavaProducer(_Handle):
    def __init__(self, driver: JavaDriver, handle: int, block_timeout: float):
        super().__init__(driver, handle)
        self.block_timeout = block_timeout

    def send_results(self, topic: str, records: list[Rec], timeout: float = 30.0) -> list[Rec | JavaError]:
        """Sends all, waits for each acknowledgement: a Rec (with partition/offset) or a JavaError per record.

        A record's own `topic` overrides `topic` (one call may name several topics, so the client may put
        them in one Produce request); its `timestamp` is sent as CreateTime."""
        wire = [{"key": _b64(r.key), "value": _b64(r.value), "partition": r.partition, "topic": r.topic,
                 "timestamp": r.timestamp, "headers": [[k, _b64(v)] for k, v in (r.headers or [])]}
                for r in records]
        out = []
        for r, res in zip(records, self._call("producer.send", timeout, topic=topic, records=wire)):
            if "error" in res:
                out.append(JavaError("send", res["error"]))
            else:
                out.append(Rec(r.key, r.value, list(r.headers or []), res["partition"], res["offset"], res["topic"],
                               r.timestamp))
        return out

    def send_all(self, topic: str, records: list[Rec], timeout: float = 30.0) -> list[Rec]:
        """Produce and wait for every acknowledgement; returns records with partition/offset; raises on error."""
        results = self.send_results(topic, records, timeout)
        errors = [r for r in results if isinstance(r, JavaError)]
        if errors:
            raise AssertionError(f"{len(errors)} delivery errors, first: {errors[0]}")
        return results

    # Transactions (needs `transactional.id`). The Java calls take no timeout: each blocks at most the
    # producer's max.block.ms, so that (or a longer `timeout`) is how long this side waits.
    def _txn(self, op: str, timeout: float | None, **args) -> None:
        self._call(op, max(timeout or 0, self.block_timeout), **args)

    def init_transactions(self, timeout: float | None = None) -> None:
        self._txn("producer.init_transactions", timeout)

    def begin_transaction(self) -> None:
        self._txn("producer.begin_transaction", None)

    def commit_transaction(self, timeout: float | None = None) -> None:
        self._txn("producer.commit_transaction", timeout)

    def abort_transaction(self, timeout: float | None = None) -> None:
        self._txn("producer.abort_transaction", timeout)

    def send_offsets_to_transaction(self, offsets: dict[tuple[str, int], int], group: str,
                                    timeout: float | None = None) -> None:
        """Commit `group`'s offsets ({(topic, partition): next offset}) with the open transaction."""
        self._txn("producer.send_offsets", timeout, group=group,
                  offsets=[{"topic": t, "partition": p, "offset": o} for (t, p), o in offsets.items()])


class JavaConsumer(_Handle):
    def poll(self, timeout: float = 0.2) -> list[Rec]:
        return [_rec(r) for r in self._call("consumer.poll", timeout)]

    def take(self, n: int, timeout: float = 30.0, settle: float = 0.0) -> list[Rec]:
        """Poll until `n` records arrived (then keep polling `settle` seconds to catch extras)."""
        out: list[Rec] = []
        deadline = time.monotonic() + timeout
        extra_until = None
        while time.monotonic() < deadline:
            if len(out) >= n:
                if extra_until is None:
                    extra_until = time.monotonic() + settle
                if time.monotonic() >= extra_until:
                    break
            out.extend(self.poll(0.2))
        if len(out) < n:
            raise AssertionError(f"consumed {len(out)} of {n} records within {timeout}s")
        return out

    def assignment(self) -> set[tuple[str, int]]:
        """The partitions the group gave this member (as of its last poll)."""
        return {(a["topic"], a["partition"]) for a in self._call("consumer.assignment", 10)}

    def commit(self, timeout: float = 30.0) -> None:
        self._call("consumer.commit", timeout)
