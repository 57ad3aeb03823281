"""Live reconfiguration: editing the edge's config file adds and removes virtual clusters without a
restart; open connections of unchanged clusters keep working; an invalid edit changes nothing."""

import socket

from lib.clients import unique
from lib.edge import VirtualCluster
from lib.wait import wait_for


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_config_file_edits_apply_live(broker, edge):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    a, b = broker(dedicated=True, name="broker-a"), broker(dedicated=True, name="broker-b")
    vc_a = VirtualCluster(name="a", upstream=a.bootstrap_servers)
    e = edge([vc_a])
    topic = unique("live")
    admin = AdminClient({"bootstrap.servers": vc_a.bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": vc_a.bootstrap})
    producer.produce(topic, value=b"before")
    assert producer.flush(30) == 0
    # Connections ever accepted on cluster a: unchanged at the end proves none was closed and reopened.
    opened = e.metric("strait_connections", virtual_cluster="a")
    assert opened >= 1

    # Add a cluster for broker b by editing the file.
    vc_b = VirtualCluster(name="b", upstream=b.bootstrap_servers)
    e.clusters.append(vc_b)
    e.write_config()
    wait_for(lambda: accepts(vc_b.bootstrap_port), 15, what="new virtual cluster listening")
    md = AdminClient({"bootstrap.servers": vc_b.bootstrap}).list_topics(timeout=10)
    assert topic not in md.topics, "cluster b is the other broker"

    # The producer's open connections to cluster a were not disturbed.
    producer.produce(topic, value=b"after")
    assert producer.flush(30) == 0
    assert e.metric("strait_connections", virtual_cluster="a") == opened

    # An invalid edit is refused and the running configuration stays.
    good = e.config_path.read_text()
    e.config_path.write_text(good + "\nnot_a_key: 1\n")
    wait_for(lambda: "keeping the running configuration" in e.log_text(), 15, what="invalid edit reported")
    assert accepts(vc_b.bootstrap_port)

    # Removing cluster b closes its port.
    e.clusters.remove(vc_b)
    e.write_config()
    wait_for(lambda: not accepts(vc_b.bootstrap_port), 15, what="removed cluster's port closed")
    producer.produce(topic, value=b"still")
    assert producer.flush(30) == 0
    assert e.metric("strait_connections", virtual_cluster="a") == opened
