"""A failover group whose standby is behind a peer edge (issue 14, item 6): west's edge serves `orders` from
west's own Kafka (the primary, direct TCP) and switches it in place to east's Kafka reached through the QUIC
tunnel to east's edge (`upstream.remote`), then back. Real Kafka clusters, two strait-edges, idempotent
librdkafka and Java producers with a west.example client certificate, through west's bootstrap only.

- before the switch, west probes the remote member through the tunnel (its own connection carries west's
  SPIFFE ID, which east lets a peer assert without a `may_assert` entry): the probe reports it up;
- the switch is in place (no listener restart): every acknowledged record is on one of the two clusters,
  none twice, each producer's records at east are one run, and neither producer sees an error;
- at east, the records arrive under the client's own principal (east's audit names it, forwarded by west);
- a consumer through west's bootstrap reads east's records; the failback to the direct primary is in
  place too, and the producer's records land on the primary again.
"""

import time
from pathlib import Path

from lib.authz import read_audit
from lib.clients import unique
from lib.edge import Edge, VirtualCluster
from lib.ports import free_port
from lib.wait import wait_for
from tests.test_encryption import create_topic, end_offset
from tests.test_failover import ContinuousProducer, JavaContinuousProducer, values
from tests.test_mesh import EAST, EAST_ID, ORDERS, WEST, WEST_ID, consume, sites

GROUP = "orders-dr"
THROUGH_EAST = {"peer": "edge-east", "virtual_cluster": "orders-standby"}


def east_edge(logs: Path, tmp: Path, standby, east, west, mesh_port: int) -> Edge:
    """East's edge in front of the standby, exporting it to west; it authorizes and audits what west
    forwards: the shop's principals, and west's own (its probes), which no `may_assert` lists."""
    shop = f"spiffe://{WEST}/ns/shop/sa/*"
    vc = VirtualCluster(name="orders-standby", upstream=standby.bootstrap_servers, extra={
        "authorization": {"rules": [
            {"principal": shop, "allow": ["All"], "topic": "*"},
            {"principal": shop, "allow": ["All"], "group": "*"},
            {"principal": shop, "allow": ["IdempotentWrite"], "cluster": True}]},
        "audit": {"path": str(tmp / "east-audit.jsonl"), "sample_allows": 1.0},
    })
    return Edge(logs, [vc], extra={"mesh": {
        "listen": f"127.0.0.1:{mesh_port}",
        "identity": {"cert": str(east.pem("edge")), "key": str(east.key("edge"))},
        "trust_bundles": [{"trust_domain": WEST, "pem": str(west.pem("ca"))}],
        "peers": [{"name": "edge-west", "spiffe_id": WEST_ID, "may_assert": [shop],
                   "exports": ["orders-standby"]}],
    }})


def west_edge(logs: Path, primary, east, west, mesh_port: int) -> tuple[Edge, VirtualCluster]:
    """West's edge: `orders` on the primary at generation 0, probing both members (the standby through
    the tunnel), as a control-plane-configured edge with `remote_members` is given them."""
    vc = VirtualCluster(name="orders", upstream=primary.bootstrap_servers, extra={
        "upstream": {"bootstrap_servers": list(primary.bootstrap_servers),
                     "failover": {"group": GROUP, "cluster": "west", "generation": 0}},
        "tls": {"cert": str(west.pem("edge")), "key": str(west.key("edge")),
                "client_trust_bundles": [{"trust_domain": WEST, "pem_file": str(west.pem("ca"))}]},
    })
    e = Edge(logs, [vc], extra={
        "mesh": {
            "identity": {"cert": str(west.pem("edge")), "key": str(west.key("edge"))},
            "trust_bundles": [{"trust_domain": EAST, "pem": str(east.pem("ca"))}],
            "peers": [{"name": "edge-east", "address": f"127.0.0.1:{mesh_port}", "spiffe_id": EAST_ID}],
        },
        "health_probes": [
            {"group": GROUP, "cluster": "west", "interval": "200ms",
             "upstream": {"bootstrap_servers": list(primary.bootstrap_servers)}},
            {"group": GROUP, "cluster": "east", "interval": "200ms",
             "upstream": {"remote": THROUGH_EAST, "connect_timeout": "5s"}},
        ],
    })
    return e, vc


def acked_at(producer, cluster, topic: str) -> int:
    """How many of the producer's acknowledged records `cluster` holds."""
    acked = {f"{producer.label}record-{n}" for _, n in list(producer.acked)}
    return len(acked & set(values(cluster.bootstrap_servers[0], topic)))


def switch(e: Edge, vc: VirtualCluster, upstream: dict, cluster: str, generation: int) -> None:
    """What the control plane's decision does to west's configuration; returns once the edge swapped."""
    vc.extra["upstream"] = {**upstream, "failover": {"group": GROUP, "cluster": cluster, "generation": generation}}
    e.write_config()
    wait_for(lambda: e.metric("strait_upstream_swaps", virtual_cluster=vc.name) == generation, 30,
             what=f"west swapping {vc.name}'s upstream to {cluster}")


def test_a_standby_behind_a_peer_edge_is_switched_to_in_place_and_back(broker, logs, tmp_path):
    primary = broker(dedicated=True, name="kafka-west")
    standby = broker(dedicated=True, name="kafka-east")
    east_pki, west_pki = sites(tmp_path)
    mesh_port = free_port()
    east = east_edge(logs, tmp_path, standby, east_pki, west_pki, mesh_port).start()
    west, vc = west_edge(logs, primary, east_pki, west_pki, mesh_port)
    p = jp = None
    try:
        west.start()
        wait_for(lambda: west.metric("strait_mesh_peer_connected", peer="edge-east") == 1, 30,
                 what="west's tunnel to east")
        # Both members answer west's probes; the remote one's through the tunnel, as west itself.
        for member in ("west", "east"):
            wait_for(lambda m=member: west.metric("strait_failover_probe_state", group=GROUP, cluster=m) == 1,
                     30, what=f"west's probe of {member} reporting it up")
        assert east.metric("strait_mesh_stream_refusals", peer="edge-west") == 0

        topic = unique("dr-remote")
        create_topic(primary.bootstrap_servers[0], topic)
        create_topic(standby.bootstrap_servers[0], topic)  # the standby holds the mirrored topic
        client = {"bootstrap.servers": vc.bootstrap, **west_pki.confluent_ssl("orders")}
        p = ContinuousProducer(vc.bootstrap, topic, **west_pki.confluent_ssl("orders")).start()
        jp = JavaContinuousProducer(vc.bootstrap, topic, **west_pki.confluent_ssl("orders")).start()
        wait_for(lambda: len(p.acked) >= 50 and len(jp.acked) >= 20, 60,
                 what="records of both producers acknowledged by the primary")

        streams = west.metric("strait_mesh_streams", peer="edge-east", direction="outbound")
        switched_at = time.monotonic()
        switch(west, vc, {"remote": THROUGH_EAST, "connect_timeout": "5s"}, "east", 1)
        # (acknowledgements after `switched_at` may still come from the primary, before the swap: count
        # each producer's acknowledged records that east's cluster holds)
        wait_for(lambda: end_offset(standby.bootstrap_servers[0], topic) >= 70
                 and acked_at(p, standby, topic) >= 50 and acked_at(jp, standby, topic) >= 20, 90,
                 what="both producers' records acknowledged after the switch, on east's cluster")
        # In place: the listeners stayed (the cluster was not replaced) and the tunnel carries it.
        assert "upstream replaced in place" in west.log_text()
        # (the client's bootstrap and broker connections: two streams at least, besides the probe's)
        assert west.metric("strait_mesh_streams", peer="edge-east", direction="outbound") >= streams + 2
        at_east = end_offset(standby.bootstrap_servers[0], topic)
        for producer in (p, jp):
            first_at_east = producer.first_ack_of(values(standby.bootstrap_servers[0], topic))
            print(f"{type(producer).__name__}: switch to first acknowledgement through the tunnel: "
                  f"{first_at_east - switched_at:.2f} s")

        # A consumer through west's bootstrap reads what east's cluster holds.
        got = consume(client, topic, at_east, timeout=60)
        assert [g.decode() for g in got[:at_east]] == values(standby.bootstrap_servers[0], topic)[:at_east]

        # East saw the client's principal, forwarded by west, and west's probes as west itself.
        audit = tmp_path / "east-audit.jsonl"
        wait_for(lambda: [l for l in read_audit(audit) if l["principal"] == ORDERS], 10,
                 what="east's audit lines for the forwarded client")
        lines = read_audit(audit)
        assert all(l["via_peer"] == "edge-west" for l in lines if l["principal"] == ORDERS)
        assert {l["principal"] for l in lines} <= {ORDERS, WEST_ID}, {l["principal"] for l in lines}

        failback_at = time.monotonic()
        switch(west, vc, {"bootstrap_servers": list(primary.bootstrap_servers)}, "west", 2)
        wait_for(lambda: len(p.acked_after(failback_at)) >= 50 and len(jp.acked_after(failback_at)) >= 20, 90,
                 what="both producers' records acknowledged after the failback")
    finally:
        for producer in (p, jp):
            if producer is not None:
                producer.stop()
        west.terminate()
        east.terminate()
    at_west, at_east = values(primary.bootstrap_servers[0], topic), values(standby.bootstrap_servers[0], topic)
    # Nothing is on both clusters.
    assert not set(at_west) & set(at_east)
    for producer in (p, jp):
        assert producer.fatal == [], producer.fatal
        assert producer.failed == [], producer.failed[:5]
        mine = producer.label + "record-"
        acked = {f"{mine}{n}" for _, n in producer.acked}
        # Nothing acknowledged is lost.
        assert acked <= set(at_west) | set(at_east), sorted(acked - set(at_west) - set(at_east))[:5]
        # Its records at east form one run between those on the primary before the switch and after
        # the failback.
        numbers = sorted(int(v.rsplit("-", 1)[1]) for v in at_east if v.startswith(mine))
        assert len(numbers) >= 20, numbers
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), (producer.label, numbers)
    assert west.unexpected_errors() == [] and east.unexpected_errors() == []
