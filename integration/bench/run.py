#!/usr/bin/env python3
"""Benchmark: the same librdkafka load direct to Tansu and through strait-edge, `tansu proxy` and socat.

For every target a fresh Tansu (memory storage) is started so storage growth from earlier runs does not
bias later ones. Addressing (none of the forwarders may leak the broker's own port to clients):
  direct       clients -> Tansu            Tansu advertises its own port
  strait-edge  clients -> edge -> Tansu    the edge rewrites Metadata/FindCoordinator to its own ports
  tansu-proxy  clients -> proxy -> Tansu   `tansu proxy --advertised-listener-url` rewrites Metadata too
  socat        clients -> socat -> Tansu   socat rewrites nothing, so this Tansu ADVERTISES socat's port:
                                            every connection a client opens after bootstrap goes through socat
Workloads per target and record size: throughput produce (many in flight), consume of those records,
and a latency produce (one record in flight, linger 0) whose p50/p99 is the round trip of one request.
CPU seconds of the forwarding process (utime+stime from /proc, socat's forked children included)
are divided by the payload gigabytes it carried (produced + consumed).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lib.edge import Edge, EdgeBinaryMissing, VirtualCluster, default_target_dir, edge_bin  # noqa: E402
from lib.kafka_wire import answers_api_versions  # noqa: E402
from lib.ports import free_port  # noqa: E402
from lib.procs import Proc  # noqa: E402
from lib.tansu import Tansu, tansu_bin  # noqa: E402
from lib.wait import wait_for  # noqa: E402

TARGETS = ["direct", "strait-edge", "tansu-proxy", "socat"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of pid, its reaped children, and its live descendants (socat forks one per connection)."""
    def stat(p):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return None
        # fields[0] is state (field 3); utime=14, stime=15, cutime=16, cstime=17, ppid=4.
        return int(fields[1]), sum(int(fields[i]) for i in (11, 12, 13, 14))
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            s = stat(d.name)
            if s:
                children.setdefault(s[0], []).append(int(d.name))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        s = stat(p)
        if s:
            total += s[1]
        stack.extend(children.get(p, []))
    return total / CLK_TCK


def loadgen_bin() -> str:
    path = os.environ.get("STRAIT_LOADGEN_BIN") or str(default_target_dir() / "release" / "strait-loadgen")
    if not os.access(path, os.X_OK):
        sys.exit(f"strait-loadgen not found at {path}: cargo build --release -p strait-loadgen")
    return path


def run_loadgen(args: list[str], timeout: float) -> dict:
    # No backtrace: the error itself must fit in what is shown of stderr.
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
    r = subprocess.run([loadgen_bin(), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"loadgen {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class Setup:
    """One target: a fresh Tansu and the forwarder in front of it (none for direct)."""

    def __init__(self, name: str, logs: Path):
        self.name, self.logs = name, logs
        self.tansu: Tansu | None = None
        self.forwarder: Proc | None = None
        self.edge: Edge | None = None
        self.bootstrap = ""

    def start(self):
        if self.name == "direct":
            self.tansu = Tansu(self.logs, name="tansu-direct").start()
            self.bootstrap = self.tansu.bootstrap
        elif self.name == "strait-edge":
            self.tansu = Tansu(self.logs, name="tansu-edge").start()
            os.environ.setdefault("STRAIT_EDGE_RUST_LOG", "warn")
            self.edge = Edge(self.logs, [VirtualCluster("bench", [self.tansu.bootstrap])],
                             binary=edge_bin("release")).start()
            self.forwarder = self.edge.proc
            self.bootstrap = self.edge.bootstrap
        elif self.name == "tansu-proxy":
            self.tansu = Tansu(self.logs, name="tansu-tproxy").start()
            port = free_port()
            self.forwarder = Proc("tansu-proxy", [
                tansu_bin(), "proxy",
                "--listener-url", f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
                "--origin-url", f"tcp://{self.tansu.bootstrap}",
            ], self.logs, env={"RUST_LOG": "warn"})
            self.forwarder.start()
            self.bootstrap = f"127.0.0.1:{port}"
        elif self.name == "socat":
            port = free_port()
            self.tansu = Tansu(self.logs, name="tansu-socat", advertised_port=port).start()
            socat = shutil.which("socat") or sys.exit("socat not found: run scripts/setup.sh")
            self.forwarder = Proc("socat", [
                socat, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"TCP:{self.tansu.bootstrap},nodelay",
            ], self.logs)
            self.forwarder.start()
            self.bootstrap = f"127.0.0.1:{port}"
        host, port = self.bootstrap.rsplit(":", 1)
        wait_for(lambda: answers_api_versions(host, int(port)), 30, what=f"{self.name} on {self.bootstrap}")
        return self

    def cpu(self) -> float:
        return proc_cpu_seconds(self.forwarder.pid) if self.forwarder else 0.0

    def stop(self):
        if self.edge:
            self.edge.terminate(timeout=15)
        elif self.forwarder:
            self.forwarder.stop()
        if self.tansu:
            self.tansu.stop()


def measure(s: Setup, size: int, count: int, lat_count: int, rep: int, timeout: float) -> dict:
    topic = f"bench-{size}-r{rep}"
    common = ["--bootstrap", s.bootstrap, "--timeout-secs", str(int(timeout))]
    cpu0 = s.cpu()
    prod = run_loadgen(["produce", *common, "--topic", topic, "--count", str(count), "--size", str(size),
                        "--inflight", "2000", "--create-partitions", "1"], timeout + 30)
    cons = run_loadgen(["consume", *common, "--topic", topic, "--count", str(count)], timeout + 30)
    cpu1 = s.cpu()
    lat = run_loadgen(["produce", *common, "--topic", f"lat-{size}-r{rep}", "--count", str(lat_count),
                       "--size", str(size), "--inflight", "1", "--linger-ms", "0", "--create-partitions", "1"],
                      timeout + 30)
    return {"produce_rps": prod["records_per_s"], "produce_mbps": prod["mb_per_s"],
            "consume_rps": cons["records_per_s"], "consume_mbps": cons["mb_per_s"],
            "p50_us": lat["p50_us"], "p99_us": lat["p99_us"],
            "cpu_s": cpu1 - cpu0, "gb": 2 * count * size / 1e9}


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def aggregate(name: str, size: int, count: int, samples: list[dict], has_forwarder: bool) -> dict:
    row = {"target": name, "size": size, "count": count, "repeats": len(samples)}
    for k in ("produce_rps", "produce_mbps", "consume_rps", "consume_mbps"):
        row[k] = median([x[k] for x in samples])
    for k in ("p50_us", "p99_us"):
        row[k] = int(median([x[k] for x in samples]))
    cpu, gb = sum(x["cpu_s"] for x in samples), sum(x["gb"] for x in samples)
    row["cpu_s"] = cpu
    row["cpu_s_per_gb"] = cpu / gb if has_forwarder else None
    row["samples"] = samples
    return row


def fmt_ratio(v, base):
    return f"{v / base * 100:.1f} %" if base else "-"


def table(rows: list[dict]) -> str:
    direct = {r["size"]: r for r in rows if r["target"] == "direct"}
    out = ["| target | record | produce rec/s | vs direct | consume rec/s | vs direct | produce MB/s | "
           "p50 µs | added p50 | p99 µs | added p99 | proxy CPU s/GB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = direct.get(r["size"])
        added50 = f"{r['p50_us'] - d['p50_us']:+d} µs" if d else "-"
        added99 = f"{r['p99_us'] - d['p99_us']:+d} µs" if d else "-"
        cpu = f"{r['cpu_s_per_gb']:.2f}" if r["cpu_s_per_gb"] is not None else "-"
        out.append(
            f"| {r['target']} | {r['size']} B | {r['produce_rps']:.0f} | "
            f"{fmt_ratio(r['produce_rps'], d['produce_rps']) if d else '-'} | {r['consume_rps']:.0f} | "
            f"{fmt_ratio(r['consume_rps'], d['consume_rps']) if d else '-'} | {r['produce_mbps']:.1f} | "
            f"{r['p50_us']} | {added50} | {r['p99_us']} | {added99} | {cpu} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--count-100", type=int, default=1_000_000, help="records per run at 100 B")
    ap.add_argument("--count-1k", type=int, default=300_000, help="records per run at 1 KB")
    ap.add_argument("--latency-count", type=int, default=5000, help="records of the one-in-flight latency run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120, help="per loadgen run, seconds")
    ap.add_argument("--out", default=str(HERE / "results.md"))
    ap.add_argument("--json", default=str(HERE / "results.json"))
    args = ap.parse_args()

    targets = [t for t in args.targets.split(",") if t]
    missing_edge = None
    if "strait-edge" in targets:
        try:
            edge_bin("release")
        except EdgeBinaryMissing as e:
            missing_edge = str(e)
            targets.remove("strait-edge")
            print(f"WARNING: skipping strait-edge: {e}", file=sys.stderr)
    sizes = {100: args.count_100, 1000: args.count_1k}
    logs = Path(os.environ.get("STRAIT_BENCH_LOGS", "/tmp")) / f"strait-bench-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"bench: targets {targets}, sizes {sizes}, logs {logs}")
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    # All targets stay up for the whole run and repetitions are interleaved across them, so drift in the
    # machine's load hits every target alike; medians over repetitions are reported.
    setups = {}
    try:
        for t in targets:
            setups[t] = Setup(t, logs).start()
        samples: dict[tuple[str, int], list[dict]] = {}
        for rep in range(args.repeats):
            for size, count in sizes.items():
                for t in targets:
                    m = measure(setups[t], size, count, args.latency_count, rep, args.timeout)
                    samples.setdefault((t, size), []).append(m)
                    print(f"  rep {rep + 1}/{args.repeats} {t:12s} {size:5d} B  produce {m['produce_rps']:9.0f} rec/s"
                          f"  consume {m['consume_rps']:9.0f} rec/s  p50 {m['p50_us']:6d} us  p99 {m['p99_us']:6d} us"
                          f"  proxy cpu {m['cpu_s']:.2f} s", flush=True)
    finally:
        for s in setups.values():
            s.stop()
    rows = [aggregate(t, size, sizes[size], samples[(t, size)], t != "direct")
            for t in targets for size in sizes]
    elapsed = time.monotonic() - started
    rows.sort(key=lambda r: (r["size"], TARGETS.index(r["target"])))
    tbl = table(rows)
    print()
    print(tbl)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    env = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit}, {os.cpu_count()} CPUs "
           f"({platform.processor() or platform.machine()}), {platform.system()} {platform.release()}, "
           f"all processes on one machine over loopback, run took {elapsed:.0f} s, 1-min load average "
           f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after (other work on the machine adds noise)")
    md = [
        "# Strait benchmark results", "",
        f"Generated by `make bench` (integration/bench/run.py): {env}.", "",
        tbl, "",
        f"- Medians of {args.repeats} interleaved repetitions; {sizes[100]} records at 100 B and "
        f"{sizes[1000]} at 1 KB per repetition; latency from {args.latency_count} records.",
        "- Throughput: `strait-loadgen` (librdkafka via the rdkafka crate), one partition, acks=all, linger 1 ms, "
        "2000 records in flight; consume reads the same records from the beginning (assign, no group).",
        "- Latency: a separate run with one record in flight and linger 0: p50/p99 of the produce round trip; "
        "'added' is the difference to direct at the same record size.",
        "- CPU s/GB: user+system CPU of the forwarding process only (socat includes its forked children) divided "
        "by the payload gigabytes it carried (produced + consumed). Tansu's own CPU is not counted.",
        "- Each target has its own fresh Tansu (memory storage). socat cannot rewrite metadata, so its Tansu "
        "advertises socat's port; `tansu proxy` and strait-edge rewrite metadata themselves.",
    ]
    if missing_edge:
        md += ["", f"strait-edge was not measured: {missing_edge}"]
    Path(args.out).write_text("\n".join(md) + "\n")
    Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.out} and {args.json} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
