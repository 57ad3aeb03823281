"""Apache Kafka (KRaft) clusters on loopback, from the jars scripts/setup.sh resolved from Maven Central.

Every node is a combined controller+broker (`process.roles=broker,controller`) with its own ports and
data directory; the harness formats the storage itself (`kafka.tools.StorageTool format`) and waits on
conditions, never on fixed sleeps: every node answers ApiVersions, then metadata lists every broker.

Listeners per node (all on 127.0.0.1):
  PLAINTEXT       always; the harness' own admin traffic and inter-broker replication use it
  CONTROLLER      the KRaft quorum
  SASL_PLAINTEXT  when `sasl=` names mechanisms (PLAIN users from `users`, SCRAM users added at format)
  SSL             when `tls=` is given: a server cert/key (PEM) and optionally a client CA (mTLS required)

With `acls=True` the StandardAuthorizer is on with deny-by-default; ANONYMOUS (the PLAINTEXT listener,
i.e. the harness and replication) and `User:admin` are super users, everyone else needs ACLs.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .kafka_wire import answers_api_versions
from .ports import free_range
from .procs import Proc
from .wait import wait_for

KAFKA_POM = Path(__file__).resolve().parents[1] / "kafka" / "pom.xml"


def kafka_version() -> str:
    m = re.search(r"<kafka.version>([^<]+)</kafka.version>", KAFKA_POM.read_text())
    assert m, f"no kafka.version in {KAFKA_POM}"
    return m.group(1)


def kafka_libs() -> Path:
    """`$STRAIT_KAFKA_LIBS`, else the folder scripts/setup.sh fills: ~/.cache/strait/kafka/<v>/libs."""
    explicit = os.environ.get("STRAIT_KAFKA_LIBS")
    libs = Path(explicit) if explicit else Path.home() / ".cache/strait/kafka" / kafka_version() / "libs"
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise FileNotFoundError(f"Apache Kafka jars not found in {libs}; run scripts/setup.sh")
    return libs


def java_bin() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin/java").exists():
        return str(Path(home) / "bin/java")
    found = shutil.which("java")
    if not found:
        raise FileNotFoundError("java not found; run scripts/setup.sh")
    return found


def classpath() -> str:
    return f"{kafka_libs()}/*"


# Short-lived tools and test brokers start faster with the client JIT only and class data sharing; a
# benchmark's brokers pass `jvm=BENCH_JVM` (the full JIT, and the heap settings Kafka's scripts use).
FAST_START_JVM = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xshare:auto")
BENCH_JVM = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35")


def java_tool(main_class: str, *args: str, heap: str = "256m", jvm: tuple[str, ...] = ()) -> list[str]:
    """argv running one of Kafka's tool classes (the Maven jars ship no shell scripts)."""
    return [java_bin(), f"-Xmx{heap}", *jvm, f"-Dlog4j2.configurationFile={_log4j_config('WARN')}",
            "-cp", classpath(), main_class, *args]


_LOG4J: dict[str, Path] = {}


def _log4j_config(level: str) -> Path:
    """A log4j2 properties file (native to log4j2; the YAML format would need Jackson on the classpath)."""
    if level not in _LOG4J:
        path = Path(tempfile.gettempdir()) / f"strait-kafka-log4j2-{level.lower()}.properties"
        path.write_text(
            "status = warn\n"
            "appender.out.type = Console\n"
            "appender.out.name = OUT\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            f"rootLogger.level = {level}\n"
            "rootLogger.appenderRef.out.ref = OUT\n"
            # Per-partition state changes and log segment chatter drown the lines that matter.
            "logger.state.name = state.change.logger\nlogger.state.level = WARN\n"
            "logger.log.name = kafka.log\nlogger.log.level = WARN\n"
            "logger.clients.name = org.apache.kafka.clients\nlogger.clients.level = WARN\n"
        )
        _LOG4J[level] = path
    return _LOG4J[level]


def random_cluster_id() -> str:
    """What `kafka-storage random-uuid` prints: 16 random bytes, URL-safe base64 without padding (and,
    like Kafka's own, never starting with '-', which argument parsers would read as an option)."""
    while True:
        text = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


@dataclass
class Sasl:
    """SASL listener settings. `users` maps user name to password for every mechanism."""
    mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
    users: dict[str, str] = field(default_factory=lambda: {"admin": "admin-secret"})


@dataclass
class BrokerTls:
    """SSL listener settings: PEM server certificate and key; `client_ca` makes client certs required."""
    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    sasl_port: int | None
    ssl_port: int | None
    data_dir: Path
    config_path: Path
    proc: Proc

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class KafkaCluster:
    """`brokers` combined KRaft nodes; `stop()` tears every one down and removes the data dirs. Their node
    ids are `first_node_id`, `first_node_id + 1`, ... (1, 2, 3 by default): a standby whose brokers have other
    ids than the primary's is `first_node_id=4`."""

    def __init__(self, log_dir: Path, brokers: int = 1, name: str = "kafka", sasl: Sasl | None = None,
                 tls: BrokerTls | None = None, acls: bool = False, heap: str = "512m",
                 config: dict | None = None, jvm: tuple[str, ...] = FAST_START_JVM, first_node_id: int = 1):
        self.log_dir = Path(log_dir)
        self.name = name
        self.size = brokers
        self.first_node_id = first_node_id
        self.sasl = sasl
        self.tls = tls
        self.acls = acls
        self.heap = heap
        self.extra = config or {}
        self.cluster_id = random_cluster_id()
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"strait-{name}-"))
        self._jvm = jvm
        self.nodes: list[KafkaNode] = []
        self._plan_nodes()

    def _plan_nodes(self) -> None:
        """Ports, data dirs and argv for every node (again, on fresh ports, after a port clash)."""
        brokers, sasl, tls, heap, jvm, name = self.size, self.sasl, self.tls, self.heap, self._jvm, self.name
        per_node = 2 + (1 if sasl else 0) + (1 if tls else 0)
        ports = iter(free_range(per_node * brokers))
        self.nodes = []
        for i in range(brokers):
            node_id = self.first_node_id + i
            port, cport = next(ports), next(ports)
            sasl_port = next(ports) if sasl else None
            ssl_port = next(ports) if tls else None
            data = self.base_dir / f"node-{node_id}"
            cfg = self.base_dir / f"node-{node_id}.properties"
            argv = [java_bin(), f"-Xms{heap}", f"-Xmx{heap}", *jvm, "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={_log4j_config('INFO')}",
                    "-cp", classpath(), "kafka.Kafka", str(cfg)]
            proc = Proc(f"{name}-{node_id}", argv, self.log_dir)
            self.nodes.append(KafkaNode(node_id, port, cport, sasl_port, ssl_port, data, cfg, proc))

    # ---- addresses

    @property
    def bootstrap(self) -> str:
        """PLAINTEXT bootstrap list (comma-separated), as clients and `upstream.bootstrap_servers` take it."""
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def bootstrap_servers(self) -> list[str]:
        return [n.bootstrap for n in self.nodes]

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        """The first node's PLAINTEXT port (what a single-node scenario calls "the broker's port")."""
        return self.nodes[0].port

    @property
    def sasl_bootstrap_servers(self) -> list[str]:
        return [f"127.0.0.1:{n.sasl_port}" for n in self.nodes]

    @property
    def ssl_bootstrap_servers(self) -> list[str]:
        return [f"127.0.0.1:{n.ssl_port}" for n in self.nodes]

    def broker_ports(self) -> set[int]:
        """Every client-facing port of every broker: a client through the edge must reach none of them."""
        ports = set()
        for n in self.nodes:
            ports |= {p for p in (n.port, n.sasl_port, n.ssl_port) if p}
        return ports

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    # ---- configuration

    def _properties(self, node: KafkaNode) -> dict[str, str]:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        listeners = [f"PLAINTEXT://127.0.0.1:{node.port}", f"CONTROLLER://127.0.0.1:{node.controller_port}"]
        protocol_map = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        advertised = [f"PLAINTEXT://127.0.0.1:{node.port}"]
        rf = str(min(3, self.size))
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.data_dir),
            "num.partitions": "1",
            "default.replication.factor": rf,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": str(min(2, self.size)),
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": str(min(2, self.size)),
            "group.initial.rebalance.delay.ms": "0",
            # As in most production clusters: topics exist only when created (a Metadata request for an
            # unknown topic must not create it, or "absent" could never be observed).
            "auto.create.topics.enable": "false",
            "auto.leader.rebalance.enable": "false",
            # Small segments and fast fencing keep a killed node's absence short in tests.
            "broker.session.timeout.ms": "6000",
            "broker.heartbeat.interval.ms": "1000",
            "log.segment.bytes": str(64 * 1024 * 1024),
            # Scenarios send 1 MiB values (plus batch overhead); the broker default is just under 1 MiB.
            "message.max.bytes": str(8 * 1024 * 1024),
            "replica.fetch.max.bytes": str(8 * 1024 * 1024),
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        if self.sasl:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{node.sasl_port}")
            advertised.append(f"SASL_PLAINTEXT://127.0.0.1:{node.sasl_port}")
            protocol_map.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
            props["sasl.enabled.mechanisms"] = ",".join(self.sasl.mechanisms)
            if "PLAIN" in self.sasl.mechanisms:
                users = " ".join(f'user_{u}="{p}"' for u, p in self.sasl.users.items())
                props["listener.name.sasl_plaintext.plain.sasl.jaas.config"] = (
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};")
            for mech in self.sasl.mechanisms:
                if mech.startswith("SCRAM"):
                    props[f"listener.name.sasl_plaintext.{mech.lower()}.sasl.jaas.config"] = (
                        "org.apache.kafka.common.security.scram.ScramLoginModule required;")
        if self.tls:
            listeners.append(f"SSL://127.0.0.1:{node.ssl_port}")
            advertised.append(f"SSL://127.0.0.1:{node.ssl_port}")
            protocol_map.append("SSL:SSL")
            keystore = node.data_dir.parent / f"node-{node.node_id}-keystore.pem"
            keystore.write_text(Path(self.tls.key).read_text() + Path(self.tls.cert).read_text())
            props.update({
                "listener.name.ssl.ssl.keystore.type": "PEM",
                "listener.name.ssl.ssl.keystore.location": str(keystore),
                "listener.name.ssl.ssl.endpoint.identification.algorithm": "",
            })
            if self.tls.client_ca:
                props.update({
                    "listener.name.ssl.ssl.truststore.type": "PEM",
                    "listener.name.ssl.ssl.truststore.location": str(self.tls.client_ca),
                    "listener.name.ssl.ssl.client.auth": "required",
                })
        if self.acls:
            props.update({
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "super.users": "User:ANONYMOUS;User:admin",
                "allow.everyone.if.no.acl.found": "false",
            })
        props["listeners"] = ",".join(listeners)
        props["advertised.listeners"] = ",".join(advertised)
        props["listener.security.protocol.map"] = ",".join(protocol_map)
        props.update({k: str(v) for k, v in self.extra.items()})
        return props

    def _format_argv(self, node: KafkaNode) -> list[str]:
        node.config_path.write_text(
            "".join(f"{k}={v}\n" for k, v in sorted(self._properties(node).items())))
        argv = java_tool("kafka.tools.StorageTool", "format", f"--cluster-id={self.cluster_id}",
                         "-c", str(node.config_path), jvm=FAST_START_JVM)
        if self.sasl:
            for mech in self.sasl.mechanisms:
                if mech.startswith("SCRAM"):
                    for user, password in self.sasl.users.items():
                        argv += ["--add-scram", f"{mech}=[name={user},password={password}]"]
        return argv

    # ---- lifecycle

    def start(self, timeout: float = 120.0, attempt: int = 0) -> "KafkaCluster":
        import subprocess
        for node in self.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
        # One StorageTool JVM per node, all at once: each takes seconds to start.
        formats = [(n, subprocess.Popen(self._format_argv(n), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)) for n in self.nodes]
        for node, p in formats:
            out, _ = p.communicate(timeout=180)
            if p.returncode != 0:
                raise RuntimeError(f"kafka storage format failed for node {node.node_id}:\n{out}")
        for node in self.nodes:
            node.proc.start()
        try:
            self.wait_ready(timeout)
        except Exception:
            # Free ports are only unique within this process: another process (a second pytest, a
            # benchmark) may bind one between our probe and the broker's bind. Start over on fresh
            # ports, a bounded number of times; any other failure is the test's.
            clash = any("Address already in use" in n.proc.all_logs() for n in self.nodes)
            if not clash or attempt >= 2:
                raise
            for node in self.nodes:
                node.proc.signal(signal.SIGKILL)
                node.proc.wait(timeout=30)
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir.mkdir(parents=True)
            self._plan_nodes()
            return self.start(timeout, attempt + 1)
        return self

    def alive_nodes(self) -> list[KafkaNode]:
        return [n for n in self.nodes if n.proc.alive()]

    def wait_ready(self, timeout: float = 120.0, nodes: list[KafkaNode] | None = None) -> None:
        """Every (given) node answers ApiVersions, and metadata from each lists them all as brokers."""
        nodes = nodes if nodes is not None else self.alive_nodes()
        want = {n.node_id for n in nodes}

        def ready():
            for n in nodes:
                if not n.proc.alive():
                    raise RuntimeError(f"kafka node {n.node_id} exited with {n.proc.popen.returncode}:\n"
                                       f"{n.proc.tail()}")
                if not answers_api_versions("127.0.0.1", n.port):
                    return False
            return all(want <= set(self.broker_ids(n.bootstrap)) for n in nodes)

        wait_for(ready, timeout, interval=0.2, what=f"{self.name}: brokers {sorted(want)} in metadata")

    def broker_ids(self, bootstrap: str | None = None) -> list[int]:
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": bootstrap or self.bootstrap})
        md = admin.list_topics(timeout=5)
        return sorted(md.brokers)

    def kill(self, node_id: int) -> None:
        """SIGKILL: no controlled shutdown, as when a machine dies."""
        node = self.node(node_id)
        node.proc.signal(signal.SIGKILL)
        node.proc.wait(timeout=30)

    def stop_node(self, node_id: int) -> None:
        self.node(node_id).proc.stop(timeout=60)

    def start_node(self, node_id: int, timeout: float = 120.0) -> None:
        node = self.node(node_id)
        node.proc.start()
        self.wait_ready(timeout, nodes=[node])

    def restart(self, timeout: float = 120.0) -> None:
        """Every node stopped, then started again on the same data."""
        for node in self.nodes:
            node.proc.signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc.wait(timeout=60) is None:
                node.proc.popen.kill()
                node.proc.wait(timeout=10)
        for node in self.nodes:
            node.proc.start()
        self.wait_ready(timeout, nodes=self.nodes)

    def stop(self) -> None:
        # Brokers first and in parallel: a lone remaining node waits for a quorum it cannot reach.
        for node in self.nodes:
            node.proc.signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc.popen is not None and node.proc.wait(timeout=30) is None:
                node.proc.popen.kill()
                node.proc.wait(timeout=10)
        self._admin = None
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # ---- admin helpers (over PLAINTEXT, a super user when ACLs are on)

    def admin(self):
        # Kept on the instance: futures of a garbage-collected AdminClient fail with _DESTROY.
        from confluent_kafka.admin import AdminClient
        if getattr(self, "_admin", None) is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin

    def create_topic(self, topic: str, partitions: int = 1, replication_factor: int | None = None,
                     config: dict | None = None, timeout: float = 60.0) -> None:
        from confluent_kafka.admin import NewTopic
        rf = replication_factor or min(3, self.size)
        futures = self.admin().create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=rf, config=config or {})],
            operation_timeout=timeout)
        futures[topic].result(timeout=timeout)
        wait_for(lambda: self.leaders(topic) and len(self.leaders(topic)) == partitions, timeout,
                 what=f"{topic}: a leader for each of {partitions} partitions")

    def reset(self, timeout: float = 60.0) -> None:
        """Deletes every topic (internal ones aside) and every consumer group, and waits until metadata
        shows none: a module's cluster handed from scenario to scenario that use the same fixed names."""
        admin = self.admin()

        def groups_left() -> list[str]:
            listed = admin.list_consumer_groups(request_timeout=10).result(timeout=15)
            return [g.group_id for g in listed.valid]

        def delete_groups() -> bool:
            # A group is deletable once empty; members of a closed client leave at once, others
            # (a client that died) when their session times out: retried until the deadline.
            names = groups_left()
            if names:
                for f in admin.delete_consumer_groups(names, request_timeout=10).values():
                    try:
                        f.result(timeout=15)
                    except Exception:  # noqa: BLE001 - NON_EMPTY_GROUP: retried below
                        pass
            return not groups_left()

        def topics_left() -> set[str]:
            return {t for t in admin.list_topics(timeout=10).topics if not t.startswith("__")}

        topics = topics_left()
        if topics:
            for f in admin.delete_topics(sorted(topics), operation_timeout=30).values():
                f.result(timeout=60)
        wait_for(lambda: not topics_left(), timeout, what=f"{self.name}: every topic deleted")
        wait_for(delete_groups, timeout, interval=0.5, what=f"{self.name}: every consumer group deleted")

    def leaders(self, topic: str) -> dict[int, int]:
        """partition -> leader node id, for partitions that have a leader now."""
        md = self.admin().list_topics(topic=topic, timeout=10)
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            return {}
        return {p: pm.leader for p, pm in t.partitions.items() if pm.leader >= 0}

    def replicas(self, topic: str, bootstrap: str | None = None) -> dict[int, list[int]]:
        md = self._admin_at(bootstrap).list_topics(topic=topic, timeout=10)
        return {p: list(pm.replicas) for p, pm in md.topics[topic].partitions.items()}

    def _admin_at(self, bootstrap: str | None):
        if bootstrap is None:
            return self.admin()
        from confluent_kafka.admin import AdminClient
        return AdminClient({"bootstrap.servers": bootstrap})

    def _tool(self, main_class: str, *args: str) -> None:
        import subprocess
        out = subprocess.run(java_tool(main_class, "--bootstrap-server", self.bootstrap, *args),
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{main_class} failed:\n{out.stdout}\n{out.stderr}")

    def elect_preferred_leaders(self, topic: str, partitions: list[int]) -> None:
        """kafka-leader-election, in a JVM of its own: the calling process opens no broker connection."""
        for p in partitions:
            self._tool("org.apache.kafka.tools.LeaderElectionCommand", "--election-type", "PREFERRED",
                       "--topic", topic, "--partition", str(p))

    def reassign(self, topic: str, assignment: dict[int, list[int]], timeout: float = 60.0,
                 observe_via: str | None = None) -> None:
        """kafka-reassign-partitions (first replica = preferred leader), awaited through `observe_via` (an
        edge bootstrap, so the calling process need not talk to brokers) or the brokers themselves."""
        import json
        plan = {"version": 1, "partitions": [
            {"topic": topic, "partition": p, "replicas": r} for p, r in assignment.items()]}
        plan_file = self.base_dir / f"reassign-{topic}.json"
        plan_file.write_text(json.dumps(plan))
        self._tool("org.apache.kafka.tools.reassign.ReassignPartitionsCommand", "--execute",
                   "--reassignment-json-file", str(plan_file))
        want = {p: list(r) for p, r in assignment.items()}
        wait_for(lambda: self.replicas(topic, observe_via) == want, timeout,
                 what=f"{topic} replicas reassigned to {assignment}")

    def create_acls(self, bindings: list[tuple]) -> None:
        """bindings: (principal, resource_type, name, operation, permission[, pattern]) with confluent enums'
        names, e.g. ("User:edge", "TOPIC", "orders", "WRITE", "ALLOW")."""
        from confluent_kafka.admin import (AclBinding, AclOperation, AclPermissionType, ResourcePatternType,
                                           ResourceType)
        acls = []
        for b in bindings:
            principal, rtype, name, op, perm = b[:5]
            pattern = b[5] if len(b) > 5 else "LITERAL"
            acls.append(AclBinding(ResourceType[rtype], name, ResourcePatternType[pattern], principal, "*",
                                   AclOperation[op], AclPermissionType[perm]))
        for fut in self.admin().create_acls(acls).values():
            fut.result(timeout=30)
