"""Start Tansu where the quick-start config's upstream points, start strait-edge with that config,
produce and consume a few records through the edge with confluent-kafka, print them, stop everything."""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integration"))

import yaml  # noqa: E402
from confluent_kafka import Consumer, Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from lib.edge import edge_bin  # noqa: E402
from lib.kafka_wire import answers_api_versions  # noqa: E402
from lib.procs import Proc  # noqa: E402
from lib.tansu import Tansu  # noqa: E402
from lib.wait import wait_for  # noqa: E402


def main(config_path: str) -> int:
    cfg = yaml.safe_load(Path(config_path).read_text())
    vc = cfg["virtual_clusters"][0]
    upstream = vc["upstream"]["bootstrap_servers"][0]
    up_port = int(upstream.rsplit(":", 1)[1])
    bootstrap = vc["bootstrap"]
    admin = cfg["admin"]["listen"]
    logs = Path(tempfile.mkdtemp(prefix="strait-demo-"))
    print(f"[demo] logs in {logs}")
    tansu = Tansu(logs, port=up_port)
    edge = Proc("strait-edge", [edge_bin(), "--config", config_path], logs)
    try:
        print(f"[demo] starting tansu on {tansu.bootstrap}")
        tansu.start()
        print(f"[demo] starting strait-edge: bootstrap {bootstrap}, admin http://{admin}")
        edge.start()
        host, port = bootstrap.rsplit(":", 1)

        def edge_ready():
            if not edge.alive():
                raise SystemExit(f"strait-edge exited:\n{edge.tail()}")
            return answers_api_versions(host, int(port))
        wait_for(edge_ready, 30, what="strait-edge")
        admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive its futures
        admin.create_topics([NewTopic("demo", num_partitions=1, replication_factor=1)])["demo"].result(30)
        p = Producer({"bootstrap.servers": bootstrap})
        for i in range(5):
            p.produce("demo", key=f"key-{i}".encode(), value=f"hello strait #{i}".encode())
        assert p.flush(30) == 0
        print("[demo] produced 5 records through the edge")
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo", "auto.offset.reset": "earliest"})
        c.subscribe(["demo"])
        got = []

        def poll():
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append(m)
                print(f"[demo] consumed partition={m.partition()} offset={m.offset()} "
                      f"key={m.key().decode()} value={m.value().decode()}")
            return len(got) >= 5
        wait_for(poll, 60, interval=0, what="5 records")
        c.close()
        print("[demo] OK")
        return 0
    finally:
        edge.stop()
        tansu.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
