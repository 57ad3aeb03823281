"""Authorization and audit at the edge, end to end: real Tansu, the real strait-edge with mTLS, SPIFFE
client certificates, confluent-kafka, kafka-python and the Java client.

Topics are created directly at Tansu, so no scenario depends on Create rules, and every claim that a
denied record never reached the broker is checked by reading the topic from Tansu itself.
"""

import time
from datetime import datetime, timezone

import pytest

from lib.authz import (
    GROUP_AUTHORIZATION_FAILED,
    SHOP_ANY,
    TOPIC_AUTHORIZATION_FAILED,
    PollingConsumer,
    Principal,
    authz_cluster,
    consume_with_group,
    create_topics_at_broker,
    example_rules,
    fetch_error,
    group_error,
    in_seconds,
    parse_time,
    read_at_broker,
    read_audit,
    rfc3339,
    write_config_atomically,
)
from lib.pki import SPIFFE_BILLING, SPIFFE_ORDERS, SPIFFE_OTHER_DOMAIN, standard_pki
from lib.wait import wait_for

TOPICS = ["orders-eu", "orders-us", "ledger", "payments"]


@pytest.fixture
def pki(tmp_path):
    p = standard_pki(tmp_path / "pki")
    # Same CA, another trust domain: the handshake succeeds, the rules must not match.
    p.leaf("other-domain", uris=[SPIFFE_OTHER_DOMAIN])
    # One path segment deeper than `.../sa/*` reaches: the glob's `*` must not cross `/`.
    p.leaf("nested-path", uris=[SPIFFE_ORDERS + "/extra"])
    return p


def rules_with_ledger() -> list[dict]:
    # orders may see `ledger` but not write it: lets a producer name an allowed and a denied topic
    # in one Produce request.
    return example_rules() + [{"principal": SPIFFE_ORDERS, "allow": ["Describe"], "topic": "ledger"}]


def secure_edge(broker, edge, pki, rules, **kw):
    t = broker(clean=True)  # fixed topic and group names: the module's cluster, emptied
    create_topics_at_broker(t.bootstrap, TOPICS)
    vc = authz_cluster(t, pki, rules, **kw)
    e = edge([vc])
    return t, vc, e


def test_allowed_produce_and_group_consume(broker, edge, pki, lib):
    t, vc, e = secure_edge(broker, edge, pki, example_rules())
    orders = Principal(pki, vc, "orders")
    billing = Principal(pki, vc, "billing")
    producer = orders.producer(lib)
    values = [b"%s-allowed-%d" % (lib.encode(), i) for i in range(10)]
    assert producer.send_many([("orders-eu", v) for v in values]) == [None] * 10
    producer.close()
    # Every shop account reads orders-* in a shop-* group; the commit goes through the edge too.
    got = consume_with_group(billing, lib, "orders-eu", "shop-billing", 10)
    assert got == values
    # The committed offset is at the broker: a new member of the group (orders is a shop account
    # too) starts after the 10 records and gets exactly the next one.
    more = orders.producer(lib)
    assert more.send("orders-eu", b"after-commit") is None
    more.close()
    assert consume_with_group(orders, lib, "orders-eu", "shop-billing", 1) == [b"after-commit"]
    assert read_at_broker(t.bootstrap, "orders-eu") == values + [b"after-commit"]
    assert e.metric("strait_authz_decisions", virtual_cluster="secure", result="allow") > 0


def test_denied_produce_and_group_never_reach_the_broker(broker, edge, pki, lib):
    t, vc, e = secure_edge(broker, edge, pki, rules_with_ledger())
    orders = Principal(pki, vc, "orders")
    billing = Principal(pki, vc, "billing")
    denied_values = []

    # billing may Describe orders-* (so its client sends the Produce) but not Write.
    p = billing.producer(lib)
    for i in range(3):
        v = b"denied-billing-%d" % i
        denied_values.append(v)
        assert p.send("orders-eu", v) == TOPIC_AUTHORIZATION_FAILED
    p.close()

    # orders may not even see `payments`: refused at Metadata, before any Produce.
    p = orders.producer(lib)
    assert p.send("payments", b"denied-payments") == TOPIC_AUTHORIZATION_FAILED
    # One client batch naming an allowed and a denied topic: the allowed part is written, the
    # denied part answered with 29 (partial Produce, as Kafka does).
    mixed = p.send_many([("orders-eu", b"mixed-ok"), ("ledger", b"mixed-denied")])
    assert mixed == [None, TOPIC_AUTHORIZATION_FAILED]
    p.close()

    # A group outside shop-* is refused with GROUP_AUTHORIZATION_FAILED.
    assert group_error(billing, lib, "orders-eu", "analytics") == GROUP_AUTHORIZATION_FAILED

    # At the broker itself: only the allowed record exists.
    assert read_at_broker(t.bootstrap, "orders-eu") == [b"mixed-ok"]
    assert read_at_broker(t.bootstrap, "payments") == []
    assert read_at_broker(t.bootstrap, "ledger") == []
    assert e.metric("strait_authz_decisions", virtual_cluster="secure", result="deny") >= 6


def test_denied_fetch_delivers_nothing(broker, edge, pki, lib, tmp_path):
    """orders may Describe `ledger` but not Read it: Fetch is refused, the broker's record never arrives."""
    audit = tmp_path / "audit.jsonl"
    t, vc, e = secure_edge(broker, edge, pki, rules_with_ledger(), audit={"path": str(audit), "sample_allows": 0.0})
    from confluent_kafka import Producer
    direct = Producer({"bootstrap.servers": t.bootstrap})
    direct.produce("ledger", value=b"secret-ledger-entry")
    assert direct.flush(30) == 0
    assert fetch_error(Principal(pki, vc, "orders"), lib, "ledger") == TOPIC_AUTHORIZATION_FAILED
    # The refusal is the Fetch itself (ListOffsets, a Describe, is allowed).
    wait_for(lambda: [line for line in read_audit(audit)
                      if (line["api_key"], line["resource_name"], line["operation"], line["principal"])
                      == ("Fetch", "ledger", "Read", SPIFFE_ORDERS)], 10, what="the Fetch deny audited")
    assert not [line for line in read_audit(audit) if line["api_key"] == "ListOffsets"]


@pytest.mark.parametrize("cert", ["other-domain", "nested-path"])
def test_outsider_with_valid_certificate_gets_nothing(broker, edge, pki, lib, cert, tmp_path):
    """other-domain: spiffe://other.org/ns/shop/sa/orders; nested-path:
    spiffe://example.org/ns/shop/sa/orders/extra. Both certificates come from the edge's CA."""
    audit = tmp_path / "audit.jsonl"
    t, vc, e = secure_edge(broker, edge, pki, example_rules(), audit={"path": str(audit), "sample_allows": 1.0})
    outsider = Principal(pki, vc, cert)
    p = outsider.producer(lib)
    assert p.send("orders-eu", b"from-other-domain") == TOPIC_AUTHORIZATION_FAILED
    p.close()
    assert group_error(outsider, lib, "orders-eu", "shop-outsider") == GROUP_AUTHORIZATION_FAILED
    assert outsider.list_topics(lib) & set(TOPICS) == set()
    # Authenticated (the certificate is valid), then refused by the rules.
    assert e.metric("strait_tls_handshakes", result="ok") >= 1
    failed = e.metric("strait_tls_handshakes", result="failed")
    if lib == "java":
        # The Java consumer opens its broker connection while the group is being refused; closing it right
        # after the error can cut that handshake short (counted as failed, reason "eof", as any client
        # hanging up mid-handshake). Waiting 3 s before the close shows none: not a refused certificate.
        failed -= e.metric("strait_tls_handshakes", result="failed", reason="eof")
    assert failed == 0
    assert read_at_broker(t.bootstrap, "orders-eu") == []
    # The principal is the certificate's whole SPIFFE ID, and nothing it asked for was allowed.
    lines = wait_for(lambda: read_audit(audit), 10, what="audit lines")
    assert {line["principal"] for line in lines} == {outsider.spiffe}, lines
    assert {line["decision"] for line in lines} == {"deny"}, lines


def test_metadata_hides_topics_the_principal_may_not_describe(broker, edge, pki, lib):
    t, vc, e = secure_edge(broker, edge, pki, rules_with_ledger())
    assert set(TOPICS) <= _direct_topics(t.bootstrap)  # all four exist at the broker
    assert Principal(pki, vc, "orders").list_topics(lib) & set(TOPICS) == {"orders-eu", "orders-us", "ledger"}
    assert Principal(pki, vc, "billing").list_topics(lib) & set(TOPICS) == {"orders-eu", "orders-us"}


def _direct_topics(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return set(admin.list_topics(timeout=10).topics)


def test_leased_grant_expires_mid_run(broker, edge, pki, lib, tmp_path):
    """billing may Write orders-lease only until `not_after`, a few seconds after the edge starts."""
    t = broker(clean=True)  # fixed topic and group names: the module's cluster, emptied
    create_topics_at_broker(t.bootstrap, ["orders-lease"])
    # Long enough for the edge to start and the client to connect on a busy 2-core machine.
    not_after_dt = in_seconds(8)
    not_after = not_after_dt.timestamp()
    rules = example_rules() + [{"principal": SPIFFE_BILLING, "allow": ["Write"], "topic": "orders-lease",
                                "not_after": rfc3339(not_after_dt)}]
    audit = tmp_path / "audit.jsonl"
    vc = authz_cluster(t, pki, rules, audit={"path": str(audit), "sample_allows": 1.0})
    edge([vc])
    p = Principal(pki, vc, "billing").producer(lib)
    results = []  # (sent at, settled at, value, outcome)
    i = 0
    while time.time() < not_after + 3:
        v = b"lease-%d" % i
        i += 1
        sent = time.time()
        outcome = p.send("orders-lease", v)
        results.append((sent, time.time(), v, outcome))
        # The loop's request rate (about 10/s), not a synchronisation.
        time.sleep(0.1)
    p.close()
    before = [r for r in results if r[1] < not_after]
    after = [r for r in results if r[0] >= not_after]
    assert len(before) >= 2 and len(after) >= 2, f"too few requests around the expiry: {results}"
    assert [r[3] for r in before] == [None] * len(before), results
    assert [r[3] for r in after] == [TOPIC_AUTHORIZATION_FAILED] * len(after), results
    # Once denied, never allowed again.
    outcomes = [r[3] for r in results]
    first_denied = outcomes.index(TOPIC_AUTHORIZATION_FAILED)
    assert all(o == TOPIC_AUTHORIZATION_FAILED for o in outcomes[first_denied:])
    # The edge's own record: Produce allowed by the lease (rule 3) strictly before not_after, denied
    # by default from not_after on.
    def produce_lines():
        lines = [line for line in read_audit(audit) if line["api_key"] == "Produce"]
        allows = [line for line in lines if line["decision"] == "allow"]
        denies = [line for line in lines if line["decision"] == "deny"]
        return (allows, denies) if len(allows) >= len(before) and denies else None
    allows, denies = wait_for(produce_lines, 10, what="the lease's Produce decisions audited")
    assert all(line["rule"] == {"index": 3, "principal": SPIFFE_BILLING} for line in allows), allows
    assert all(parse_time(line["time"]) < not_after_dt for line in allows), allows
    assert all(parse_time(line["time"]) >= not_after_dt and line["rule"] == "default-deny"
               for line in denies), denies
    at_broker = read_at_broker(t.bootstrap, "orders-lease")
    assert at_broker == [r[2] for r in results if r[3] is None]
    assert not {r[2] for r in after} & set(at_broker)


def test_leased_read_expires_under_a_running_consumer(broker, edge, pki, lib):
    """billing may Read `stream` until `not_after`; a consumer keeps fetching while records keep
    arriving at the broker: nothing produced after the lease ended is delivered, and the client is
    told TOPIC_AUTHORIZATION_FAILED (Fetch sessions are off, so the broker cannot keep serving it)."""
    from confluent_kafka import Producer
    t = broker(clean=True)  # fixed topic and group names: the module's cluster, emptied
    create_topics_at_broker(t.bootstrap, ["stream"])
    not_after_dt = in_seconds(8)
    not_after = not_after_dt.timestamp()
    rules = example_rules() + [
        {"principal": SPIFFE_BILLING, "allow": ["Describe"], "topic": "stream"},
        {"principal": SPIFFE_BILLING, "allow": ["Read"], "topic": "stream", "not_after": rfc3339(not_after_dt)},
    ]
    vc = authz_cluster(t, pki, rules)
    edge([vc])
    direct = Producer({"bootstrap.servers": t.bootstrap, "linger.ms": 0})
    consumer = PollingConsumer(Principal(pki, vc, "billing"), lib, "stream", "shop-stream")
    # A record is appended somewhere between its send and its ack: sent after `not_after` means
    # appended after it; acked before `not_after` means appended before it.
    sent_at: dict[bytes, float] = {}
    produced_at: dict[bytes, float] = {}
    received: list[tuple[float, bytes]] = []
    errors: list[tuple[float, int]] = []
    i = 0
    next_record = time.time()
    try:
        while time.time() < not_after + 4:
            if time.time() >= next_record:
                v = b"s-%d" % i
                i += 1
                sent_at[v] = time.time()
                direct.produce("stream", value=v)
                assert direct.flush(10) == 0
                produced_at[v] = time.time()
                next_record += 0.1
            values, codes = consumer.poll_once(0.05)
            now = time.time()
            received += [(now, v) for v in values]
            errors += [(now, c) for c in codes]
    finally:
        consumer.close()
    assert received and min(at for at, _ in received) < not_after, "nothing consumed while leased"
    late = [v for at, v in received if sent_at[v] > not_after]
    assert late == [], f"records produced after the lease ended were delivered: {late}"
    # It was live up to the expiry, and stopped right after (a Fetch sent just before not_after may
    # still be answered, after up to the broker's fetch wait).
    assert max(produced_at[v] for _, v in received) > not_after - 2, received[-5:]
    assert all(at < not_after + 2 for at, _ in received), received[-5:]
    assert [c for at, c in errors if at >= not_after] and \
        {c for at, c in errors if at >= not_after} == {TOPIC_AUTHORIZATION_FAILED}, errors
    assert not [c for at, c in errors if at < not_after], errors


def test_rule_removed_live_denies_the_open_producer(broker, edge, pki, lib):
    """Removing a grant from the config file applies to the connection a producer already has: no
    reconnect, its next Produce is denied. (Edges built before main 6129063 restarted the whole
    virtual cluster on such a change, closing connections and leaving broker ports unbound.)"""
    t = broker(clean=True)  # fixed topic and group names: the module's cluster, emptied
    create_topics_at_broker(t.bootstrap, ["orders-live"])
    grant = {"principal": SPIFFE_BILLING, "allow": ["Write"], "topic": "orders-live"}
    vc = authz_cluster(t, pki, example_rules() + [grant])
    e = edge([vc])
    p = Principal(pki, vc, "billing").producer(lib)
    assert p.send("orders-live", b"live-before") is None
    reloads_logged = e.log_text().count("authorization rules reloaded")
    connections = e.metric("strait_connections", virtual_cluster="secure")

    vc.extra["authorization"]["rules"].remove(grant)
    write_config_atomically(e)
    wait_for(lambda: e.log_text().count("authorization rules reloaded") > reloads_logged, 10,
             what="the edge to reload its rules")
    # The same producer is denied on its next request, over the connection it already has.
    denied = [b"live-after-%d" % i for i in range(3)]
    assert p.send("orders-live", denied[0], timeout=8) == TOPIC_AUTHORIZATION_FAILED
    assert [p.send("orders-live", v, timeout=8) for v in denied[1:]] == [TOPIC_AUTHORIZATION_FAILED] * 2
    assert e.metric("strait_connections", virtual_cluster="secure") == connections, \
        "the producer had to reconnect: the rule change closed its connections"
    assert e.metric("strait_connections_open", virtual_cluster="secure") >= 1
    p.close()
    fresh = Principal(pki, vc, "billing").producer(lib)
    assert fresh.send("orders-live", b"live-fresh") == TOPIC_AUTHORIZATION_FAILED
    fresh.close()
    assert read_at_broker(t.bootstrap, "orders-live") == [b"live-before"]


def test_audit_lines_for_every_decision_and_metrics(broker, edge, pki, tmp_path):
    """Two virtual clusters on one broker: `full` audits every allow, `denies` none (sample 0.0)."""
    t = broker(clean=True)  # fixed topic and group names: the module's cluster, emptied
    create_topics_at_broker(t.bootstrap, TOPICS)
    full_path = tmp_path / "audit-full.jsonl"
    denies_path = tmp_path / "audit-denies.jsonl"
    full = authz_cluster(t, pki, example_rules(), name="full", audit={"path": str(full_path), "sample_allows": 1.0})
    denies = authz_cluster(t, pki, example_rules(), name="denies",
                           audit={"path": str(denies_path), "sample_allows": 0.0})
    e = edge([full, denies])
    started = datetime.now(timezone.utc)

    for vc in (full, denies):
        orders = Principal(pki, vc, "orders")
        billing = Principal(pki, vc, "billing")
        p = orders.producer("confluent")
        assert p.send("orders-eu", b"%s-ok" % vc.name.encode()) is None
        p.close()
        p = billing.producer("confluent")
        assert p.send("orders-eu", b"%s-denied" % vc.name.encode()) == TOPIC_AUTHORIZATION_FAILED
        p.close()
        assert group_error(billing, "confluent", "orders-eu", "analytics") == GROUP_AUTHORIZATION_FAILED

    keys = {"time", "principal", "client_address", "virtual_cluster", "api_key", "resource_type",
            "resource_name", "operation", "decision", "rule"}

    def has(lines, **want):
        return [line for line in lines if all(line.get(k) == v for k, v in want.items())]

    def full_lines():
        lines = read_audit(full_path)
        if has(lines, decision="deny", api_key="FindCoordinator") and has(lines, api_key="Produce",
                                                                            decision="allow"):
            return lines
        return None
    lines = wait_for(full_lines, 10, what="audit lines of the full cluster")
    finished = datetime.now(timezone.utc)
    for line in lines:
        assert set(line) >= keys, line
        assert line["virtual_cluster"] == "full"
        assert line["decision"] in ("allow", "deny")
        assert started <= parse_time(line["time"]) <= finished, line
        host, _, port = line["client_address"].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0, line
        assert line["principal"] in (SPIFFE_ORDERS, SPIFFE_BILLING), line
        if line["decision"] == "deny":
            assert line["rule"] == "default-deny", line
        else:
            assert isinstance(line["rule"], dict) and {"index", "principal"} <= set(line["rule"]), line

    # The allowed produce names the rule that allowed it: rule 0, orders' own.
    allowed = has(lines, principal=SPIFFE_ORDERS, api_key="Produce", resource_type="Topic",
                  resource_name="orders-eu", operation="Write", decision="allow")
    assert allowed and allowed[0]["rule"] == {"index": 0, "principal": SPIFFE_ORDERS}
    assert has(lines, principal=SPIFFE_BILLING, api_key="Produce", resource_type="Topic",
               resource_name="orders-eu", operation="Write", decision="deny")
    assert has(lines, principal=SPIFFE_BILLING, api_key="FindCoordinator", resource_type="Group",
               resource_name="analytics", decision="deny")
    # billing's Describe of orders-eu was allowed by rule 1 (every shop account).
    describe = has(lines, principal=SPIFFE_BILLING, resource_name="orders-eu", operation="Describe",
                   decision="allow")
    assert describe and describe[0]["rule"] == {"index": 1, "principal": SHOP_ANY}

    # sample_allows 0.0: denies are all there, allows never.
    def denies_lines():
        ls = read_audit(denies_path)
        return ls if has(ls, api_key="FindCoordinator") and has(ls, api_key="Produce") else None
    dlines = wait_for(denies_lines, 10, what="deny lines of the sampled cluster")
    assert all(line["decision"] == "deny" for line in dlines), dlines
    assert has(dlines, principal=SPIFFE_BILLING, api_key="Produce", resource_name="orders-eu",
               operation="Write", virtual_cluster="denies")
    assert has(dlines, principal=SPIFFE_BILLING, api_key="FindCoordinator", resource_name="analytics",
               virtual_cluster="denies")

    # Metrics count decisions per cluster and result. Denies are never sampled away, so the counter
    # and the deny lines agree once the writer has caught up; allows are counted even when not logged.
    def counters_match_lines():
        for name, path in (("full", full_path), ("denies", denies_path)):
            deny_lines = [line for line in read_audit(path) if line["decision"] == "deny"]
            if e.metric("strait_authz_decisions", virtual_cluster=name, result="deny") != len(deny_lines):
                return False
        # sample_allows 1.0: every allow decision has its line too.
        full_allows = [line for line in read_audit(full_path) if line["decision"] == "allow"]
        if e.metric("strait_authz_decisions", virtual_cluster="full", result="allow") != len(full_allows):
            return False
        written = len(read_audit(full_path)) + len(read_audit(denies_path))
        return e.metric("strait_authz_audit_lines_written") == written
    wait_for(counters_match_lines, 10, what="decision counters and audit lines to agree")
    for name in ("full", "denies"):
        assert e.metric("strait_authz_decisions", virtual_cluster=name, result="deny") >= 2
        assert e.metric("strait_authz_decisions", virtual_cluster=name, result="allow") > 0
