#!/usr/bin/env python3
"""What the edge's features cost: the same load through a plaintext edge, an mTLS edge, an edge with
authorization and audit, and an edge encrypting every record (local KMS), all in one run.

Load: CONNECTIONS producer processes at once (librdkafka opens one connection per broker, so this is
CONNECTIONS client connections to the edge), each sending its share of 1 KB records; then one consumer
reading everything back (for the encrypting edge, that is decryption). Each variant gets a fresh Tansu.
Reported: aggregate produce and consume throughput, the ratio against the plaintext edge, the produce
request latency p50/p99 of a one-in-flight producer, and the edge's CPU seconds per GB. Run with
`make bench-features`; results go to integration/bench/features.md.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lib.edge import Edge, VirtualCluster, edge_bin  # noqa: E402
from lib.pki import SPIFFE_ORDERS, standard_pki  # noqa: E402
from lib.tansu import Tansu  # noqa: E402
from run import loadgen_bin, proc_cpu_seconds, run_loadgen  # noqa: E402

VARIANTS = ["plain", "mtls", "authz", "encrypt"]


def start(variant: str, logs: Path, pki) -> tuple[Tansu, Edge, list[str]]:
    tansu = Tansu(logs, name=f"tansu-{variant}").start()
    extra: dict = {}
    top: dict = {}
    client: list[str] = []
    host = "127.0.0.1"
    if variant == "mtls":
        extra["tls"] = pki.server_tls()
        host = "localhost"
        for key, value in pki.confluent_ssl("orders").items():
            client += ["--set", f"{key}={value}"]
    if variant == "authz":
        extra["authorization"] = {"rules": [
            {"principal": "*", "allow": ["All"], "topic": "*"},
            {"principal": "*", "allow": ["All"], "group": "*"},
            {"principal": "*", "allow": ["All"], "cluster": True},
        ]}
        extra["audit"] = {"path": str(logs / "audit.jsonl"), "sample_allows": 0.01}
    if variant == "encrypt":
        keyring = logs / "keyring.json"
        keyring.write_text(json.dumps({"keys": {"bench-kek": [base64.b64encode(os.urandom(32)).decode()]}}))
        top["kms"] = [{"name": "dev", "local": {"path": str(keyring)}}]
        extra["encryption"] = {"rules": [{"topic": "*", "kms": "dev", "kek": "bench-kek"}]}
    os.environ.setdefault("STRAIT_EDGE_RUST_LOG", "warn")
    vc = VirtualCluster("bench", [tansu.bootstrap], advertised_host=host, extra=extra)
    edge = Edge(logs, [vc], binary=edge_bin("release"), extra=top).start()
    return tansu, edge, ["--bootstrap", f"{host}:{vc.bootstrap_port}", *client]


def measure(variant: str, logs: Path, pki, connections: int, total: int, timeout: int) -> dict:
    tansu, edge, common = start(variant, logs, pki)
    topic = f"features-{variant}"
    try:
        run_loadgen(["produce", *common, "--topic", topic, "--count", "1", "--size", "1000",
                     "--create-partitions", "4"], timeout)
        cpu0 = proc_cpu_seconds(edge.proc.pid)
        share = total // connections
        start_time = time.monotonic()
        procs = [subprocess.Popen([loadgen_bin(), "produce", *common, "--topic", topic, "--count", str(share),
                                   "--size", "1000", "--inflight", "200", "--timeout-secs", str(timeout)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(connections)]
        for p in procs:
            out, err = p.communicate(timeout=timeout + 30)
            if p.returncode != 0:
                raise RuntimeError(f"{variant}: producer failed: {err[:1500]}")
        produce_secs = time.monotonic() - start_time
        produced = share * connections
        consume = run_loadgen(["consume", *common, "--topic", topic, "--count", str(produced + 1),
                               "--timeout-secs", str(timeout)], timeout + 30)
        latency = run_loadgen(["produce", *common, "--topic", topic, "--count", "2000", "--size", "1000",
                               "--inflight", "1", "--linger-ms", "0", "--timeout-secs", str(timeout)],
                              timeout + 30)
        cpu = proc_cpu_seconds(edge.proc.pid) - cpu0
        gigabytes = 2 * produced * 1000 / 1e9
        return {
            "variant": variant,
            "produce_rps": produced / produce_secs,
            "consume_rps": consume.get("records_per_s", 0.0),
            "p50_us": latency.get("p50_us"),
            "p99_us": latency.get("p99_us"),
            "cpu_s_per_gb": cpu / gigabytes,
        }
    finally:
        edge.terminate(timeout=15)
        tansu.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--records", type=int, default=128_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=180)
    args = parser.parse_args()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"strait-features-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    pki = standard_pki(logs / "pki")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        for variant in VARIANTS:  # interleaved, so drift in machine load hits every variant alike
            r = measure(variant, logs / f"{variant}-{rep}", pki, args.connections, args.records, args.timeout)
            results[variant].append(r)
            print(f"rep {rep + 1}/{args.reps} {variant:8} produce {r['produce_rps']:9.0f} rec/s  consume "
                  f"{r['consume_rps']:9.0f} rec/s  p50 {r['p50_us']} us  p99 {r['p99_us']} us  "
                  f"cpu {r['cpu_s_per_gb']:.2f} s/GB", flush=True)

    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else 0.0

    summary = {v: {k: median([r[k] for r in rs]) for k in rs[0] if k != "variant"} for v, rs in results.items()}
    base = summary["plain"]
    lines = [
        f"# Edge feature costs ({args.connections} producer connections, 1 KB records, medians of {args.reps})",
        "",
        "| edge | produce rec/s | vs plain | consume rec/s | vs plain | p50 µs | p99 µs | edge CPU s/GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        s = summary[v]
        lines.append(
            f"| {v} | {s['produce_rps']:.0f} | {100 * s['produce_rps'] / base['produce_rps']:.1f} % | "
            f"{s['consume_rps']:.0f} | {100 * s['consume_rps'] / max(base['consume_rps'], 1):.1f} % | "
            f"{s['p50_us']:.0f} | {s['p99_us']:.0f} | {s['cpu_s_per_gb']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "features.md").write_text(text)
    (HERE / "features.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
