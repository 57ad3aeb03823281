"""The edge authenticates to brokers with SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) against Apache Kafka's
SASL_PLAINTEXT listener, and the two authorization layers compose: the broker (StandardAuthorizer, deny
by default) sees the edge's SASL identity; a request the edge allows but the broker's ACLs deny comes
back with the broker's own error; a request the edge denies never reaches the broker (its authorizer
logs every denial it makes, and none names that topic)."""

import pytest

from lib.clients import Rec, client, unique
from lib.edge import VirtualCluster
from lib.kafka import KafkaCluster, Sasl
from lib.pki import SPIFFE_ORDERS, standard_pki
from lib.wait import wait_for

TOPIC_AUTHORIZATION_FAILED = 29
USERS = {"admin": "admin-secret", "edge": "edge-secret"}
REAUTH_MS = 8000


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory):
    # Sessions expire after REAUTH_MS (KIP-368): the broker closes a connection that outlives its
    # session unless the client re-authenticates; the edge closes the client first, at a frame boundary.
    k = KafkaCluster(tmp_path_factory.mktemp("kafka-sasl-logs"), brokers=1, name="kafka-sasl",
                     sasl=Sasl(users=USERS), acls=True, config={"connections.max.reauth.ms": REAUTH_MS})
    k.start()
    # The edge's user may use topics and groups named sasl-* and nothing else.
    k.create_acls([
        ("User:edge", "TOPIC", "sasl-", "ALL", "ALLOW", "PREFIXED"),
        ("User:edge", "GROUP", "sasl-", "ALL", "ALLOW", "PREFIXED"),
    ])
    yield k
    k.stop()


def sasl_cluster(k: KafkaCluster, sasl: dict, name: str = "sasl", extra: dict | None = None) -> VirtualCluster:
    return VirtualCluster(name=name, upstream=k.sasl_bootstrap_servers,
                          extra={"upstream": {"bootstrap_servers": k.sasl_bootstrap_servers, "sasl": sasl},
                                 **(extra or {})})


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_edge_authenticates_to_the_broker(sasl_kafka, edge, lib, mechanism, tmp_path, monkeypatch):
    # One password source per mechanism run: a file for PLAIN, the environment for SCRAM.
    if mechanism == "PLAIN":
        secret = tmp_path / "edge.password"
        secret.write_text(USERS["edge"] + "\n")
        sasl = {"mechanism": mechanism, "username": "edge", "password_file": str(secret)}
    else:
        monkeypatch.setenv("STRAIT_TEST_SASL_PASSWORD", USERS["edge"])
        sasl = {"mechanism": mechanism, "username": "edge", "password_env": "STRAIT_TEST_SASL_PASSWORD"}
    vc = sasl_cluster(sasl_kafka, sasl, name=f"sasl-{mechanism.lower()}")
    e = edge([vc])
    c = client(lib, e.bootstrap)
    topic = unique("sasl-ok")
    sasl_kafka.create_topic(topic)
    acked = c.produce(topic, [Rec(None, b"v%d" % i) for i in range(10)], timeout=60)
    assert len(acked) == 10
    got = c.consumer(topic, group=unique("sasl-g")).take(10, timeout=60)
    assert [r.value for r in got] == [b"v%d" % i for i in range(10)]
    # The password never shows in the edge's log.
    assert USERS["edge"] not in e.log_text()
    assert e.metric("strait_upstream_auth_failures", virtual_cluster=vc.name) == 0


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_wrong_password_is_an_authentication_failure(sasl_kafka, edge, mechanism, monkeypatch):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    monkeypatch.setenv("STRAIT_TEST_SASL_PASSWORD", "not-the-password")
    vc = sasl_cluster(sasl_kafka, {"mechanism": mechanism, "username": "edge",
                                   "password_env": "STRAIT_TEST_SASL_PASSWORD"}, name="sasl-bad")
    e = edge([vc])
    with pytest.raises(KafkaException):
        AdminClient({"bootstrap.servers": e.bootstrap}).list_topics(timeout=5)
    wait_for(lambda: e.metric("strait_upstream_auth_failures", virtual_cluster=vc.name) >= 1, 15,
             what="the refused SASL authentication counted")
    assert "not-the-password" not in e.log_text()
    assert any("authentication" in line.lower() and "WARN" in line for line in e.log_text().splitlines())


def test_broker_acls_and_edge_authorization_compose(sasl_kafka, edge, tmp_path, monkeypatch):
    """The edge's rules let `orders` write sasl-* and forbidden-*; the broker lets the edge's user write
    only sasl-*. So: sasl-* works, forbidden-* comes back TOPIC_AUTHORIZATION_FAILED from the broker, and
    elsewhere-* (denied by the edge) is answered by the edge without reaching the broker."""
    pki = standard_pki(tmp_path / "pki")
    monkeypatch.setenv("STRAIT_TEST_SASL_PASSWORD", USERS["edge"])
    rules = [{"principal": SPIFFE_ORDERS, "allow": ["Write", "Describe"], "topic": t}
             for t in ("sasl-*", "forbidden-*")]
    vc = sasl_cluster(sasl_kafka, {"mechanism": "SCRAM-SHA-256", "username": "edge",
                                   "password_env": "STRAIT_TEST_SASL_PASSWORD"}, name="sasl-authz",
                      extra={"tls": pki.server_tls(),
                             "authorization": {"rules": rules, "unknown_api_keys": "deny"}})
    vc.advertised_host = "localhost"
    edge([vc])
    ok, forbidden, elsewhere = unique("sasl-mix"), unique("forbidden"), unique("elsewhere")
    for t in (ok, forbidden, elsewhere):
        sasl_kafka.create_topic(t)
    log_before = broker_log(sasl_kafka)
    conf = {"bootstrap.servers": f"localhost:{vc.bootstrap_port}", **pki.confluent_ssl("orders"),
            "message.timeout.ms": 15000, "retries": 0}
    assert produce_error(conf, ok) is None
    assert produce_error(conf, forbidden) == TOPIC_AUTHORIZATION_FAILED
    assert produce_error(conf, elsewhere) == TOPIC_AUTHORIZATION_FAILED
    # The broker denied `forbidden` itself (it reached the broker as User:edge) and never saw `elsewhere`.
    wait_for(lambda: forbidden in broker_log(sasl_kafka)[len(log_before):], 15,
             what="the broker's authorizer logging its denial of the forbidden topic")
    denials = broker_log(sasl_kafka)[len(log_before):].splitlines()
    assert any("User:edge" in line and forbidden in line for line in denials)
    # The edge forwards Metadata and filters its answer (the broker may log a Describe denial for a
    # name the client asked about), but the Produce it refused never reached the broker.
    assert not [line for line in denials if elsewhere in line and "request = Produce" in line]
    assert any(forbidden in line and "request = Produce" in line for line in denials) or \
        any(forbidden in line and "request = Metadata" in line for line in denials)


def broker_log(k: KafkaCluster) -> str:
    """The broker's authorizer lines (StandardAuthorizer logs every denial at INFO)."""
    return "".join(line for line in k.nodes[0].proc.all_logs().splitlines(keepends=True)
                   if "kafka.authorizer.logger" in line)


def produce_error(conf: dict, topic: str) -> int | None:
    """Produce one record; the Kafka error code of its delivery report (None when it was stored)."""
    from confluent_kafka import Producer
    p = Producer(conf)
    result = []
    p.produce(topic, value=b"x", on_delivery=lambda err, msg: result.append(err))
    p.flush(30)
    assert result, "no delivery report"
    return None if result[0] is None else result[0].code()


def test_clients_own_sasl_never_reaches_the_authenticated_upstream(sasl_kafka, edge, monkeypatch):
    """A client that itself speaks SASL to the edge is refused by the edge (the upstream connection is
    already authenticated as the edge); it never gets metadata."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    monkeypatch.setenv("STRAIT_TEST_SASL_PASSWORD", USERS["edge"])
    vc = sasl_cluster(sasl_kafka, {"mechanism": "PLAIN", "username": "edge",
                                   "password_env": "STRAIT_TEST_SASL_PASSWORD"}, name="sasl-client-sasl")
    e = edge([vc])
    admin = AdminClient({"bootstrap.servers": e.bootstrap, "security.protocol": "SASL_PLAINTEXT",
                         "sasl.mechanism": "PLAIN", "sasl.username": "admin",
                         "sasl.password": USERS["admin"]})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
    # Without SASL on the client side the same edge serves metadata.
    assert AdminClient({"bootstrap.servers": e.bootstrap}).list_topics(timeout=15).brokers


def test_sessions_that_expire_lose_nothing(sasl_kafka, edge, lib, monkeypatch):
    """The broker limits sessions to REAUTH_MS; an idempotent producer writing for about three session
    lifetimes through the edge loses and duplicates nothing, and the consumer reads everything."""
    import time
    monkeypatch.setenv("STRAIT_TEST_SASL_PASSWORD", USERS["edge"])
    vc = sasl_cluster(sasl_kafka, {"mechanism": "SCRAM-SHA-512", "username": "edge",
                                   "password_env": "STRAIT_TEST_SASL_PASSWORD"}, name="sasl-reauth")
    e = edge([vc])
    c = client(lib, e.bootstrap)
    topic = unique("sasl-reauth")
    sasl_kafka.create_topic(topic)
    idem = {"enable_idempotence": True, "acks": "all"} if lib == "kafka-python" else \
        {"enable.idempotence": True, "acks": "all"}
    p = c.producer(**idem)
    acked = []
    deadline = time.monotonic() + 3 * REAUTH_MS / 1000
    try:
        batch = 0
        while time.monotonic() < deadline:
            acked += p.send_all(topic, [Rec(None, b"r-%d-%d" % (batch, i)) for i in range(20)], timeout=60)
            batch += 1
    finally:
        p.close()
    got = c.consumer(topic, group=unique("sasl-g")).take(len(acked), timeout=90, settle=1.0)
    values = [r.value for r in got]
    assert len(values) == len(set(values)) == len(acked)
    assert set(values) == {r.value for r in acked}
    assert e.metric("strait_upstream_auth_failures", virtual_cluster=vc.name) == 0
