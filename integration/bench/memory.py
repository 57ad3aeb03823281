#!/usr/bin/env python3
"""Edge memory under the attacks `limits:` bounds (issue 15, item 2).

One single-node Apache Kafka and one strait-edge whose listener authorizes (plain TCP, every principal
allowed: the filter is installed, so every request but ApiVersions is decoded), default limits. The edge's
resident set (VmRSS) and its peak (VmHWM) are read from /proc:

1. after start;
2. with 1,000 idle connections (each answered one ApiVersions, so each has its broker connection too);
3. while 100 more connections each announce a 100 MiB Produce and then try to send its body: the edge
   must close each from its 12-byte prefix, so the peak stays flat;
4. under load: a librdkafka producer sends 1 KiB records and 1 MiB records through the edge (decoded by
   the filter) while the 1,000 idle connections stay open, then a consumer reads them back.

Run with `make bench-memory`; writes integration/bench/memory.json and memory.md and the memory block of
docs/benchmarks.md. `--profile debug` measures the debug binary (`make build`) instead of the release one.
"""

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from lib.clients import Rec, client  # noqa: E402
from lib.edge import Edge, VirtualCluster, edge_bin  # noqa: E402
from lib.kafka import KafkaCluster  # noqa: E402
from lib.kafka_wire import API_VERSIONS, closed_by_peer, frame, recv_frame, request_v0_header  # noqa: E402
from lib.wait import wait_for  # noqa: E402

MiB = 1024 * 1024
RULES = [
    {"principal": "*", "allow": ["All"], "topic": "*"},
    {"principal": "*", "allow": ["All"], "group": "*"},
    {"principal": "*", "allow": ["All"], "cluster": True},
]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def hwm_mib(pid: int) -> float:
    return status_kib(pid, "VmHWM") / 1024


def reset_hwm(pid: int) -> None:
    # Writing 5 to clear_refs resets the peak RSS (Linux >= 4.0).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def idle_connections(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = connect(host, port)
        s.sendall(frame(request_v0_header(API_VERSIONS, 0, i)))
        socks.append(s)
    for i, s in enumerate(socks):
        body = recv_frame(s)
        assert struct.unpack(">i", body[:4])[0] == i
    return socks


def oversized_attack(host: str, port: int, n: int, announced: int) -> dict:
    """`n` connections announce `announced` bytes of Produce and push body bytes until refused."""
    socks = [connect(host, port) for _ in range(n)]
    pushed = [0] * n
    chunk = b"\x00" * (256 * 1024)

    def push(i: int, s: socket.socket) -> None:
        try:
            s.sendall(struct.pack(">ihhi", announced - 4, 0, 9, i))
            while pushed[i] < announced:
                s.sendall(chunk)
                pushed[i] += len(chunk)
        except OSError:
            pass

    threads = [threading.Thread(target=push, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    closed = sum(closed_by_peer(s, timeout=60) for s in socks)
    for t in threads:
        t.join(60)
    for s in socks:
        s.close()
    return {"connections": n, "closed": closed, "max_body_bytes_pushed": max(pushed)}


def load(bootstrap: str, small: int, big: int) -> dict:
    c = client("confluent", bootstrap)
    topic = f"memory-load-{os.getpid()}"
    c.create_topic(topic, partitions=4)
    p = c.producer(**{"message.max.bytes": 4 * MiB, "linger.ms": 20, "batch.size": 1 * MiB})
    start = time.monotonic()
    value = os.urandom(1024)
    p.send_all(topic, [Rec(None, value) for _ in range(small)], 300)
    p.send_all(topic, [Rec(None, os.urandom(MiB)) for _ in range(big)], 300)
    produced = time.monotonic() - start
    got = c.consumer(topic, **{"fetch.max.bytes": 16 * MiB, "max.partition.fetch.bytes": 4 * MiB}).take(
        small + big, timeout=300)
    assert len(got) == small + big, f"read back {len(got)} of {small + big}"
    return {"records_1kib": small, "records_1mib": big, "produce_seconds": round(produced, 1)}


def sample_peak(pid: int, stop: threading.Event, out: dict) -> None:
    while not stop.wait(0.1):
        out["max_rss"] = max(out.get("max_rss", 0.0), rss_mib(pid))


def baseline_attack(logs: Path, kafka_factory, binary: str, attackers: int) -> dict:
    """The same attack, with fewer connections, against another edge binary: its peak RSS."""
    kafka = kafka_factory().start()
    vc = VirtualCluster(name="authz", upstream=kafka.bootstrap_servers, extra={"authorization": {"rules": RULES}})
    edge = Edge(logs, [vc], binary=binary).start()
    try:
        host, port = edge.bootstrap.rsplit(":", 1)
        pid = edge.proc.popen.pid
        start = rss_mib(pid)
        reset_hwm(pid)
        attack = oversized_attack(host, int(port), attackers, 100 * MiB)
        return {"binary": binary, "connections": attackers, "rss_before_mib": start, "peak_mib": hwm_mib(pid),
                "closed": attack["closed"], "max_body_bytes_pushed": attack["max_body_bytes_pushed"]}
    finally:
        edge.terminate(timeout=15)
        kafka.stop()


def markdown(r: dict) -> str:
    l = r["limits"]
    lines = [
        "# Edge memory under attack (issue 15)",
        "",
        f"{r['date']}, commit {r['commit']}, {r['machine']}, {r['profile']} strait-edge, one Apache Kafka "
        "broker, an authorizing listener (plain TCP, every request but ApiVersions decoded), default limits "
        f"(per connection {l['max_buffered_bytes_per_connection'] // MiB} MiB, edge-wide "
        f"{l['max_buffered_bytes'] // MiB} MiB). RSS from /proc (VmRSS; peak = VmHWM reset before the phase).",
        "",
        "| phase | RSS MiB | peak MiB |",
        "|---|---|---|",
    ]
    for row in r["phases"]:
        lines.append(f"| {row['phase']} | {row['rss_mib']:.1f} | {row['peak_mib']:.1f} |")
    a = r["attack"]
    lines += [
        "",
        f"Attack: {a['closed']} of {a['connections']} connections announcing a 100 MiB Produce were closed; "
        f"the most body bytes any of them got into its socket before the close was "
        f"{a['max_body_bytes_pushed'] / MiB:.1f} MiB (kernel socket buffers, never the edge's heap); "
        f"`frames_rejected_total{{reason=\"buffer_budget\"}}` = {a['rejected']:.0f}.",
        f"Load: {r['load']['records_1kib']} records of 1 KiB and {r['load']['records_1mib']} of 1 MiB produced "
        f"through the edge in {r['load']['produce_seconds']} s and read back, with the 1,000 idle "
        "connections open.",
        "",
    ]
    b = r.get("baseline")
    if b:
        lines[-1:-1] = [
            "",
            f"For comparison, {b['binary_label']}: {b['connections']} connections "
            f"announcing 100 MiB and sending it took its RSS from {b['rss_before_mib']:.1f} to a peak of "
            f"{b['peak_mib']:.1f} MiB (each frame is held whole for the filter before it is refused as undecodable).",
        ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="release", choices=["release", "debug"])
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--attackers", type=int, default=100)
    ap.add_argument("--small", type=int, default=200_000)
    ap.add_argument("--big", type=int, default=50)
    ap.add_argument("--baseline-binary", help="also run the attack against this strait-edge (e.g. one built "
                    "before `limits:` existed) and record its peak")
    ap.add_argument("--baseline-attackers", type=int, default=10)
    ap.add_argument("--baseline-label", default="an edge built before limits:")
    ap.add_argument("--smoke", action="store_true", help="tiny counts, nothing written")
    args = ap.parse_args()
    if args.smoke:
        args.idle, args.attackers, args.small, args.big = 50, 10, 2000, 2
    os.environ.setdefault("STRAIT_EDGE_RUST_LOG", "warn")
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"strait-memory-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    kafka = KafkaCluster(logs, brokers=1, name="kafka-memory").start()
    vc = VirtualCluster(name="authz", upstream=kafka.bootstrap_servers,
                        extra={"authorization": {"rules": RULES}})
    edge = Edge(logs, [vc], binary=edge_bin(args.profile)).start()
    host, port = edge.bootstrap.rsplit(":", 1)
    port = int(port)
    pid = edge.proc.popen.pid
    phases = []

    def phase(name: str, peak: float | None = None) -> None:
        phases.append({"phase": name, "rss_mib": rss_mib(pid), "peak_mib": peak or hwm_mib(pid)})
        print(phases[-1], flush=True)

    socks = []
    try:
        phase("started")
        reset_hwm(pid)
        socks = idle_connections(host, port, args.idle)
        wait_for(lambda: edge.metric("strait_connections_open") >= args.idle, 30, what="idle connections open")
        phase(f"{args.idle} idle connections")
        reset_hwm(pid)
        before = edge.metric("strait_frames_rejected", reason="buffer_budget")
        attack = oversized_attack(host, port, args.attackers, 100 * MiB)
        attack["rejected"] = edge.metric("strait_frames_rejected", reason="buffer_budget") - before
        assert attack["closed"] == args.attackers, attack
        phase(f"+ {args.attackers} connections announcing 100 MiB")
        reset_hwm(pid)
        stop, peak = threading.Event(), {}
        sampler = threading.Thread(target=sample_peak, args=(pid, stop, peak))
        sampler.start()
        loaded = load(edge.bootstrap, args.small, args.big)
        stop.set()
        sampler.join()
        phase("under load (1 KiB and 1 MiB records, idle connections open)", max(peak["max_rss"], hwm_mib(pid)))
        assert edge.alive()
    finally:
        for s in socks:
            s.close()
        edge.terminate(timeout=15)
        kafka.stop()
    baseline = None
    if args.baseline_binary:
        baseline = baseline_attack(logs, kafka_factory=lambda: KafkaCluster(logs, brokers=1, name="kafka-memory-b"),
                                   binary=args.baseline_binary, attackers=args.baseline_attackers)
        baseline["binary_label"] = args.baseline_label
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    machine = f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB"
    result = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine, "profile": args.profile,
        "limits": {"max_buffered_bytes_per_connection": 16 * MiB, "max_buffered_bytes": 256 * MiB},
        "phases": phases, "attack": attack, "load": loaded, "baseline": baseline,
    }
    text = markdown(result)
    print(text)
    if args.smoke:
        return 0
    (HERE / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (HERE / "memory.md").write_text(text)
    bench_doc = ROOT / "docs" / "benchmarks.md"
    doc = bench_doc.read_text()
    block = f"<!-- memory:begin -->\n{text}<!-- memory:end -->"
    if "<!-- memory:begin -->" in doc:
        doc = re.sub(r"<!-- memory:begin -->.*<!-- memory:end -->", lambda _m: block, doc, flags=re.S)
    else:
        doc += "\n## Memory under attack (issue 15)\n\n`make bench-memory` (integration/bench/memory.py).\n\n" \
               + block + "\n"
    bench_doc.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
