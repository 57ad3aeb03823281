"""Fixtures for the Strait integration tests: real brokers, the real strait-edge binary, real client libs.

Brokers: Apache Kafka (KRaft, from Maven Central via scripts/setup.sh) by default. `STRAIT_BROKER=tansu`
runs the same scenarios on Tansu instead (the compatibility subset `make test` runs that way).
`broker()` hands out one single-node cluster shared by the whole session (scenarios keep apart by unique
topic and group names); `broker(clean=True)` a cluster of the module's own, emptied of topics and groups
before each scenario (for scenarios with fixed names); `broker(dedicated=True, ...)` starts a cluster of
the test's own, for scenarios that restart, kill or reconfigure it.

Scenarios that take `via` run twice: `direct` (clients talk to the broker; proves the scenario itself is
right) and `edge` (clients talk to strait-edge in front of the same broker). The edge variant FAILS when
the binary is missing. Scenarios that take `lib` run once per client library.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lib.clients import LIBS, client  # noqa: E402
from lib.edge import Edge, EdgeBinaryMissing, VirtualCluster, edge_bin  # noqa: E402
from lib.kafka import KafkaCluster  # noqa: E402
from lib.kms import OpenBao  # noqa: E402
from lib.tansu import Tansu  # noqa: E402

VIAS = ["direct", "edge"]
BROKER_KIND = os.environ.get("STRAIT_BROKER", "kafka")
assert BROKER_KIND in ("kafka", "tansu"), f"STRAIT_BROKER must be kafka or tansu, not {BROKER_KIND!r}"


def pytest_generate_tests(metafunc):
    if "via" in metafunc.fixturenames:
        vias = VIAS
        marker = metafunc.definition.get_closest_marker("edge_only")
        if marker:
            vias = ["edge"]
        metafunc.parametrize("via", vias)
    if "lib" in metafunc.fixturenames:
        metafunc.parametrize("lib", LIBS)


@pytest.fixture
def logs(tmp_path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


@pytest.fixture
def tansu(logs):
    """Factory: `tansu(**kwargs)` starts a Tansu broker and returns it; all are stopped at teardown."""
    started: list[Tansu] = []

    def make(**kwargs) -> Tansu:
        t = Tansu(logs, **kwargs)
        started.append(t)
        return t.start()

    yield make
    for t in started:
        t.stop()


@pytest.fixture(scope="session")
def shared_kafka():
    """One single-node Kafka for the session, started on first use."""
    holder: list[KafkaCluster] = []

    def get() -> KafkaCluster:
        if not holder:
            logs = Path(tempfile.mkdtemp(prefix="strait-shared-kafka-logs-"))
            holder.append(KafkaCluster(logs, brokers=1, name="kafka-shared").start())
        return holder[0]

    yield get
    for k in holder:
        k.stop()


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    """One OpenBao dev server per module for the scenarios that do not stop it; each uses its own keys."""
    b = OpenBao(tmp_path_factory.mktemp("openbao-logs"))
    try:
        yield b.start()
    finally:
        b.stop()


@pytest.fixture(scope="module")
def module_kafka(tmp_path_factory):
    """One single-node Kafka per module, started on first use and emptied (`reset()`) on every use."""
    holder: list[KafkaCluster] = []

    def get() -> KafkaCluster:
        if not holder:
            logs = tmp_path_factory.mktemp("kafka-module-logs")
            holder.append(KafkaCluster(logs, brokers=1, name="kafka-module").start())
        else:
            holder[0].reset()
        return holder[0]

    yield get
    for k in holder:
        k.stop()


@pytest.fixture
def kafka(logs):
    """Factory: `kafka(brokers=3, sasl=..., tls=..., acls=...)` starts a dedicated KafkaCluster."""
    started: list[KafkaCluster] = []

    def make(**kwargs) -> KafkaCluster:
        k = KafkaCluster(logs, **kwargs)
        started.append(k)
        return k.start()

    yield make
    for k in started:
        k.stop()


@pytest.fixture
def broker(shared_kafka, module_kafka, kafka, tansu):
    """Factory: a broker for a scenario; see the module docstring. Kafka by default, Tansu with
    STRAIT_BROKER=tansu (always a fresh one). `persistent=True` asks for storage that survives `restart()`."""

    def make(dedicated: bool = False, persistent: bool = False, clean: bool = False, name: str | None = None,
             **kwargs):
        if BROKER_KIND == "tansu":
            if persistent:
                kwargs.setdefault("storage", f"sqlite:///{tempfile.mkdtemp(prefix='strait-tansu-')}/t.db")
            return tansu(**({"name": name} if name else {}), **kwargs)
        if clean and not (dedicated or persistent or kwargs or name):
            return module_kafka()
        if dedicated or persistent or kwargs:
            return kafka(**({"name": name} if name else {}), **kwargs)
        return shared_kafka()

    return make


@pytest.fixture
def edge(logs, request):
    """Factory: `edge(upstreams)` starts strait-edge with one virtual cluster per entry.

    `upstreams` is a broker (KafkaCluster or Tansu), a list of them, or a list of VirtualCluster. After the test body the edge
    gets SIGTERM and the test FAILS if the log has ERROR lines not declared with `edge.expect_error()`.
    """
    started: list[Edge] = []
    request.node._strait_edges = started

    def make(upstreams, **kwargs) -> Edge:
        try:
            binary = kwargs.pop("binary", None) or edge_bin()
        except EdgeBinaryMissing as e:
            pytest.fail(str(e), pytrace=False)
        if isinstance(upstreams, (Tansu, KafkaCluster)):
            upstreams = [upstreams]
        clusters = [
            u if isinstance(u, VirtualCluster) else VirtualCluster(name=f"vc{i}", upstream=u.bootstrap_servers)
            for i, u in enumerate(upstreams)
        ]
        e = Edge(logs, clusters, binary=binary, **kwargs)
        started.append(e)
        return e.start()

    yield make
    for e in started:
        if e.alive():
            e.terminate(timeout=10)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Stop every edge the test started and fail the test (not error it) on unexpected ERROR log lines."""
    try:
        result = yield
    except BaseException:
        _stop_edges(item)
        raise
    problems = _stop_edges(item)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    return result


def _stop_edges(item) -> list[str]:
    problems = []
    for e in getattr(item, "_strait_edges", []):
        if e.alive():
            code = e.terminate(timeout=30)
            if code != 0:
                problems.append(f"strait-edge did not exit cleanly on SIGTERM (exit code {code})")
        bad = e.unexpected_errors()
        if bad:
            problems.append("unexpected ERROR lines in strait-edge log:\n  " + "\n  ".join(bad[:20]))
    return problems


class Target:
    """Where a scenario's clients connect: the broker itself or strait-edge in front of it."""

    def __init__(self, via: str, broker, edge: Edge | None):
        self.via = via
        self.broker = broker
        self.edge = edge

    @property
    def bootstrap(self) -> str:
        return self.edge.bootstrap if self.edge else self.broker.bootstrap

    def client(self, lib: str):
        return client(lib, self.bootstrap)


@pytest.fixture
def make_target(via, broker, edge):
    def make(**broker_kwargs) -> Target:
        t = broker(**broker_kwargs)
        e = edge(t) if via == "edge" else None
        return Target(via, t, e)
    return make


@pytest.fixture
def target(make_target) -> Target:
    return make_target()
