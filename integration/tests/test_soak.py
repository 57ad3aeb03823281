"""Soak: mixed load through an mTLS, authorizing, encrypting edge while everything around it is disturbed.

The processes are those of the rotation scenario (tests/test_rotation.py): a 3-node strait-control on
mTLS (the CA of rotation.example, 1-minute certificates renewed at half-life for the control nodes, the
edge and the kms-broker), a strait-kms-broker (development keyring) the edge wraps DEKs through, an
edge configured by the control plane, and one Apache Kafka broker with persistent storage. An
idempotent acks=all producer and a group consumer, both on workload certificates, run for
STRAIT_SOAK_SECONDS (60 s in CI; `make soak` runs 1800). Every cycle (5 minutes, or the whole run
when it is shorter) disturbs, in turn:

- the KMS: the kms-broker is frozen (SIGSTOP) for a few seconds, then thawed;
- the control plane: its Raft leader is killed (SIGKILL) and restarted 10 s later;
- the broker: Kafka is stopped and started again on the same storage;
- the KMS again.

Asserted at the end: every acknowledged record reads back through the edge (zero lost); every record
Kafka stores is ciphertext (zero plaintext); the edge logged no ERROR line; its RSS and open file
descriptors after the warm-up stay within a bound (flat, not growing with time). With
STRAIT_SOAK_REPORT set, the figures go to that JSON file (`make soak` writes
integration/bench/soak.json and renders soak.md from it).
"""

import json
import os
import platform
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lib.clients import unique
from lib.control import ControlPlane
from lib.procs import Proc
from lib.wait import wait_for
from tests.test_control_plane import accepts
from tests.test_encryption import parse_cipher
from tests.test_failover_automatic import leader_index
from tests.test_identity import kafka_config
from tests.test_rotation import CLIENT_ID, DOMAIN, ONE_MINUTE, create_topics, mesh_processes

WARM_UP = 0.2  # of the run: caches, connections and the first certificate renewals settle first
# Flat: after the warm-up, RSS may move within this much of its first sample, and a few descriptors
# may come and go with reconnects; a leak grows without bound and crosses both.
RSS_SLACK_MIB = 48
FD_SLACK = 64


def proc_sample(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of `pid`."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def read_all(config: dict, topic: str, count: int, timeout: float = 120) -> list[bytes]:
    """At least the first `count` records of partition 0 by offset (no group); raises if they do not
    all arrive within `timeout`."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({**config, "group.id": unique("soak-read"), "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count:
            assert time.monotonic() < deadline, f"read {len(out)} of {count} records of {topic} in {timeout}s"
            out.extend(m.value() for m in c.consume(500, 0.5) if m.error() is None)
    finally:
        c.close()
    return out


class Disturbances:
    """The cycle of disturbances, each at its fraction of the cycle, and what happened when."""

    def __init__(self, duration: float, kms: Proc, control: ControlPlane, kafka):
        self.cycle = min(300.0, duration)
        self.kms, self.control, self.kafka = kms, control, kafka
        self.started = time.monotonic()
        self.events: list[tuple[float, str]] = []
        self.done: set[tuple[int, int]] = set()
        self.killed: Proc | None = None
        self.killed_at = 0.0
        self.blip = min(5.0, self.cycle / 12)

    def log(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.started, 1), what))

    def tick(self) -> None:
        """Runs whatever is due; each step is short, so the load loop keeps going between them."""
        now = time.monotonic() - self.started
        n, at = divmod(now, self.cycle)
        steps = [(0.15, self.freeze_kms), (0.15 + self.blip / self.cycle, self.thaw_kms),
                 (0.35, self.kill_leader), (0.6, self.restart_broker),
                 (0.8, self.freeze_kms), (0.8 + self.blip / self.cycle, self.thaw_kms)]
        for i, (fraction, step) in enumerate(steps):
            if at >= fraction * self.cycle and (int(n), i) not in self.done:
                self.done.add((int(n), i))
                step()
        if self.killed and time.monotonic() - self.killed_at >= 10:
            self.killed.start()
            self.log(f"control {self.killed.name} restarted")
            self.killed = None

    def freeze_kms(self) -> None:
        self.kms.signal(signal.SIGSTOP)
        self.log("kms-broker frozen")

    def thaw_kms(self) -> None:
        self.kms.signal(signal.SIGCONT)
        self.log("kms-broker thawed")

    def kill_leader(self) -> None:
        if self.killed:
            return
        node = self.control.procs[leader_index(self.control)]
        node.popen.kill()
        node.popen.wait(10)
        self.killed, self.killed_at = node, time.monotonic()
        self.log(f"control leader {node.name} killed")

    def restart_broker(self) -> None:
        self.log("kafka restarting")
        self.kafka.restart()
        self.log("kafka restarted")

    def finish(self) -> None:
        self.thaw_kms()
        if self.killed:
            self.killed.start()
            self.log(f"control {self.killed.name} restarted")
            self.killed = None


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=Path(__file__).parent)
    return r.stdout.strip() or "unknown"


SOAK_SECONDS = float(os.environ.get("STRAIT_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SOAK_SECONDS + 600)
def test_soak_mixed_load_while_certificates_kms_control_and_broker_are_disturbed(broker, logs, tmp_path):
    from confluent_kafka import Consumer, Producer
    duration = SOAK_SECONDS
    commit = git_commit()  # what was built and started, not what HEAD is when the run ends
    kafka = broker(persistent=True)
    topic = unique("rotation-a")  # encrypted with kek-a, authorized for the workload (see mesh())
    create_topics(kafka.bootstrap, topic)
    control = ControlPlane(tmp_path / "control", logs, trust_domain=DOMAIN, nodes=3, extra_args=ONE_MINUTE).start()
    client = control.cert_issue(CLIENT_ID, tmp_path / "orders", ttl="1h")  # the longest a workload gets; the run is shorter
    edge, kms, port, kms_port = mesh_processes(control, kafka, tmp_path, logs)
    kms.start()
    edge.start()
    disturb = Disturbances(duration, kms, control, kafka)
    try:
        wait_for(lambda: accepts(kms_port), 60, what="kms-broker serving after joining")
        wait_for(lambda: accepts(port), 60, what="edge serving its configuration from the control plane")
        config = kafka_config(port, client)
        producer = Producer({**config, "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                             "message.timeout.ms": 300000})
        consumer = Consumer({**config, "group.id": unique("soak"), "auto.offset.reset": "earliest"})
        consumer.subscribe([topic])
        acked: set[bytes] = set()
        failed: list = []
        sent = consumed = 0
        samples: list[tuple[float, float, int]] = []

        def delivered(err, msg):
            if err is None:
                acked.add(msg.value())
            else:
                failed.append(err)
        disturb.started = time.monotonic()  # the cycle counts from the start of the load
        end = disturb.started + duration
        next_sample = 0.0
        while time.monotonic() < end:
            for _ in range(50):
                producer.produce(topic, value=b"soak-%08d" % sent, on_delivery=delivered)
                sent += 1
            producer.poll(0)
            for m in consumer.consume(200, 0.1):
                consumed += m.error() is None
            if time.monotonic() >= next_sample:
                samples.append((round(time.monotonic() - disturb.started, 1), *proc_sample(edge.pid)))
                next_sample = time.monotonic() + 5
            disturb.tick()
        disturb.finish()
        assert producer.flush(300) == 0, "records still queued after the run"
        consumer.close()

        # Zero acknowledged records lost: every one reads back through the edge (decrypted).
        back = read_all(config, topic, len(acked))
        lost = acked - set(back)
        # Zero plaintext stored: every record in Kafka is a cipher record.
        stored = read_all({"bootstrap.servers": kafka.bootstrap}, topic, len(back))
        plaintext = sum(1 for v in stored if v.startswith(b"soak-"))
        assert all(parse_cipher(v)["kms"] == "mesh" for v in stored[:: max(1, len(stored) // 200)])
        warm = [s for s in samples if s[0] >= WARM_UP * duration] or samples
        rss = [s[1] for s in warm]
        fds = [s[2] for s in warm]
        report = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), Linux {platform.release()}",
            "seconds": duration, "sent": sent, "acknowledged": len(acked), "delivery_failures": len(failed),
            "consumed_by_group": consumed, "lost": len(lost), "stored": len(stored), "plaintext_stored": plaintext,
            "edge_rss_mib": {"first": rss[0], "min": min(rss), "max": max(rss), "last": rss[-1]},
            "edge_fds": {"first": fds[0], "min": min(fds), "max": max(fds), "last": fds[-1]},
            "edge_error_lines": len(edge.error_lines()), "events": disturb.events, "samples": samples,
        }
        if os.environ.get("STRAIT_SOAK_REPORT"):
            Path(os.environ["STRAIT_SOAK_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
        summary = {k: v for k, v in report.items() if k != "samples"}
        assert not lost, f"{len(lost)} acknowledged records lost, e.g. {sorted(lost)[:3]}; {summary}"
        assert plaintext == 0, summary
        assert failed == [], f"{len(failed)} delivery failures, first {failed[0]}; {summary}"
        assert sum(e[1] == "kafka restarted" for e in disturb.events) >= 1, disturb.events
        assert any("leader" in e[1] for e in disturb.events), disturb.events
        assert max(rss) <= rss[0] + RSS_SLACK_MIB, summary
        assert max(fds) <= fds[0] + FD_SLACK, summary
        assert edge.error_lines() == [], edge.error_lines()[:5]
    finally:
        disturb.finish()
        edge.stop()
        kms.stop()
        control.stop()
