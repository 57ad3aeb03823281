"""The mesh managed by the control plane, with real processes: a strait-control that is the CA of
mesh.example, two strait-edges that join with tokens and get everything from it (their certificates, the
`MeshPeer`s, the Edge's `spec.mesh` listener, a `VirtualCluster` with `remote:`), Apache Kafka behind east,
and a confluent-kafka client at west with a certificate from `straitctl cert issue`.

- the client produces and consumes east's topic through west's bootstrap; the records are at east's broker;
- `straitctl ca rotate`: both edges swap the new bundle into their mesh trust, the tunnel stays up;
- a live change of east's `MeshPeer` (west may no longer assert the shop's principals) rebuilds east's
  tunnels, and the next connection of the same client is refused at stream open.
"""

import time

from lib.clients import unique
from lib.control import ControlPlane, binary
from lib.ports import free_port, free_range
from lib.procs import Proc
from lib.wait import wait_for
from tests.test_mesh import consume, create_topic, produce

DOMAIN = "mesh.example"
ORDERS = f"spiffe://{DOMAIN}/ns/shop/sa/orders"


def resources(kafka: str, mesh_port: int, east: tuple[int, range], west: tuple[int, range],
              may_assert: str) -> str:
    return f"""
kind: KafkaCluster
name: east
spec: {{ bootstrap_servers: ["{kafka}"] }}
---
kind: Edge
name: edge-east
spec: {{ mesh: {{ listen: "127.0.0.1:{mesh_port}" }} }}
---
kind: VirtualCluster
name: orders
spec:
  edge: edge-east
  cluster: east
  bootstrap: 127.0.0.1:{east[0]}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {east[1].start}-{east[1].stop - 1} }}
---
kind: MeshPeer
name: east-west
spec:
  edge: edge-east
  peer: edge-west
  spiffe_id: spiffe://{DOMAIN}/edge/edge-west
  may_assert: ["{may_assert}"]
  exports: [orders]
---
kind: MeshPeer
name: west-east
spec:
  edge: edge-west
  peer: edge-east
  addresses: ["127.0.0.1:{mesh_port}"]
  spiffe_id: spiffe://{DOMAIN}/edge/edge-east
---
kind: VirtualCluster
name: east-orders
spec:
  edge: edge-west
  remote: {{ peer: edge-east, virtual_cluster: orders }}
  bootstrap: 127.0.0.1:{west[0]}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {west[1].start}-{west[1].stop - 1} }}
  tls: {{ identity: svid, client_trust_bundles: [{DOMAIN}] }}
"""


def start_edge(control: ControlPlane, name: str, tmp, logs) -> tuple[Proc, int]:
    admin = free_port()
    token = control.token_create(f"spiffe://{DOMAIN}/edge/{name}")
    edge = Proc(name, [binary("strait-edge"), "--control", control.endpoints, "--name", name,
                       "--join-token", token, "--cache-dir", str(tmp / f"{name}-cache"),
                       "--admin", f"127.0.0.1:{admin}"], logs)
    edge.start()
    return edge, admin


def metric(admin: int, name: str, **labels) -> float:
    from lib.edge import METRIC_LINE
    import re
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if not m or m.group(1) not in (name, name + "_total"):
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_a_mesh_configured_by_the_control_plane_and_changed_live(broker, logs, tmp_path):
    kafka = broker()
    control = ControlPlane(tmp_path / "control", logs, trust_domain=DOMAIN).start()
    mesh_port = free_port()
    east_ports, west_ports = (free_port(), free_range(8)), (free_port(), free_range(8))
    spec = tmp_path / "mesh.yaml"
    spec.write_text(resources(kafka.bootstrap, mesh_port, east_ports, west_ports, f"spiffe://{DOMAIN}/ns/shop/*"))
    control.ctl("apply", "-f", str(spec), check=True)
    client_dir = control.cert_issue(ORDERS, tmp_path / "orders", ttl="30m")
    east, east_admin = start_edge(control, "edge-east", tmp_path, logs)
    west, west_admin = start_edge(control, "edge-west", tmp_path, logs)
    try:
        wait_for(lambda: metric(west_admin, "strait_mesh_peer_connected", peer="edge-east") == 1, 60,
                 what="west's tunnel to east, from the control plane's MeshPeers")
        topic = unique("mesh")
        create_topic(kafka.bootstrap, topic)
        client = {"bootstrap.servers": f"127.0.0.1:{west_ports[0]}", "security.protocol": "SSL",
                  "ssl.ca.location": str(client_dir / "bundle.pem"),
                  "ssl.certificate.location": str(client_dir / "cert.pem"),
                  "ssl.key.location": str(client_dir / "key.pem")}
        values = [b"cp-%d" % i for i in range(20)]
        assert produce(client, topic, values) == [None] * len(values)
        assert consume(client, topic, len(values)) == values
        assert consume({"bootstrap.servers": kafka.bootstrap}, topic, len(values)) == values

        # A CA rotation puts the next root in the bundle at once: both edges swap it into their mesh trust
        # (the file the control plane's bundle is kept in changed) and keep the tunnel that is up.
        dialed = metric(west_admin, "strait_mesh_connections", peer="edge-east", direction="dialed")
        assert dialed == 1
        rotate = control.ctl("ca", "rotate")
        assert rotate.returncode == 0, rotate.stderr
        for proc in (east, west):
            wait_for(lambda p=proc: "mesh trust bundles changed" in p.current_log(), 30,
                     what=f"{proc.name} swapping the rotated bundle into its mesh trust")
        assert produce(client, topic, [b"rotated"]) == [None]
        assert metric(west_admin, "strait_mesh_connections", peer="edge-east", direction="dialed") == dialed
        values.append(b"rotated")

        # Live: west may no longer forward the shop's principals to east.
        spec.write_text(resources(kafka.bootstrap, mesh_port, east_ports, west_ports,
                                  f"spiffe://{DOMAIN}/ns/billing/*"))
        control.ctl("apply", "-f", str(spec), check=True)
        wait_for(lambda: "mesh (re)configured" in east.current_log(), 30, what="east rebuilding its mesh")
        wait_for(lambda: metric(west_admin, "strait_mesh_peer_connected", peer="edge-east") == 1, 60,
                 what="west's tunnel to the rebuilt east")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            produce({**client, "message.timeout.ms": 5000}, topic, [b"refused"])
            if metric(east_admin, "strait_mesh_stream_refusals", peer="edge-west",
                      reason="principal_not_allowed") >= 1:
                break
        assert metric(east_admin, "strait_mesh_stream_refusals", peer="edge-west",
                      reason="principal_not_allowed") >= 1
        assert b"refused" not in consume({"bootstrap.servers": kafka.bootstrap}, topic, len(values) + 1,
                                         timeout=5)
    finally:
        west.stop()
        east.stop()
        control.stop()


def test_straitctl_fails_a_group_over_to_a_standby_behind_the_peer_edge(broker, logs, tmp_path):
    """A FailoverGroup whose standby (east's Kafka) edge-west reaches only through edge-east: west's
    `dr-orders` names it in `remote_members`. edge-west probes it through the tunnel and reports it up to
    the control plane; `straitctl failover` moves `dr-orders` to it in place (generation 1 in `get fg`), the
    same client producer goes on through west's bootstrap and its records land at east's Kafka;
    `straitctl failback` returns to west's own Kafka."""
    import json
    from tests.test_failover import ContinuousProducer, values
    from tests.test_encryption import end_offset
    east_kafka = broker()
    west_kafka = broker(dedicated=True, name="kafka-west")
    control = ControlPlane(tmp_path / "control", logs, trust_domain=DOMAIN).start()
    mesh_port = free_port()
    east_ports, west_ports, dr_ports = (free_port(), free_range(8)), (free_port(), free_range(8)), \
        (free_port(), free_range(8))
    spec = tmp_path / "mesh.yaml"
    spec.write_text(resources(east_kafka.bootstrap, mesh_port, east_ports, west_ports,
                              f"spiffe://{DOMAIN}/ns/shop/*") + f"""
---
kind: KafkaCluster
name: west
spec: {{ bootstrap_servers: ["{west_kafka.bootstrap_servers[0]}"] }}
---
kind: FailoverGroup
name: orders-dr
spec: {{ primary: west, standby: [east], mode: manual, health: {{ interval_ms: 300 }} }}
---
kind: VirtualCluster
name: dr-orders
spec:
  edge: edge-west
  failover_group: orders-dr
  remote_members: {{ east: {{ peer: edge-east, virtual_cluster: orders }} }}
  bootstrap: 127.0.0.1:{dr_ports[0]}
  brokers: {{ advertised_host: 127.0.0.1, port_range: {dr_ports[1].start}-{dr_ports[1].stop - 1} }}
  tls: {{ identity: svid, client_trust_bundles: [{DOMAIN}] }}
""")
    control.ctl("apply", "-f", str(spec), check=True)
    client_dir = control.cert_issue(ORDERS, tmp_path / "orders", ttl="30m")
    east, east_admin = start_edge(control, "edge-east", tmp_path, logs)
    west, west_admin = start_edge(control, "edge-west", tmp_path, logs)

    def fg() -> dict:
        r = control.ctl("get", "fg", "orders-dr", "-o", "json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout).get("status", {})

    def west_on(generation: int) -> bool:
        return fg().get("edges", {}).get("edge-west", {}).get("generation") == generation

    p = None
    try:
        wait_for(lambda: metric(west_admin, "strait_mesh_peer_connected", peer="edge-east") == 1, 60,
                 what="west's tunnel to east")
        # West's evidence on the remote member comes through the tunnel.
        wait_for(lambda: fg().get("edges", {}).get("edge-west", {}).get("health", {})
                 .get("east", {}).get("state") == "up", 60,
                 what="edge-west reporting east (behind edge-east) up to the control plane")
        wait_for(lambda: west_on(0), 30, what="edge-west serving generation 0")
        topic = unique("mesh-dr")
        create_topic(west_kafka.bootstrap_servers[0], topic)
        create_topic(east_kafka.bootstrap, topic)
        ssl = {"security.protocol": "SSL", "ssl.ca.location": str(client_dir / "bundle.pem"),
               "ssl.certificate.location": str(client_dir / "cert.pem"),
               "ssl.key.location": str(client_dir / "key.pem")}
        p = ContinuousProducer(f"127.0.0.1:{dr_ports[0]}", topic, **ssl).start()
        wait_for(lambda: len(p.acked) >= 20, 60, what="records acknowledged by west's own Kafka")
        switched_at = time.monotonic()
        r = control.ctl("failover", "orders-dr", "--reason", "drill")
        assert r.returncode == 0 and "active east at generation 1" in r.stdout, (r.stdout, r.stderr)
        wait_for(lambda: west_on(1), 30, what="edge-west reporting generation 1")
        wait_for(lambda: len(p.acked_after(switched_at)) >= 20 and end_offset(east_kafka.bootstrap, topic) >= 20,
                 60, what="records acknowledged after the switch, at east's Kafka")
        # In place: the virtual cluster was not restarted.
        assert metric(west_admin, "strait_upstream_swaps", virtual_cluster="dr-orders") == 1
        r = control.ctl("failback", "orders-dr")
        assert r.returncode == 0 and "active west at generation 2" in r.stdout, (r.stdout, r.stderr)
        wait_for(lambda: west_on(2), 30, what="edge-west back on west's Kafka")
        back_at = time.monotonic()
        wait_for(lambda: len(p.acked_after(back_at)) >= 20, 60, what="records acknowledged after the failback")
    finally:
        if p is not None:
            p.stop()
        west.stop()
        east.stop()
        control.stop()
    assert p.fatal == [] and p.failed == [], (p.fatal, p.failed[:3])
    at_west, at_east = values(west_kafka.bootstrap_servers[0], topic), values(east_kafka.bootstrap, topic)
    acked = sorted(f"record-{n}" for _, n in p.acked)
    assert sorted(at_west + at_east) == acked, "every acknowledged record stored exactly once"
    print(f"failover command to first acknowledgement at east: {p.first_ack_of(at_east) - switched_at:.2f} s")
