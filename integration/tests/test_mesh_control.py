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
