"""The edge follows the control plane: a virtual cluster applied with straitctl is served by an edge
that has no config file; a rule change applies to an open connection; with the control plane gone
the edge keeps serving, and after a restart it serves from its cache. Everything talks mTLS: the
node, straitctl (an admin SPIFFE ID) and the edge (`spiffe://test.example/edge/edge-east`)."""

import json
import signal
import socket
import subprocess
from pathlib import Path

from lib.clients import unique
from lib.edge import default_target_dir
from lib.pki import Pki
from lib.ports import free_port, free_range
from lib.procs import Proc
from lib.wait import wait_for


def binary(name: str) -> str:
    path = default_target_dir() / "debug" / name
    assert path.is_file(), f"{path} missing: cargo build --workspace --bins"
    return str(path)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


DOMAIN = "test.example"


def control_pki(directory: Path) -> Pki:
    pki = Pki(directory)
    pki.ca("ca")
    pki.leaf("node", ips=["127.0.0.1"], dns=["localhost"], uris=[f"spiffe://{DOMAIN}/control/1"])
    pki.leaf("admin", uris=[f"spiffe://{DOMAIN}/admin/ops"])
    pki.leaf("edge-east", uris=[f"spiffe://{DOMAIN}/edge/edge-east"])
    return pki


class Control:
    def __init__(self, logs: Path, data: Path, pki: Pki):
        self.port = free_port()
        self.logs = logs
        self.pki = pki
        self.applied = 0
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = Proc(f"control-{self.port}", [
            binary("strait-control"), "--dev", "--data-dir", str(data), "--listen", self.endpoint,
            "--tls-cert", str(pki.pem("node")), "--tls-key", str(pki.key("node")),
            "--tls-client-ca", str(pki.pem("ca")), "--trust-domain", DOMAIN,
            "--admin-identity", f"spiffe://{DOMAIN}/admin/*"], logs)

    def start(self) -> "Control":
        self.proc.start()
        wait_for(lambda: self.ctl("members").returncode == 0, 30, what="control plane answering")
        return self

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([binary("straitctl"), "--endpoints", self.endpoint, "--ca", str(self.pki.pem("ca")),
                               "--cert", str(self.pki.pem("admin")), "--key", str(self.pki.key("admin")), *args],
                              capture_output=True, text=True, timeout=30)

    def apply(self, yaml_text: str) -> None:
        self.applied += 1
        path = self.logs / f"resources-{self.port}-{self.applied}.yaml"
        path.write_text(yaml_text)
        result = self.ctl("apply", "-f", str(path))
        assert result.returncode == 0, result.stderr

    def stop(self) -> None:
        self.proc.stop()


def resources(broker_bootstrap: str, bootstrap_port: int, ports: range, ops: list[str]) -> str:
    return f"""
kind: KafkaCluster
name: east
spec:
  bootstrap_servers: ["{broker_bootstrap}"]
---
kind: VirtualCluster
name: east-local
spec:
  edge: edge-east
  cluster: east
  bootstrap: 127.0.0.1:{bootstrap_port}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {ports.start}-{ports.stop - 1} }}
---
kind: AuthorizationPolicy
name: apps
spec:
  rules:
  - principal: "*"
    allow: [{", ".join(ops)}]
    topics: ["orders-*"]
"""


def delivered(errors: list) -> bool:
    """One delivery report, and it was a success.

    Never `errors == [None]`: confluent-kafka's KafkaError.__eq__ converts None to an int without
    checking, which leaves a TypeError pending that surfaces later in an unrelated builtin.
    """
    return len(errors) == 1 and errors[0] is None


def start_edge(logs: Path, control: Control, cache: Path, admin_port: int) -> Proc:
    edge = Proc(f"edge-{admin_port}", [binary("strait-edge"), "--control", control.endpoint, "--name", "edge-east",
                                      "--control-ca", str(control.pki.pem("ca")),
                                      "--control-cert", str(control.pki.pem("edge-east")),
                                      "--control-key", str(control.pki.key("edge-east")),
                                      "--cache-dir", str(cache), "--admin", f"127.0.0.1:{admin_port}"], logs)
    edge.start()
    return edge


def test_edge_follows_the_control_plane(broker, logs, tmp_path):
    from confluent_kafka import KafkaError, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    t = broker()
    topic = unique("orders")
    direct = AdminClient({"bootstrap.servers": t.bootstrap})
    direct.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)

    control = Control(logs, tmp_path / "control", control_pki(tmp_path / "pki")).start()
    bootstrap_port, ports, admin_port = free_port(), free_range(8), free_port()
    control.apply(resources(t.bootstrap, bootstrap_port, ports, ["write", "describe", "read"]))
    cache = tmp_path / "edge-cache"
    edge = start_edge(logs, control, cache, admin_port)
    try:
        wait_for(lambda: accepts(bootstrap_port), 30, what="edge serving the virtual cluster it was given")
        bootstrap = f"127.0.0.1:{bootstrap_port}"
        producer = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000})
        errors: list = []

        def produce(value: bytes) -> None:
            producer.produce(topic, value=value, on_delivery=lambda err, msg: errors.append(err))
            producer.flush(20)

        produce(b"allowed")
        assert delivered(errors), errors

        # The edge reports itself.
        def heartbeat():
            out = control.ctl("get", "Edge", "edge-east", "-o", "json")
            return out.returncode == 0 and "east-local" in json.dumps(json.loads(out.stdout).get("status"))
        wait_for(heartbeat, 20, what="edge heartbeat naming the virtual cluster it serves")

        # Remove Write: the same producer (same open connection) is denied on its next request.
        control.apply(resources(t.bootstrap, bootstrap_port, ports, ["describe", "read"]))

        def denied():
            errors.clear()
            produce(b"denied")
            return errors and errors[0] is not None and errors[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
        wait_for(denied, 20, interval=0.2, what="rule change enforced on the open connection")

        # Give Write back, then lose the whole control plane: the edge keeps serving.
        control.apply(resources(t.bootstrap, bootstrap_port, ports, ["write", "describe", "read"]))

        def allowed_again():
            errors.clear()
            produce(b"allowed-again")
            return delivered(errors)
        wait_for(allowed_again, 20, interval=0.2, what="Write granted again")
        control.stop()
        errors.clear()
        produce(b"control-plane-down")
        assert delivered(errors), errors

        # A restart with the control plane still down serves the cached configuration.
        edge.signal(signal.SIGTERM)
        assert edge.wait(30) == 0
        # Losing the control plane is survivable, so nothing about it is an ERROR.
        assert edge.error_lines() == []
        edge = start_edge(logs, control, cache, admin_port)
        wait_for(lambda: accepts(bootstrap_port), 30, what="edge serving from its cache")
        producer2 = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000})
        results: list = []
        producer2.produce(topic, value=b"from-cache", on_delivery=lambda err, msg: results.append(err))
        producer2.flush(20)
        assert delivered(results), results
        assert edge.error_lines() == []
    finally:
        edge.stop()
        control.stop()


def test_untranslatable_change_keeps_the_last_good_config_and_says_why(logs, tmp_path):
    """Fail closed: a VirtualCluster the edge cannot translate (its tls names a TrustBundle that does not
    exist) leaves the edge serving its last good configuration, and its status says why."""
    control = Control(logs, tmp_path / "control", control_pki(tmp_path / "pki")).start()
    bootstrap_port, ports, admin_port = free_port(), free_range(8), free_port()
    good = resources("127.0.0.1:9", bootstrap_port, ports, ["read"])
    control.apply(good)
    edge = start_edge(logs, control, tmp_path / "edge-cache", admin_port)

    def status() -> dict:
        out = control.ctl("get", "Edge", "edge-east", "-o", "json")
        return (json.loads(out.stdout).get("status") or {}) if out.returncode == 0 else {}
    try:
        wait_for(lambda: accepts(bootstrap_port), 30, what="edge serving the virtual cluster it was given")
        wait_for(lambda: status().get("config_revision", 0) > 0, 20, what="edge reporting its revision")
        running = status()["config_revision"]
        control.apply(f"""
kind: VirtualCluster
name: east-local
spec:
  edge: edge-east
  cluster: east
  bootstrap: 127.0.0.1:{bootstrap_port}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {ports.start}-{ports.stop - 1} }}
  tls: {{ cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem, client_trust_bundles: [missing] }}
""")

        def reported() -> bool:
            message = status().get("message") or ""
            return "not applied, running the last good one" in message and \
                "VirtualCluster east-local: TrustBundle 'missing' is not known" in message
        wait_for(reported, 20, what="the refused change named in the edge's status")
        assert status()["config_revision"] == running
        assert accepts(bootstrap_port)

        # Putting the good configuration back clears the message.
        control.apply(good)
        wait_for(lambda: status().get("config_revision", 0) > running and not status().get("message"), 20,
                 what="status message cleared once a good configuration is in force")
        # A refused change is a WARN: the edge keeps serving.
        assert edge.error_lines() == []
    finally:
        edge.stop()
        control.stop()


def edge_metric(admin_port: int, name: str, **labels) -> float:
    import re
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        sample = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(sample.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_deny_list_from_the_control_plane_cuts_off_an_open_producer(broker, logs, tmp_path):
    """A DenyList applied with straitctl reaches the edge, which closes the denied identity's open
    mTLS connection at its next request; another identity keeps producing. The client certificates
    are verified against a TrustBundle bound to their trust domain."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    t = broker()
    topic = unique("deny")
    direct = AdminClient({"bootstrap.servers": t.bootstrap})  # kept alive: a collected one fails its futures
    direct.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    pki = control_pki(tmp_path / "pki")
    pki.leaf("listener", dns=["localhost"], ips=["127.0.0.1"])
    pki.leaf("orders", uris=[f"spiffe://{DOMAIN}/ns/shop/sa/orders"])
    pki.leaf("billing", uris=[f"spiffe://{DOMAIN}/ns/shop/sa/billing"])
    control = Control(logs, tmp_path / "control", pki).start()
    bootstrap_port, ports, admin_port = free_port(), free_range(8), free_port()
    ca_pem = "\n".join("    " + line for line in pki.pem("ca").read_text().splitlines())
    control.apply(f"""
kind: KafkaCluster
name: east
spec:
  bootstrap_servers: ["{t.bootstrap}"]
---
kind: TrustBundle
name: test-example
spec:
  trust_domain: {DOMAIN}
  pem: |
{ca_pem}
---
kind: VirtualCluster
name: east-local
spec:
  edge: edge-east
  cluster: east
  bootstrap: 127.0.0.1:{bootstrap_port}
  brokers: {{ advertised_host: localhost, port_range: {ports.start}-{ports.stop - 1} }}
  tls: {{ cert_file: "{pki.pem('listener')}", key_file: "{pki.key('listener')}", client_trust_bundles: [test-example] }}
""")
    edge = start_edge(logs, control, tmp_path / "edge-cache", admin_port)
    try:
        wait_for(lambda: accepts(bootstrap_port), 30, what="edge serving the virtual cluster")

        def producer(client: str) -> "Producer":
            return Producer({"bootstrap.servers": f"localhost:{bootstrap_port}", **pki.confluent_ssl(client),
                             "message.timeout.ms": 5000, "retries": 0})

        def send(p, value: bytes) -> list:
            errors: list = []
            p.produce(topic, value=value, on_delivery=lambda err, msg: errors.append(err))
            p.flush(10)
            return errors
        orders, billing = producer("orders"), producer("billing")
        assert delivered(send(orders, b"before")), "orders produces before the deny list"
        assert delivered(send(billing, b"before"))

        control.apply(f"""
kind: DenyList
name: incident
spec:
  spiffe_ids: ["spiffe://{DOMAIN}/ns/shop/sa/orders"]
  reason: key leaked
""")
        wait_for(lambda: edge_metric(admin_port, "strait_deny_list_identities") == 1, 20,
                 what="the deny list in force at the edge")
        assert not delivered(send(orders, b"after")), "the denied producer is cut off"
        wait_for(lambda: edge_metric(admin_port, "strait_identities_denied_total", stage="request") >= 1, 10,
                 what="the open connection cut off at its next request")
        assert delivered(send(billing, b"after")), "another identity keeps producing"
        assert edge.error_lines() == []
    finally:
        edge.stop()
        control.stop()
