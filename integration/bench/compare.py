#!/usr/bin/env python3
"""Side-by-side benchmark: Apache Kafka direct, through strait-edge, through Kroxylicious, through socat.

One single-node Apache Kafka (KRaft, 1 GiB heap, integration/lib/kafka.py) serves every target; only
the proxy being measured runs (each proxy is started for its measurement and stopped after it).

  direct        clients -> Kafka
  strait-edge   clients -> strait-edge (port per broker) -> Kafka
  kroxylicious  clients -> Kroxylicious (portIdentifiesNode gateway) -> Kafka
  socat         clients -> socat -> Kafka's SOCAT listener, which advertises socat's port, so every
                connection after bootstrap also goes through socat (socat rewrites nothing)

Variants: passthrough (all four), and encryption (strait-edge and Kroxylicious encrypting every record
value with keys in the same OpenBao Transit engine, one transit key per topic: KEK_<topic>).

Rows: record size x connections. One connection: Kafka's ProducerPerformance (acks=1, --throughput -1),
then ConsumerPerformance of the same records, then a latency probe (strait-loadgen raw-produce, one
record per request, one request in flight). 64 connections: strait-loadgen raw-produce (64 pipelined
connections from one process, acks=1); its request latency under that load is the latency reported.

Rounds alternate the targets (direct, strait-edge, kroxylicious, socat, strait-edge+enc,
kroxylicious+enc, then the next row, ...), so drift in the machine's load hits every target alike.
Reported per row: medians over rounds, with min-max, of the throughput ratio to the same round's
direct run, the added p50/p99 latency against it, and the proxy process's CPU seconds (utime+stime
from /proc, socat's forked children included) per GB of record payload it carried.

Results: integration/bench/compare.json (every sample); compare.md and the block in
docs/benchmarks.md are generated from it (`--render` regenerates them from the JSON alone).
`--smoke`: one round, 1 KB / one connection, tiny counts, both variants; asserts every record
arrived at the broker and back through every target, and that the broker holds ciphertext in the
encryption variant (integration/tests/test_bench_smoke.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import string
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lib.edge import Edge, VirtualCluster, default_target_dir  # noqa: E402
from lib.kafka import BENCH_JVM, KafkaCluster, java_bin, java_tool, kafka_libs, kafka_version  # noqa: E402
from lib.kafka_wire import answers_api_versions  # noqa: E402
from lib.kms import ROOT_TOKEN, OpenBao  # noqa: E402
from lib.ports import free_port, free_range  # noqa: E402
from lib.procs import Proc  # noqa: E402
from lib.wait import wait_for  # noqa: E402
from run import proc_cpu_seconds  # noqa: E402

KROXY_DIR = HERE / "kroxylicious"
TARGETS = ["direct", "strait-edge", "kroxylicious", "socat"]
ENCRYPTING = ["strait-edge", "kroxylicious"]
# Per row (size, connections): records per round when not calibrated (--seconds 0), and the probe count
# of the calibration, which sizes each row so that the direct produce takes --seconds (default 12 s):
# the slowest target then stays within about 30 s.
DEFAULT_COUNTS = {(100, 1): 10_000_000, (1000, 1): 2_000_000, (100, 64): 20_000_000, (1000, 64): 4_000_000}
CALIBRATION_FRACTION = 0.1
SMOKE_COUNT = 20_000
PARTITIONS = {1: 1, 64: 4}
# Record-value marker headers: what each proxy adds to a record it encrypted.
CIPHER_HEADERS = {"strait-edge": "strait.enc", "kroxylicious": "kroxylicious.io/encryption"}
PRODUCER_LINE = re.compile(
    r"(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\), ([\d.]+) ms avg latency, "
    r"([\d.]+) ms max latency, (\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th, (\d+) ms 99.9th")


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ binaries

def rust_bin(name: str, profile: str) -> str:
    env = {("strait-edge", "release"): "STRAIT_EDGE_RELEASE_BIN", ("strait-edge", "debug"): "STRAIT_EDGE_BIN",
           ("strait-loadgen", "release"): "STRAIT_LOADGEN_BIN"}.get((name, profile))
    path = os.environ.get(env) if env else None
    path = path or str(default_target_dir() / profile / name)
    if not os.access(path, os.X_OK):
        sys.exit(f"{name} not found at {path}: cargo build {'--release ' if profile == 'release' else ''}"
                 f"-p {name} (CARGO_TARGET_DIR={default_target_dir()})")
    return path


def kroxylicious_home() -> Path:
    """Runs install.sh (a no-op once ~/.cache/strait/kroxylicious/<version> is complete)."""
    r = subprocess.run([str(KROXY_DIR / "install.sh")], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"Kroxylicious install failed:\n{r.stderr[-3000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + (" (work tree with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------ targets

class Bench:
    """The Kafka node, OpenBao, and how to start each target in front of them."""

    def __init__(self, logs: Path, args):
        self.logs = logs
        self.args = args
        self.loadgen = rust_bin("strait-loadgen", args.profile)
        self.edge_bin = rust_bin("strait-edge", args.profile) if "strait-edge" in args.targets else None
        self.kroxy_home = kroxylicious_home() if "kroxylicious" in args.targets else None
        self.kafka: KafkaCluster | None = None
        self.bao: OpenBao | None = None
        self.socat_port = free_port()
        self.socat_backend = free_port()

    def start(self) -> None:
        k = KafkaCluster(self.logs, brokers=1, name="bench-kafka", heap="1g", jvm=BENCH_JVM)
        node = k.nodes[0]
        # A third listener for socat: bound on its own port, advertising socat's port, so a client that
        # bootstraps through socat is told to reconnect through socat.
        k.extra.update({
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port},"
                         f"SOCAT://127.0.0.1:{self.socat_backend}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port},SOCAT://127.0.0.1:{self.socat_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SOCAT:PLAINTEXT",
            # The benchmark deletes every topic after its measurement: reclaim the disk promptly.
            "log.segment.delete.delay.ms": "1000",
            "file.delete.delay.ms": "1000",
        })
        log(f"starting Kafka {kafka_version()} (1 node, 1 GiB heap)")
        self.kafka = k.start()
        if "encryption" in self.args.variants:
            os.environ["VAULT_TOKEN"] = ROOT_TOKEN
            self.bao = OpenBao(self.logs).start()
            log(f"OpenBao dev server on {self.bao.url}")

    def stop(self) -> None:
        import gc
        gc.collect()  # admin clients of the harness, before their broker goes away (no reconnect noise)
        if self.bao:
            self.bao.stop()
        if self.kafka:
            self.kafka.stop()

    @property
    def node_ids(self) -> list[int]:
        return [n.node_id for n in self.kafka.nodes]

    # ---- proxies: each returns (bootstrap, pid or None, stop callable, log reader)

    def start_target(self, target: str, encrypt: bool, tag: str):
        if target == "direct":
            return self.kafka.bootstrap, None, lambda: None, lambda: ""
        if target == "socat":
            socat = shutil.which("socat") or sys.exit("socat not found: run scripts/setup.sh")
            # backlog: socat's default of 5 overflows when 64 connections arrive at once, and the
            # connections the kernel then drops reach the client as an early end of file.
            p = Proc(f"socat-{tag}", [socat, f"TCP-LISTEN:{self.socat_port},bind=127.0.0.1,fork,reuseaddr,backlog=512",
                                      f"TCP:127.0.0.1:{self.socat_backend},nodelay"], self.logs)
            p.start()
            wait_for(lambda: answers_api_versions("127.0.0.1", self.socat_port), 30, what="socat")
            return f"127.0.0.1:{self.socat_port}", p.pid, lambda: p.stop(), p.current_log
        if target == "strait-edge":
            return self._start_edge(encrypt, tag)
        if target == "kroxylicious":
            return self._start_kroxylicious(encrypt, tag)
        raise ValueError(target)

    def _start_edge(self, encrypt: bool, tag: str):
        extra, top = {}, {}
        if encrypt:
            top["kms"] = [self.bao.kms_entry("vault")]
            extra["encryption"] = {"rules": [{"topic": "*", "kms": "vault", "kek": "KEK_$(topic)"}],
                                   "on_missing_key": "reject"}
        os.environ.setdefault("STRAIT_EDGE_RUST_LOG", "warn")
        vc = VirtualCluster("bench", self.kafka.bootstrap_servers, extra=extra)
        edge = Edge(self.logs / f"edge-{tag}", [vc], binary=self.edge_bin, extra=top).start()

        def stop():
            code = edge.terminate(timeout=15)
            if code != 0:
                log(f"WARNING: strait-edge exited with {code}")
        return vc.bootstrap, edge.proc.pid, stop, edge.log_text

    def _start_kroxylicious(self, encrypt: bool, tag: str):
        ports = free_range(1 + len(self.node_ids))
        template = (KROXY_DIR / ("encryption.yaml" if encrypt else "passthrough.yaml")).read_text()
        cfg = string.Template(template).safe_substitute(
            kafka_bootstrap=self.kafka.bootstrap, bootstrap_port=ports[0], broker_start_port=ports[1],
            node_id_start=min(self.node_ids), node_id_end=max(self.node_ids),
            vault_transit_url=f"{self.bao.url}/v1/transit" if self.bao else "", vault_token=ROOT_TOKEN)
        assert not re.search(r"\$\{\w+\}", cfg), f"unfilled placeholder in the Kroxylicious config:\n{cfg}"
        path = self.logs / f"kroxylicious-{tag}.yaml"
        path.write_text(cfg)
        home = self.kroxy_home
        argv = [self.kroxy_java(), "-Xms1g", "-Xmx1g", "-XX:+ExitOnOutOfMemoryError",
                f"-Dlog4j2.configurationFile={KROXY_DIR / 'log4j2.properties'}",
                "-cp", f"{home}/launcher:{home}/libs/*", "StraitBenchKroxylicious", "--config", str(path)]
        p = Proc(f"kroxylicious-{tag}", argv, self.logs)
        p.start()

        def up():
            if not p.alive():
                raise RuntimeError(f"Kroxylicious exited with {p.popen.returncode}:\n{p.tail()}")
            return answers_api_versions("127.0.0.1", ports[0])
        wait_for(up, 120, interval=0.2, what="Kroxylicious bootstrap")
        return f"127.0.0.1:{ports[0]}", p.pid, lambda: p.stop(timeout=20), p.current_log

    def kroxy_java(self) -> str:
        return os.environ.get("STRAIT_KROXYLICIOUS_JAVA") or java_bin()

    # ---- load

    def producer_perf(self, bootstrap: str, topic: str, count: int, size: int, timeout: float) -> dict:
        argv = java_tool("org.apache.kafka.tools.ProducerPerformance", "--topic", topic,
                         "--num-records", str(count), "--record-size", str(size), "--throughput", "-1",
                         "--producer-props", f"bootstrap.servers={bootstrap}", "acks=1", heap="512m")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        lines = [m for m in PRODUCER_LINE.finditer(r.stdout)]
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"ProducerPerformance failed ({r.returncode}):\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
        g = lines[-1].groups()
        errors = [l for l in r.stderr.splitlines() if "Exception" in l or "ERROR" in l]
        return {"records": int(g[0]), "records_per_s": float(g[1]), "mb_per_s": float(g[2]),
                "p50_ms": int(g[5]), "p99_ms": int(g[7]), "max_ms": float(g[4]), "errors": errors[:5]}

    def consumer_perf(self, bootstrap: str, topic: str, count: int, timeout: float) -> dict:
        argv = java_tool("org.apache.kafka.tools.ConsumerPerformance", "--bootstrap-server", bootstrap,
                         "--topic", topic, "--messages", str(count), "--timeout", "30000",
                         "--group", f"bench-{uuid.uuid4().hex[:8]}", heap="512m")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        header = next((i for i, l in enumerate(r.stdout.splitlines()) if l.startswith("start.time")), None)
        if r.returncode != 0 or header is None:
            raise RuntimeError(f"ConsumerPerformance failed ({r.returncode}):\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
        lines = r.stdout.splitlines()
        names = [n.strip() for n in lines[header].split(",")]
        values = [v.strip() for v in lines[header + 1].split(",")]
        row = dict(zip(names, values))
        return {"records": int(row["data.consumed.in.nMsg"]), "mb": float(row["data.consumed.in.MB"]),
                "records_per_s": float(row["fetch.nMsg.sec"]), "mb_per_s": float(row["fetch.MB.sec"]) * 1.048576,
                "rebalance_ms": int(row["rebalance.time.ms"])}

    def raw_produce(self, bootstrap: str, topic: str, count: int, size: int, connections: int, timeout: float,
                    batch_bytes: int = 16 * 1024, inflight: int = 4) -> dict:
        # The 64-connection load: each connection keeps 4 requests of one 16 KB record batch in flight, as
        # a batching producer does (librdkafka's and the Java client's default batch size is 16 KB or more).
        # The latency probe asks for one record per request, one in flight.
        argv = [self.loadgen, "raw-produce", "--bootstrap", bootstrap, "--topic", topic, "--count", str(count),
                "--size", str(size), "--connections", str(connections), "--batch-bytes", str(batch_bytes),
                "--inflight", str(inflight), "--acks", "1", "--timeout-secs", str(int(timeout))]
        env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"raw-produce failed ({r.returncode}):\n{r.stderr[:2000]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def latency_probe(self, bootstrap: str, topic: str, size: int, count: int) -> dict:
        """One record per Produce request, one request in flight: the round trip of a lone request."""
        return self.raw_produce(bootstrap, topic, count, size, 1, 120, batch_bytes=size, inflight=1)

    # ---- broker-side checks (always directly against Kafka)

    def create_topic(self, topic: str, partitions: int, encrypt: bool) -> None:
        self.kafka.create_topic(topic, partitions=partitions, replication_factor=1)
        if encrypt:
            self.bao.create_key(f"KEK_{topic}")

    def delete_topic(self, topic: str) -> None:
        try:
            for f in self.kafka.admin().delete_topics([topic], operation_timeout=30).values():
                f.result(timeout=60)
        except Exception as e:  # noqa: BLE001 - a leftover topic costs disk, not correctness
            log(f"WARNING: deleting {topic}: {e}")

    def stored_records(self, topic: str) -> int:
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.kafka.bootstrap, "group.id": "bench-check"})
        try:
            md = c.list_topics(topic, timeout=10)
            total = 0
            for p in md.topics[topic].partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                total += hi - lo
            return total
        finally:
            c.close()

    def stored_sample(self, topic: str, n: int = 20) -> list[tuple[bytes, list]]:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.kafka.bootstrap, "group.id": "bench-check",
                      "enable.auto.commit": False})
        try:
            c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            out, deadline = [], time.monotonic() + 30
            while len(out) < n and time.monotonic() < deadline:
                m = c.poll(1.0)
                if m is not None and m.error() is None:
                    out.append((m.value() or b"", m.headers() or []))
            return out
        finally:
            c.close()


def plaintext_like(value: bytes, size: int, conns: int) -> bool:
    """What the load generators send: ProducerPerformance `size` random bytes in A-Z (one connection),
    raw-produce the bytes 0, 1, 2, ... mod 251 (64 connections)."""
    if len(value) != size:
        return False
    if conns == 1:
        return all(65 <= b <= 90 for b in value)
    return value == bytes(i % 251 for i in range(size))


def check_at_rest(bench: Bench, topic: str, target: str, encrypt: bool, size: int, conns: int) -> dict:
    sample = bench.stored_sample(topic)
    if not sample:
        raise RuntimeError(f"{topic}: no records readable directly from Kafka")
    marker = CIPHER_HEADERS.get(target)
    cipher = sum(1 for v, hs in sample
                 if not plaintext_like(v, size, conns) and any(k == marker for k, _ in hs))
    plain = sum(1 for v, _ in sample if plaintext_like(v, size, conns))
    if encrypt and cipher != len(sample):
        raise AssertionError(f"{target}: {len(sample) - cipher} of {len(sample)} records stored at the broker "
                             f"are not ciphertext with the {marker} header")
    if not encrypt and plain != len(sample):
        raise AssertionError(f"{target}: {len(sample) - plain} of {len(sample)} passthrough records altered")
    return {"sampled": len(sample), "ciphertext": cipher, "plaintext": plain}


# ------------------------------------------------------------------------------------------ measure

def warnings_in(text: str) -> list[str]:
    keep = []
    for line in text.splitlines():
        if re.search(r'\b(WARN|WARNING|ERROR)\b|"level":"(WARN|ERROR)"', line):
            keep.append(line[:400])
    return keep


def measure(bench: Bench, target: str, encrypt: bool, size: int, conns: int, count: int, rnd: int) -> dict:
    args = bench.args
    variant = "encryption" if encrypt else "passthrough"
    tag = f"r{rnd}-{target}-{variant}-{size}x{conns}"
    topic = f"cmp-{tag}".replace("strait-edge", "strait")
    warm_topic = topic + "-warm"
    sample = {"round": rnd, "target": target, "variant": variant, "size": size, "connections": conns,
              "count": count}
    bench.create_topic(topic, PARTITIONS[conns], encrypt)
    warm = int(count * args.warmup)
    if warm:
        bench.create_topic(warm_topic, PARTITIONS[conns], encrypt)
    bootstrap, pid, stop, log_text = bench.start_target(target, encrypt, tag)
    cpu = (lambda: proc_cpu_seconds(pid)) if pid else (lambda: 0.0)
    timeout = args.timeout
    try:
        if warm:  # JIT, connection pools, DEKs: the proxy's steady state is what is measured
            if conns == 1:
                bench.producer_perf(bootstrap, warm_topic, warm, size, timeout)
            else:
                bench.raw_produce(bootstrap, warm_topic, warm, size, conns, timeout)
        c0 = cpu()
        if conns == 1:
            prod = bench.producer_perf(bootstrap, topic, count, size, timeout)
            sample.update(produce_rps=prod["records_per_s"], produce_mbps=prod["records_per_s"] * size / 1e6,
                          loaded_p50_ms=prod["p50_ms"], loaded_p99_ms=prod["p99_ms"],
                          producer_errors=prod["errors"])
            produced = prod["records"]
        else:
            prod = bench.raw_produce(bootstrap, topic, count, size, conns, timeout)
            sample.update(produce_rps=prod["records_per_s"], produce_mbps=prod["mb_per_s"],
                          p50_us=prod["p50_us"], p99_us=prod["p99_us"], latency="request under load")
            produced = prod["records"]
        c1 = cpu()
        stored = bench.stored_records(topic)
        sample.update(produced=produced, stored=stored, cpu_produce_s=c1 - c0)
        if stored != produced:
            raise AssertionError(f"{target}: {produced} records acknowledged, {stored} stored at the broker")
        gigabytes = produced * size / 1e9
        if conns == 1:
            cons = bench.consumer_perf(bootstrap, topic, produced, timeout)
            c2 = cpu()
            sample.update(consumed=cons["records"], consume_rps=cons["records_per_s"],
                          consume_mbps=cons["records_per_s"] * size / 1e6, cpu_consume_s=c2 - c1)
            if cons["records"] != produced:
                raise AssertionError(f"{target}: {produced} records stored, {cons['records']} consumed back")
            gigabytes += cons["records"] * size / 1e9
        sample["at_rest"] = check_at_rest(bench, topic, target, encrypt, size, conns)
        cpu_s = sample["cpu_produce_s"] + sample.get("cpu_consume_s", 0.0)
        sample.update(gb=gigabytes, cpu_s=cpu_s, cpu_s_per_gb=cpu_s / gigabytes if pid else None)
        if conns == 1:
            lat = bench.latency_probe(bootstrap, topic, size, args.latency_count)
            sample.update(p50_us=lat["p50_us"], p99_us=lat["p99_us"], latency="one request in flight")
    finally:
        stop()
        sample["proxy_warnings"] = warnings_in(log_text())[:20]
        bench.delete_topic(topic)
        if warm:
            bench.delete_topic(warm_topic)
    return sample


def calibrate(bench: Bench, size: int, conns: int, default: int, seconds: float) -> int:
    """Records for `seconds` of direct produce at this row, from a probe run of a tenth of the default
    count (after a warm-up of the same size), rounded to two significant digits."""
    probe = int(default * CALIBRATION_FRACTION)
    topic = f"cmp-calibrate-{size}x{conns}"
    bench.create_topic(topic, PARTITIONS[conns], False)
    try:
        for _ in range(2):
            if conns == 1:
                rate = bench.producer_perf(bench.kafka.bootstrap, topic, probe, size, 300)["records_per_s"]
            else:
                rate = bench.raw_produce(bench.kafka.bootstrap, topic, probe, size, conns, 120)["records_per_s"]
    except RuntimeError as e:
        log(f"WARNING: calibration of {size} B x{conns} failed, using {default:,} records: {str(e)[:300]}")
        return default
    finally:
        bench.delete_topic(topic)
    n = max(int(rate * seconds), 10_000)
    digits = len(str(n)) - 2
    n = round(n, -digits)
    log(f"calibration {size} B x{conns}: direct {rate:,.0f} records/s -> {n:,} records per round")
    return n


# ------------------------------------------------------------------------------------------ report

def q(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(samples: list[dict]) -> list[dict]:
    """Per row, variant and target: medians and ranges over rounds of per-round comparisons to direct."""
    ok = [s for s in samples if "error" not in s]
    direct = {(s["round"], s["size"], s["connections"]): s for s in ok if s["target"] == "direct"}
    keys = []
    for s in samples:
        k = (s["size"], s["connections"], s["variant"], s["target"])
        if k not in keys:
            keys.append(k)
    order = {t: i for i, t in enumerate(TARGETS)}
    keys.sort(key=lambda k: (k[0], k[1], k[2] != "passthrough", order.get(k[3], 9)))
    rows = []
    for size, conns, variant, target in keys:
        mine = [s for s in ok if (s["size"], s["connections"], s["variant"], s["target"]) == (size, conns, variant, target)]
        failed = [s for s in samples if "error" in s and (s["size"], s["connections"], s["variant"], s["target"])
                  == (size, conns, variant, target)]
        pairs = [(s, direct.get((s["round"], size, conns))) for s in mine]
        pairs = [(s, d) for s, d in pairs if d is not None]

        def ratio(k):
            return q([s[k] / d[k] for s, d in pairs if s.get(k) and d.get(k)])

        def added(k):
            return q([s[k] - d[k] for s, d in pairs if s.get(k) is not None and d.get(k) is not None])
        rows.append({
            "size": size, "connections": conns, "variant": variant, "target": target,
            "rounds": len(mine), "failed_rounds": len(failed),
            "errors": [s["error"][:300] for s in failed],
            "produce_mbps": q([s["produce_mbps"] for s in mine]),
            "consume_mbps": q([s.get("consume_mbps") for s in mine]),
            "produce_vs_direct": ratio("produce_rps"),
            "consume_vs_direct": ratio("consume_rps"),
            "p50_us": q([s.get("p50_us") for s in mine]),
            "p99_us": q([s.get("p99_us") for s in mine]),
            "added_p50_us": added("p50_us"),
            "added_p99_us": added("p99_us"),
            "cpu_s_per_gb": q([s.get("cpu_s_per_gb") for s in mine]),
            "latency": mine[0].get("latency") if mine else None,
        })
    return rows


def fmt(x: dict, pattern: str, scale: float = 1.0, signed: bool = False) -> str:
    if not x or x.get("median") is None:
        return "–"
    f = (lambda v: format(v * scale, "+" + pattern if signed else pattern))
    if x["n"] == 1 or x["min"] == x["max"]:
        return f(x["median"])
    return f"{f(x['median'])} ({f(x['min'])} – {f(x['max'])})"


def goals(rows: list[dict]) -> list[str]:
    """The goals, checked row by row from the summary (median values)."""
    by = {(r["size"], r["connections"], r["variant"], r["target"]): r for r in rows}
    out = []

    def med(r, k):
        return r[k]["median"] if r and r.get(k) else None
    ahead, cpu3, cpu2, at98 = [], [], [], []
    for (size, conns, variant, target), r in sorted(by.items()):
        if target != "strait-edge":
            continue
        k = by.get((size, conns, variant, "kroxylicious"))
        label = f"{size} B × {conns} conn, {variant}"
        if k:
            checks = []
            for key, better, name in (("produce_vs_direct", max, "produce"), ("consume_vs_direct", max, "consume"),
                                      ("added_p50_us", min, "p50"), ("added_p99_us", min, "p99"),
                                      ("cpu_s_per_gb", min, "CPU/GB")):
                a, b = med(r, key), med(k, key)
                if a is None or b is None:
                    continue
                won = (a > b) if better is max else (a < b)
                checks.append(f"{name} {'✓' if won else '✗'}")
            ahead.append(f"{label}: {', '.join(checks)}")
            a, b = med(r, "cpu_s_per_gb"), med(k, "cpu_s_per_gb")
            if a is not None and b:
                limit = 1 / 3 if variant == "passthrough" else 1 / 2
                (cpu3 if variant == "passthrough" else cpu2).append(
                    f"{label}: {a / b:.2f} of Kroxylicious' {'✓' if a / b <= limit else '✗'}")
        if size == 1000:
            p = med(r, "produce_vs_direct")
            c = med(r, "consume_vs_direct")
            parts = [f"produce {p * 100:.1f} % {'✓' if p >= 0.98 else '✗'}"] if p else []
            if c:
                parts.append(f"consume {c * 100:.1f} % {'✓' if c >= 0.98 else '✗'}")
            at98.append(f"{label}: {', '.join(parts)}")
    out.append("- **Strait ahead of Kroxylicious on every row** (throughput ratio, added latency, CPU/GB):")
    out += [f"  - {x}" for x in ahead] or ["  - (not measured)"]
    out.append("- **Passthrough CPU/GB at most 1/3 of Kroxylicious'**:")
    out += [f"  - {x}" for x in cpu3] or ["  - (not measured)"]
    out.append("- **Encrypting CPU/GB at most 1/2 of Kroxylicious'**:")
    out += [f"  - {x}" for x in cpu2] or ["  - (not measured)"]
    out.append("- **Through-edge throughput ≥ 98 % of direct at 1 KB**:")
    out += [f"  - {x}" for x in at98] or ["  - (not measured)"]
    return out


def render(result: dict) -> str:
    meta = result["meta"]
    rows = result["rows"]
    lines = [
        "# Strait vs Kroxylicious vs socat vs direct",
        "",
        f"Generated by `integration/bench/compare.py` from `compare.json` — do not edit by hand. "
        f"Mode: {meta['mode']}.",
        "",
        f"- Date: {meta['date']}; git commit {meta['commit']}",
        f"- Apache Kafka {meta['kafka_version']} (single KRaft node, 1 GiB heap); Kroxylicious "
        f"{meta['kroxylicious_version']} ({meta['kroxylicious_artifacts']}, JVM: {meta['kroxylicious_java']}, "
        f"-Xmx1g); strait-edge {meta['profile']} build; socat {meta['socat_version']}",
        f"- Machine: {meta['nproc']} CPUs, {meta['cpu_model']}, {meta['memory_gib']} GiB, {meta['kernel']}; "
        f"1-min load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after; "
        f"run took {meta['elapsed_s'] / 60:.1f} min",
        f"- {meta['rounds']} round(s), targets alternating within each row; records per round: "
        + ", ".join(f"{k} → {v:,}" for k, v in meta["counts"].items())
        + (f" (calibrated: about {meta['calibrated_seconds']:.0f} s of direct produce)"
           if meta.get("calibrated_seconds") else "")
        + f"; warm-up {meta['warmup'] * 100:.0f} % of that first; latency probe {meta['latency_count']:,} records",
    ]
    if meta.get("rows_measured") and meta.get("earlier_runs"):
        lines[-1] += "; rows " + ", ".join(f"{s} B × {c}" for s, c in meta["rows_measured"]) + " from this run"
    for m in meta.get("earlier_runs", []):
        lines.append(
            "- Rows " + ", ".join(f"{s} B × {c}" for s, c in m["rows_measured"])
            + f" from an earlier run: {m['date']}, commit {m['commit']}, {m['rounds']} round(s), 1-min load "
            f"{m['load_before']:.1f} before / {m['load_after']:.1f} after; records per round: "
            + ", ".join(f"{k} → {v:,}" for k, v in m["counts"].items()))
    lines += [
        "",
        "Cells: median over rounds, (min – max) when rounds differ. \"vs direct\" and \"added\" compare each "
        "round with the same round's direct run.",
        "",
        "| record | conns | variant | target | produce MB/s | produce vs direct | consume MB/s | consume vs direct "
        "| added p50 µs | added p99 µs | proxy CPU s/GB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fails = f" ({r['failed_rounds']} failed)" if r["failed_rounds"] else ""
        direct = r["target"] == "direct"
        lines.append(
            f"| {r['size']} B | {r['connections']} | {r['variant']} | {r['target']}{fails} | "
            f"{fmt(r['produce_mbps'], '.1f')} | {'–' if direct else fmt(r['produce_vs_direct'], '.1f', 100) + ' %'} | "
            f"{fmt(r['consume_mbps'], '.1f')} | "
            f"{'–' if direct or r['consume_vs_direct']['median'] is None else fmt(r['consume_vs_direct'], '.1f', 100) + ' %'} | "
            f"{fmt(r['p50_us'], '.0f') + ' (abs)' if direct else fmt(r['added_p50_us'], '.0f', signed=True)} | "
            f"{fmt(r['p99_us'], '.0f') + ' (abs)' if direct else fmt(r['added_p99_us'], '.0f', signed=True)} | "
            f"{fmt(r['cpu_s_per_gb'], '.2f')} |")
    lines += [
        "",
        "How each column is measured:",
        "",
        "- **1 connection**: produce = `org.apache.kafka.tools.ProducerPerformance --throughput -1` "
        "(acks=1, Java client defaults otherwise); consume = `org.apache.kafka.tools.ConsumerPerformance` of "
        "the same records (fetch rate, group join excluded). Latency = `strait-loadgen raw-produce` with one "
        "record per request and one request in flight (the round trip of a lone request); direct rows show "
        "the absolute value.",
        "- **64 connections**: `strait-loadgen raw-produce --connections 64` (one process; per connection 4 "
        "Produce requests in flight, each one 16 KB record batch; acks=1) to 4 partitions; latency = request "
        "latency under that load. No consume (the load generator has no 64-connection consumer).",
        "- **CPU s/GB**: utime+stime of the proxy process (Kroxylicious: its JVM; socat: with its forked "
        "children) over the produce and consume steps, divided by the record-payload GB carried (produced + "
        "consumed). Kafka and the clients share the same 2 cores, so the proxy's CPU is also the clients' loss.",
        "- Encryption: strait-edge (`encryption.rules: [{topic: \"*\", kms: vault, kek: \"KEK_$(topic)\"}]`) "
        "and Kroxylicious (`RecordEncryption`, `VaultKmsService`, `TemplateKekSelector` `KEK_$(topicName)`) "
        "use the same OpenBao dev server's Transit engine, one key per topic. Every measurement checked that "
        "the broker stored exactly the records acknowledged, that all of them were consumed back through the "
        "same target, and (sampled directly from Kafka) that they are ciphertext with the proxy's marker "
        "header in the encryption variant and untouched in passthrough.",
        "",
        "## Goals",
        "",
        *goals(rows),
    ]
    failed = [r for r in rows if r["errors"]]
    if failed:
        lines += ["", "## Failed measurements", ""]
        for r in failed:
            for e in r["errors"]:
                lines.append(f"- {r['size']} B × {r['connections']}, {r['variant']}, {r['target']}: "
                             f"`{e.splitlines()[0] if e else ''}`")
    warn = [s for s in result["samples"] if s.get("proxy_warnings")]
    if warn:
        lines += ["", "## Proxy log warnings", ""]
        seen = set()
        for s in warn:
            for w in s["proxy_warnings"][:3]:
                key = (s["target"], re.sub(r"\d+", "N", w)[:120])
                if key in seen:
                    continue
                seen.add(key)
                lines.append(f"- {s['target']} ({s['size']} B × {s['connections']}, {s['variant']}, round "
                             f"{s['round']}): `{w[:240]}`")
    return "\n".join(lines) + "\n"


DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- compare.md: begin (generated by integration/bench/compare.py) -->", "<!-- compare.md: end -->"


def write_reports(result: dict, md_path: Path, update_doc: bool, quiet: bool = False) -> None:
    text = render(result)
    md_path.write_text(text)
    if not quiet:
        log(f"wrote {md_path}")
    if update_doc and DOC.exists():
        doc = DOC.read_text()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            body = text.split("\n", 2)[2]  # without the top-level title
            DOC.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")
            if not quiet:
                log(f"updated the generated block in {DOC}")


# ------------------------------------------------------------------------------------------ main

def write_results(args, counts, rows, samples, bench, started, load_before, json_path, md_path, update_doc,
              partial: bool) -> None:
    elapsed = time.monotonic() - started
    socat = shutil.which("socat")
    m = re.search(r"socat version (\S+)", subprocess.run([socat, "-V"], capture_output=True, text=True).stdout
                  if socat else "")
    socat_version = m.group(1) if m else "unknown"
    kroxy_version = bench.kroxy_home.name if bench.kroxy_home else "not run"
    java_version = subprocess.run([bench.kroxy_java(), "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    meta = {
        "mode": ("smoke" if args.smoke else "full") + (" (partial: run still going)" if partial else ""),
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        "commit": git_commit(),
        "kafka_version": kafka_version(),
        "kafka_libs": str(kafka_libs()),
        "kroxylicious_version": kroxy_version,
        "kroxylicious_artifacts": "io.kroxylicious:kroxylicious-runtime, kroxylicious-record-encryption, "
                                  "kroxylicious-kms-provider-hashicorp-vault",
        "kroxylicious_java": java_version,
        "socat_version": socat_version,
        "profile": args.profile,
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "kernel": f"{platform.system()} {platform.release()}",
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "elapsed_s": elapsed,
        "rounds": args.rounds,
        "counts": {f"{s} B × {c}": n for (s, c), n in counts.items() if (s, c) in rows},
        "calibrated_seconds": args.seconds if getattr(args, "calibrated", False) else 0,
        "warmup": args.warmup,
        "latency_count": args.latency_count,
        "targets": args.targets,
        "variants": args.variants,
    }
    if getattr(args, "merge_from", None):
        # Rows measured now replace the same rows of the earlier results; the others are kept with the
        # metadata of the run that measured them.
        old = args.merge_from
        measured = {(s, c) for s, c in rows}
        samples = [s for s in old["samples"] if (s["size"], s["connections"]) not in measured] + samples
        earlier = [m for m in [old["meta"], *old["meta"].get("earlier_runs", [])] if m.get("rows_measured")
                   and not set(map(tuple, m["rows_measured"])) <= measured]
        meta["earlier_runs"] = [{k: v for k, v in m.items() if k != "earlier_runs"} for m in earlier]
    meta["rows_measured"] = [[s, c] for s, c in rows]
    result = {"meta": meta, "rows": summarize(samples), "samples": samples}
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    if not partial:
        log(f"wrote {json_path}")
    write_reports(result, md_path, update_doc, quiet=partial)


def parse_rows(spec: str) -> list[tuple[int, int]]:
    rows = []
    for item in spec.split(","):
        size, conns = item.lower().split("x")
        rows.append((int(size), int(conns)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="1 round, 1 KB x 1 connection, tiny counts, asserts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="100x1,1000x1,100x64,1000x64", help="SIZExCONNECTIONS,...")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--variants", default="passthrough,encryption")
    ap.add_argument("--count", action="append", default=[], metavar="SIZExCONNS=N",
                    help="records per round for a row, e.g. 1000x1=500000 (repeatable)")
    ap.add_argument("--seconds", type=float, default=12.0,
                    help="calibrate: size each row's count so the direct produce takes this long (0: defaults)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every record count")
    ap.add_argument("--warmup", type=float, default=0.2, help="warm-up records, as a fraction of the count")
    ap.add_argument("--latency-count", type=int, default=5000)
    ap.add_argument("--timeout", type=float, default=300, help="per load-generator run, seconds")
    ap.add_argument("--profile", default="release", choices=["release", "debug"], help="Rust binaries' build")
    ap.add_argument("--json", default=None, help="results file (default integration/bench/compare.json; "
                                                  "smoke: in the log folder)")
    ap.add_argument("--md", default=None, help="table (default next to the JSON, .md)")
    ap.add_argument("--render", action="store_true", help="only regenerate the Markdown from the JSON")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results file's other rows (with their run's metadata); replace only --rows")
    args = ap.parse_args(argv)

    logs = Path(os.environ.get("STRAIT_BENCH_LOGS", "/tmp")) / f"strait-compare-{os.getpid()}"
    default_json = (logs / "compare.json") if args.smoke else (HERE / "compare.json")
    json_path = Path(args.json) if args.json else default_json
    md_path = Path(args.md) if args.md else json_path.with_suffix(".md")
    update_doc = json_path.resolve() == (HERE / "compare.json").resolve()
    if args.render:
        write_reports(json.loads(json_path.read_text()), md_path, update_doc)
        return 0

    args.merge_from = json.loads(json_path.read_text()) if args.merge and json_path.exists() else None
    if args.merge_from and "rows_measured" not in args.merge_from["meta"]:
        # Results written before --merge existed: the rows are those its samples cover.
        args.merge_from["meta"]["rows_measured"] = sorted(
            {(s["size"], s["connections"]) for s in args.merge_from["samples"]})
    args.targets = [t for t in args.targets.split(",") if t]
    args.variants = [v for v in args.variants.split(",") if v]
    rows = parse_rows(args.rows)
    counts = {}
    if args.smoke:
        args.rounds, rows, args.warmup, args.latency_count = 1, [(1000, 1)], 0.0, 500
        counts = {(1000, 1): SMOKE_COUNT}
    for item in args.count:
        k, v = item.split("=")
        counts[parse_rows(k)[0]] = int(v)
    logs.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"compare: rows {rows}, targets {args.targets}, variants {args.variants}, rounds {args.rounds}, logs {logs}")

    bench = Bench(logs, args)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    samples: list[dict] = []
    plan = [(t, False) for t in args.targets if "passthrough" in args.variants]
    plan += [(t, True) for t in args.targets if t in ENCRYPTING and "encryption" in args.variants]
    if not any(t == "direct" for t, _ in plan):
        plan.insert(0, ("direct", False))  # every comparison is against the same round's direct run
    try:
        bench.start()
        for r in rows:
            if r in counts:
                continue
            default = DEFAULT_COUNTS.get(r, 1_000_000)
            counts[r] = int((calibrate(bench, *r, default, args.seconds) if args.seconds else default) * args.scale)
            args.calibrated = True
        for rnd in range(1, args.rounds + 1):
            for size, conns in rows:
                for target, encrypt in plan:
                    variant = "encryption" if encrypt else "passthrough"
                    t0 = time.monotonic()
                    try:
                        s = measure(bench, target, encrypt, size, conns, counts[(size, conns)], rnd)
                    except Exception as e:  # noqa: BLE001 - recorded; the smoke run re-raises
                        if args.smoke:
                            raise
                        s = {"round": rnd, "target": target, "variant": variant, "size": size,
                             "connections": conns, "count": counts[(size, conns)], "error": f"{type(e).__name__}: {e}"}
                    s["wall_s"] = time.monotonic() - t0
                    samples.append(s)
                    write_results(args, counts, rows, samples, bench, started, load_before, json_path, md_path,
                                  update_doc, partial=True)
                    if "error" in s:
                        log(f"round {rnd} {size:5d} B x{conns:<3d} {variant:11s} {target:13s} FAILED: "
                            f"{s['error'].splitlines()[0][:200]}")
                    else:
                        log(f"round {rnd} {size:5d} B x{conns:<3d} {variant:11s} {target:13s} "
                            f"produce {s['produce_mbps']:7.1f} MB/s  consume {s.get('consume_mbps') or 0:7.1f} MB/s  "
                            f"p50 {s['p50_us']:6d} us  p99 {s['p99_us']:6d} us  cpu {s['cpu_s']:6.2f} s "
                            f"({(s['cpu_s_per_gb'] or 0):5.2f} s/GB)  [{s['wall_s']:.0f} s]")
    finally:
        bench.stop()
    write_results(args, counts, rows, samples, bench, started, load_before, json_path, md_path, update_doc,
                  partial=False)
    print()
    print(md_path.read_text())
    failures = [s for s in samples if "error" in s]
    return 1 if failures and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
