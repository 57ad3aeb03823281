"""The two sites on separate network stacks: west's edge runs in its own network namespace, joined to the
root namespace (east's edge and Apache Kafka) by a veth pair the test creates; `strait-impair` on east's
side of the pair adds a 50 ms round trip and 0.1% loss each way. Clients in the root namespace reach west
only at its address on the pair, and west reaches east only across it: the tunnel runs over a real
interface (1500-byte MTU, the kernel's veth path) rather than loopback.
"""

import os

import pytest

from lib.clients import unique
from lib.edge import Edge, VirtualCluster
from lib.impair import Impair
from lib.netns import SiteNamespace
from lib.ports import free_port
from lib.wait import wait_for
from tests.test_mesh import (EAST, EAST_ID, WEST, WEST_ID, client, consume, create_topic, east_edge, produce,
                             readyz, sites)


@pytest.mark.parametrize("transport", ["quic", "tls-tcp"])
def test_sites_in_their_own_namespaces_across_a_lossy_50ms_veth_link(broker, logs, tmp_path, transport):
    kafka = broker()
    east_pki, west_pki = sites(tmp_path)
    tls_tcp = transport == "tls-tcp"
    with SiteNamespace("west") as ns:
        west_pki.leaf("edge-ns", uris=[WEST_ID], ips=[ns.inside])
        mesh_port, tcp_port, relay_port = free_port(), free_port(), free_port()
        relay = Impair(logs, udp=[] if tls_tcp else [(relay_port, mesh_port)],
                       tcp=[(relay_port, tcp_port)] if tls_tcp else [], delay_ms=25,
                       loss=0.0 if tls_tcp else 0.001, listen_host=ns.outside)
        east = east_edge(logs, tmp_path, kafka, east_pki, west_pki, mesh_port,
                         tcp_port=tcp_port if tls_tcp else None).start()
        remote = VirtualCluster(name="east-orders", upstream=[], host=ns.inside, advertised_host=ns.inside, extra={
            "upstream": {"remote": {"peer": "edge-east", "virtual_cluster": "orders"}, "connect_timeout": "5s"},
            "tls": {"cert": str(west_pki.pem("edge-ns")), "key": str(west_pki.key("edge-ns")),
                    "client_trust_bundles": [{"trust_domain": WEST, "pem_file": str(west_pki.pem("ca"))}]},
        })
        west = Edge(logs, [remote], netns=ns.name, admin_host=ns.inside, extra={"mesh": {
            "identity": {"cert": str(west_pki.pem("edge")), "key": str(west_pki.key("edge"))},
            "trust_bundles": [{"trust_domain": EAST, "pem": str(east_pki.pem("ca"))}],
            "peers": [{"name": "edge-east", "address": f"{ns.outside}:{relay_port}", "spiffe_id": EAST_ID,
                       "transport": transport}],
        }})
        try:
            west.start()
            wait_for(lambda: west.metric("strait_mesh_peer_connected", peer="edge-east") == 1, 30,
                     what=f"west's {transport} tunnel across the veth pair")
            assert readyz(west) == "ready\ntunnel edge-east: up\n"
            topic = unique("netns")
            create_topic(kafka.bootstrap, topic)
            orders = client(west, west_pki, "orders")
            values = [b"%06d-" % i + os.urandom(8 << 10) for i in range(1100)] + [os.urandom(1 << 20)]
            assert produce({**orders, "linger.ms": 5}, topic, values) == [None] * len(values)
            assert consume({**orders, "fetch.max.bytes": 4 << 20}, topic, len(values), timeout=90) == values
            # West's brokers are advertised at its namespace address, never east's or Kafka's.
            from confluent_kafka.admin import AdminClient
            brokers = AdminClient(orders).list_topics(timeout=10).brokers.values()
            assert brokers and all(b.host == ns.inside for b in brokers)
            stats = relay.stats()
            if tls_tcp:
                assert stats["tcp_connections"] == 1 and stats["tcp_bytes"] > 10 << 20, stats
            else:
                assert stats["udp_dropped"] >= 1, stats
                assert west.metric("strait_mesh_rtt_seconds", peer="edge-east") >= 0.045
            assert east.unexpected_errors() == [] and west.unexpected_errors() == []
        finally:
            west.terminate()
            east.terminate()
            relay.stop()
