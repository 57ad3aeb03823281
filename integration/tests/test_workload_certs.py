"""Kafka clients with certificates from the control plane's CA, without Istio (docs/security.md,
"Workload certificates for Kafka clients"): a strait-control node on mTLS runs the CA of example.org;
`straitctl cert issue` gives each workload cert.pem, key.pem and bundle.pem; strait-edge verifies
client certificates against the CA bundle from `straitctl ca bundle` (`tls.client_trust_bundles`) and
authorizes by the workload's SPIFFE ID. confluent-kafka, kafka-python and the Java client.

The commands here are the how-to's commands."""

import shutil

import pytest

from lib.authz import TOPIC_AUTHORIZATION_FAILED, Principal, consume_with_group, create_topics_at_broker, \
    read_at_broker
from lib.control import ControlPlane
from lib.edge import VirtualCluster
from lib.pki import Pki
from lib.wait import wait_for

DOMAIN = "example.org"
ALLOWED = f"spiffe://{DOMAIN}/ns/a/sa/x"
DENIED = f"spiffe://{DOMAIN}/ns/a/sa/y"
TOPIC = "orders-a"


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """One CA node for the module (its certificates are independent of the scenario)."""
    d = tmp_path_factory.mktemp("control")
    cp = ControlPlane(d, d / "logs", trust_domain=DOMAIN)
    try:
        yield cp.start()
    finally:
        cp.stop()


@pytest.fixture
def workloads(control, tmp_path):
    """The edge's serving certificate (a test CA, as a Kafka listener has) and, from the control
    plane: the CA bundle and the certificates of ns/a/sa/x and ns/a/sa/y. Also a certificate of a
    foreign CA claiming ns/a/sa/x."""
    pki = Pki(tmp_path / "pki")
    pki.ca("ca")
    pki.leaf("server", dns=["localhost"], ips=["127.0.0.1"])
    pki.ca("foreign-ca")
    pki.leaf("foreign", ca="foreign-ca", uris=[ALLOWED])
    # The how-to's commands:
    #   straitctl ca bundle --out example.org-bundle.pem
    #   straitctl cert issue --spiffe-id spiffe://example.org/ns/a/sa/x --ttl 10m --out x
    bundle = control.ca_bundle(tmp_path / "example.org-bundle.pem")
    for name, spiffe_id in [("x", ALLOWED), ("y", DENIED)]:
        out = control.cert_issue(spiffe_id, tmp_path / name, ttl="10m")
        assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
        # The issued bundle.pem is the same set of roots as `straitctl ca bundle`.
        assert (out / "bundle.pem").read_text() == bundle.read_text()
        # Principal reads <name>.pem / <name>.key from the PKI directory.
        shutil.copy(out / "cert.pem", pki.pem(name))
        shutil.copy(out / "key.pem", pki.key(name))
    return pki, bundle


def workload_cluster(broker, pki: Pki, bundle) -> VirtualCluster:
    tls = {"cert": str(pki.pem("server")), "key": str(pki.key("server")), "client_auth": "required",
           "client_trust_bundles": [{"trust_domain": DOMAIN, "pem_file": str(bundle)}]}
    authorization = {"unknown_api_keys": "deny", "rules": [
        {"principal": ALLOWED, "allow": ["Write", "Read", "Describe"], "topic": "orders-*"},
        {"principal": ALLOWED, "allow": ["Read"], "group": "a-*"},
    ]}
    return VirtualCluster(name="workloads", upstream=broker.bootstrap_servers, advertised_host="localhost",
                          extra={"tls": tls, "authorization": authorization})


def test_workload_certificates_produce_and_consume(broker, edge, workloads, lib):
    pki, bundle = workloads
    t = broker(clean=True)
    create_topics_at_broker(t.bootstrap, [TOPIC])
    vc = workload_cluster(t, pki, bundle)
    e = edge([vc])

    x = Principal(pki, vc, "x")
    p = x.producer(lib)
    values = [b"%s-x-%d" % (lib.encode(), i) for i in range(5)]
    assert p.send_many([(TOPIC, v) for v in values]) == [None] * 5
    p.close()
    assert consume_with_group(x, lib, TOPIC, "a-readers", 5) == values

    # Another workload of the same CA: authenticated, refused by the rules.
    y = Principal(pki, vc, "y")
    p = y.producer(lib)
    assert p.send(TOPIC, b"from-y") == TOPIC_AUTHORIZATION_FAILED
    p.close()
    assert read_at_broker(t.bootstrap, TOPIC) == values
    assert e.metric("strait_authz_decisions", virtual_cluster="workloads", result="deny") >= 1


def test_foreign_ca_claiming_the_domain_is_refused(broker, edge, workloads):
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    pki, bundle = workloads
    t = broker()
    vc = workload_cluster(t, pki, bundle)
    e = edge([vc])
    foreign = AdminClient(Principal(pki, vc, "foreign").confluent())
    with pytest.raises(KafkaException):
        foreign.list_topics(timeout=3)
    # librdkafka withholds a certificate whose issuer the server's CA hints do not name, so the edge
    # sees none; presented anyway (Python's ssl and rustls clients do), it is refused as
    # `unknown_issuer` (test_bad_input.py, edge/tests/trust_domains.rs). Either way no session.
    wait_for(lambda: e.metric("strait_tls_handshakes", result="failed", reason="no_client_certificate") > 0,
             10, what="the foreign CA's certificate withheld and the handshake refused")
    assert e.metric("strait_tls_handshakes", result="ok") == 0
    assert e.metric("strait_connections") == 0
