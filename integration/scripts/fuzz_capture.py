"""Records real client traffic against real Apache Kafka for the fuzz seeds (`make fuzz-corpus`).

Starts a single-node KRaft broker that advertises a recording relay (integration/lib/capture.py), then
drives confluent-kafka (librdkafka) and kafka-python through it: topic admin, produce with every codec,
keys, headers and tombstones, idempotent and transactional produce, fetch, consumer groups (classic and
KIP-848), offsets, configs. Every frame lands in OUT_DIR/conn-*/; edge/fuzz/examples/seeds.rs turns
them into the corpora. Topic and group names match the rules the fuzz targets are built with
(`orders-*`, `secret-*`, `shop-*`, `orders-tx-*`), so seeds reach both allowed and encrypted paths.

    python integration/scripts/fuzz_capture.py OUT_DIR
"""

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration"))

from lib.capture import CaptureRelay  # noqa: E402
from lib.clients import Confluent, KafkaPython, Rec  # noqa: E402
from lib.kafka import KafkaCluster  # noqa: E402
from lib.ports import free_port  # noqa: E402

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def records(tag: str, n: int = 6) -> list[Rec]:
    out = []
    for i in range(n):
        value = None if i == n - 1 else f"{tag}-value-{i}".encode() * (1 + i)
        # A tombstone needs a key (kafka-python refuses a record with neither).
        key = f"k{i}".encode() if i % 2 == 0 or value is None else None
        out.append(Rec(key=key, value=value,
                       headers=[("trace", f"t{i}".encode())] if i % 3 == 0 else []))
    return out


def confluent_traffic(bootstrap: str) -> None:
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import ConfigResource, NewPartitions, OffsetSpec

    c = Confluent(bootstrap)
    for topic, partitions in [("orders-a", 2), ("secret-orders", 1), ("payments", 1)]:
        c.create_topic(topic, partitions)
    for codec in CODECS:
        c.produce("orders-a", records(f"cf-{codec}"), **{"compression.type": codec})
        c.produce("secret-orders", records(f"sec-{codec}"), **{"compression.type": codec})
    c.produce("payments", records("idem"), **{"enable.idempotence": True, "acks": "all"})
    c.produce("orders-a", records("acks0", 2), **{"acks": 0})

    consumer = c.consumer("orders-a", group="shop-classic")
    consumer.take(10, timeout=30)
    consumer.commit()
    consumer.close()
    consumer = c.consumer("secret-orders", group="shop-848", **{"group.protocol": "consumer"})
    consumer.take(5, timeout=30)
    consumer.commit()
    consumer.close()

    # A transaction that commits with consumer offsets, and one that aborts.
    p = c.producer(**{"transactional.id": "orders-tx-1"})
    p.init_transactions()
    p.begin_transaction()
    p.send_all("orders-a", records("txn", 3))
    cons = c.consumer("orders-a", group="shop-txn")
    cons.take(1, timeout=30)
    p.p.send_offsets_to_transaction([TopicPartition("orders-a", 0, 1)], cons.c.consumer_group_metadata(), 30)
    p.commit_transaction()
    p.begin_transaction()
    p.send_all("orders-a", records("aborted", 2))
    p.abort_transaction()
    p.close()
    cons.close()

    admin = c._admin()
    for future in admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, "orders-a"),
                                          ConfigResource(ConfigResource.Type.BROKER, "1")]).values():
        future.result(30)
    admin.create_partitions([NewPartitions("orders-a", 3)])["orders-a"].result(30)
    admin.list_consumer_groups().result(30)
    admin.describe_consumer_groups(["shop-classic", "shop-848"])["shop-classic"].result(30)
    admin.describe_cluster().result(30)
    for future in admin.list_offsets({TopicPartition("orders-a", 0): OffsetSpec.latest()}).values():
        future.result(30)
    admin.delete_consumer_groups(["shop-txn"])["shop-txn"].result(30)
    c.coordinator("shop-classic")


def kafka_python_traffic(bootstrap: str) -> None:
    k = KafkaPython(bootstrap)
    k.create_topic("orders-b", 1)
    for codec in ["none", "gzip", "lz4", "zstd"]:
        k.produce("orders-b", records(f"kp-{codec}"), compression_type=codec)
    k.produce("secret-orders", records("kp-secret"))
    consumer = k.consumer("orders-b", group="shop-kp")
    consumer.take(10, timeout=30)
    consumer.commit()
    consumer.close()
    admin = k._admin()
    # kafka-python 3: a wide set of admin APIs (DescribeCluster, quorum, transactions, log dirs, ...).
    admin.list_groups()
    admin.describe_groups(["shop-kp"])
    admin.list_group_offsets("shop-kp")
    admin.describe_cluster()
    admin.describe_topics(["orders-a"])
    admin.describe_log_dirs()
    admin.describe_metadata_quorum()
    admin.list_transactions()
    admin.describe_transactions(["orders-tx-1"])
    admin.delete_records({__import__("kafka").TopicPartition("orders-b", 0): 1})
    admin.delete_topics(["orders-b"])
    k.coordinator("shop-kp")


def main() -> None:
    out = Path(sys.argv[1])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logs = Path(tempfile.mkdtemp(prefix="strait-fuzz-capture-logs-"))
    relay_port = free_port()
    cluster = KafkaCluster(logs, config={"advertised.listeners": f"PLAINTEXT://127.0.0.1:{relay_port}"})
    relay = CaptureRelay(relay_port, ("127.0.0.1", cluster.port), out).start()
    try:
        cluster.start()
        bootstrap = f"127.0.0.1:{relay_port}"
        confluent_traffic(bootstrap)
        kafka_python_traffic(bootstrap)
    finally:
        cluster.stop()
        relay.stop()
        shutil.rmtree(logs, ignore_errors=True)
    frames = sum(1 for _ in out.glob("conn-*/*.bin"))
    print(f"[fuzz-capture] {frames} frames on {sum(1 for _ in out.glob('conn-*'))} connections in {out}")


if __name__ == "__main__":
    main()
