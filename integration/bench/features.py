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
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lib.edge import Edge, VirtualCluster, edge_bin  # noqa: E402
from lib.pki import SPIFFE_ORDERS, standard_pki  # noqa: E402
from lib.tansu import Tansu  # noqa: E402
from run import loadgen_bin, proc_cpu_seconds, run_loadgen  # noqa: E402

VARIANTS = ["plain", "mtls", "authz", "encrypt"]


def raw_tls_args(variant: str, pki) -> list[str]:
    if variant != "mtls":
        return []
    ssl = pki.confluent_ssl("orders")
    return ["--ca", ssl["ssl.ca.location"], "--cert", ssl["ssl.certificate.location"],
            "--key", ssl["ssl.key.location"]]


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
        procs = [subprocess.Popen([loadgen_bin(), "produce", *common, "--topic", topic, "--count", str(share),
                                   "--size", "1000", "--inflight", "200", "--timeout-secs", str(timeout)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(connections)]
        reports = []
        for p in procs:
            out, err = p.communicate(timeout=timeout + 30)
            if p.returncode != 0:
                raise RuntimeError(f"{variant}: producer failed: {err[:1500]}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
        # From the first producer's first send to the last one's last delivery report: process
        # start-up is not the edge's cost.
        produce_secs = max(r["finished_at"] for r in reports) - min(r["started_at"] for r in reports)
        produced = share * connections
        consume = run_loadgen(["consume", *common, "--topic", topic, "--count", str(produced + 1),
                               "--timeout-secs", str(timeout)], timeout + 30)
        latency = run_loadgen(["produce", *common, "--topic", topic, "--count", "2000", "--size", "1000",
                               "--inflight", "1", "--linger-ms", "0", "--timeout-secs", str(timeout)],
                              timeout + 30)
        cpu = proc_cpu_seconds(edge.proc.pid) - cpu0
        gigabytes = 2 * produced * 1000 / 1e9
        # The same load from the minimal client (one TLS record per request, like the Java client;
        # librdkafka writes one TLS record per buffer slice): what the edge costs when the clients
        # do not dominate the machine. Its own topic, after the librdkafka runs.
        raw_topic = f"features-raw-{variant}"
        run_loadgen(["produce", *common, "--topic", raw_topic, "--count", "1", "--size", "1000",
                     "--create-partitions", "4"], timeout)
        raw_cpu0 = proc_cpu_seconds(edge.proc.pid)
        raw = run_loadgen(["raw-produce", "--bootstrap", common[1], "--topic", raw_topic,
                           "--count", str(total), "--size", "1000", "--connections", str(connections),
                           "--inflight", "1", "--batch-bytes", "65536", "--timeout-secs", str(timeout),
                           *raw_tls_args(variant, pki)], timeout + 30)
        raw_cpu = proc_cpu_seconds(edge.proc.pid) - raw_cpu0
        # Every KMS call the edge made in the whole run (topic creation and warm-up included), against
        # every record value it encrypted or decrypted.
        kms_calls = edge.metric("strait_encryption_kms_calls")
        crypto_records = (edge.metric("strait_encryption_encrypted_records")
                          + edge.metric("strait_encryption_decrypted_records"))
        return {
            "variant": variant,
            "produce_rps": produced / produce_secs,
            "consume_rps": consume.get("records_per_s", 0.0),
            "p50_us": latency.get("p50_us"),
            "p99_us": latency.get("p99_us"),
            "cpu_s_per_gb": cpu / gigabytes,
            "raw_produce_rps": raw["records_per_s"],
            "raw_p50_us": raw["p50_us"],
            "raw_cpu_s_per_gb": raw_cpu / (2 * raw["records"] * 1000 / 1e9),
            "kms_calls": kms_calls,
            "crypto_records": crypto_records,
        }
    finally:
        edge.terminate(timeout=15)
        tansu.stop()


def environment() -> str:
    """When, on what and from which commit: every results file says so."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip() or "unknown"
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit}, {os.cpu_count()} CPUs "
            f"({platform.machine()}), {platform.system()} {platform.release()}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--records", type=int, default=640_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=180)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ",".join(VARIANTS) + " (plain is always included)")
    parser.add_argument("--out", default="features",
                        help="report name: writes integration/bench/OUT.md and OUT.json")
    args = parser.parse_args()
    variants = [v for v in VARIANTS if v == "plain" or v in args.variants.split(",")]
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"strait-features-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    pki = standard_pki(logs / "pki")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for variant in variants:  # interleaved, so drift in machine load hits every variant alike
            r = measure(variant, logs / f"{variant}-{rep}", pki, args.connections, args.records, args.timeout)
            results[variant].append(r)
            print(f"rep {rep + 1}/{args.reps} {variant:8} produce {r['produce_rps']:9.0f} rec/s  consume "
                  f"{r['consume_rps']:9.0f} rec/s  p50 {r['p50_us']} us  p99 {r['p99_us']} us  "
                  f"cpu {r['cpu_s_per_gb']:.2f} s/GB  kms calls {r['kms_calls']:.0f}  | raw produce "
                  f"{r['raw_produce_rps']:9.0f} rec/s  cpu {r['raw_cpu_s_per_gb']:.2f} s/GB", flush=True)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else 0.0

    summary = {v: {k: median([r[k] for r in rs]) for k in rs[0] if k != "variant"} for v, rs in results.items()}
    env = environment()
    base = summary["plain"]
    lines = [
        f"# Edge feature costs ({args.connections} producer connections, 1 KB records, medians of {args.reps})",
        "",
        f"Generated by `make bench-features` (integration/bench/features.py): {env}.",
        "",
        "| edge | produce rec/s (min–max) | vs plain | consume rec/s | vs plain | p50 µs | p99 µs | edge CPU s/GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        s = summary[v]
        spread = [r["produce_rps"] for r in results[v]]
        lines.append(
            f"| {v} | {s['produce_rps']:.0f} ({min(spread):.0f}–{max(spread):.0f}) | "
            f"{100 * s['produce_rps'] / base['produce_rps']:.1f} % | "
            f"{s['consume_rps']:.0f} | {100 * s['consume_rps'] / max(base['consume_rps'], 1):.1f} % | "
            f"{s['p50_us']:.0f} | {s['p99_us']:.0f} | {s['cpu_s_per_gb']:.2f} |")
    lines += [
        "",
        f"Minimal client (`strait-loadgen raw-produce`: {args.connections} connections, 64 KiB requests, one in "
        "flight each, whole requests per TLS record):",
        "",
        "| edge | produce rec/s | vs plain | request p50 µs | edge CPU s/GB |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        s = summary[v]
        lines.append(
            f"| {v} | {s['raw_produce_rps']:.0f} | {100 * s['raw_produce_rps'] / base['raw_produce_rps']:.1f} % | "
            f"{s['raw_p50_us']:.0f} | {s['raw_cpu_s_per_gb']:.2f} |")
    if "encrypt" in results:
        calls = sum(r["kms_calls"] for r in results["encrypt"])
        records = sum(r["crypto_records"] for r in results["encrypt"])
        lines += ["", f"Encrypting edge: {calls:.0f} KMS calls for {records:.0f} record values encrypted or "
                      f"decrypted ({1e6 * calls / max(records, 1):.2f} per million records)."]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / f"{args.out}.md").write_text(text)
    (HERE / f"{args.out}.json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
