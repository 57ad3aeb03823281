#!/usr/bin/env python3
"""What federation (issue 13) costs: bytes per record at rest, encrypting-edge throughput with two realms
against one, and KMS calls per million records at each site.

Everything is real: one single-node Apache Kafka, OpenBao (realm `vault-east`, makes the DEKs) and moto
(realm `aws-west`), release strait-edge binaries, strait-loadgen (rdkafka) for load.

1. Overhead at rest. The same records (2,000 per run; 100 B and 1 KiB values; uncompressed random values,
   and zstd-compressed text-like values) are produced by the same librdkafka producer straight to Kafka,
   through an edge encrypting for one realm (format v2) and through one encrypting for two (v3: every DEK
   also wrapped for aws-west, in the keys topic). What Kafka stores is the size of the partition's log
   segments; overhead per record = (encrypted - plaintext) / records.
2. Throughput. 1 KB records from several producer connections through the one-realm and the two-realm
   edge, rounds interleaved, medians with their spread; then one consumer each (decryption).
3. KMS calls. Every KMS call the producing edge made against the records it encrypted, and those of a
   cold "west" edge (aws-west only) that consumes the two-realm topic through the keys topic.

Run with `make bench-federation`; writes integration/bench/federation.json and federation.md and the
federation block of docs/benchmarks.md.
"""

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lib.edge import Edge, VirtualCluster, edge_bin  # noqa: E402
from lib.kafka import KafkaCluster  # noqa: E402
from lib.kms import AWS_DUMMY_ENV, ROOT_TOKEN, Moto, OpenBao  # noqa: E402
from lib.wait import wait_for  # noqa: E402
from run import run_loadgen  # noqa: E402

KEK = "kek-bench"
SIZES = [100, 1024]
CODECS = ["none", "zstd"]


def values(size: int, codec: str, n: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    if codec == "none":
        return [rnd.randbytes(size) for _ in range(n)]
    # Text-like (what compression is for): JSON-ish fields with varying numbers.
    out = []
    for i in range(n):
        s = (f'{{"order":{i},"customer":"c-{rnd.randrange(10**6)}","amount":{rnd.randrange(10**5)},'
             f'"currency":"EUR","note":"')
        body = (s + "lorem ipsum dolor sit amet " * (size // 20 + 1))[: size - 2] + '"}'
        out.append(body.encode())
    return out


def stored_bytes(kafka: KafkaCluster, topic: str) -> int:
    d = kafka.nodes[0].data_dir / f"{topic}-0"
    return sum(p.stat().st_size for p in d.glob("*.log"))


def produce(bootstrap: str, topic: str, vals: list[bytes], codec: str) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)], operation_timeout=30)[topic].result(timeout=30)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 200, "batch.num.messages": 500,
                  "batch.size": 4 << 20, "compression.type": codec, "enable.idempotence": True})
    errors = []
    for i, v in enumerate(vals):
        p.produce(topic, key=b"k%06d" % i, value=v, timestamp=1_700_000_000_000 + i,
                  on_delivery=lambda err, _m: err and errors.append(err))
        p.poll(0)
    assert p.flush(60) == 0 and not errors, errors[:3]


def encrypting_edge(logs: Path, kafka, bao, moto, realms: int, name: str) -> Edge:
    rule = {"topic": "*", "kms": "vault-east", "kek": KEK}
    if realms == 2:
        rule["also_wrap_for"] = [{"kms": "aws-west", "kek": f"alias/{KEK}"}]
    vc = VirtualCluster(name, kafka.bootstrap_servers, extra={"encryption": {"rules": [rule]}})
    kms = [bao.kms_entry("vault-east"), moto.kms_entry("aws-west")]
    return Edge(logs, [vc], binary=edge_bin("release"), extra={"kms": kms}).start()


def west_edge(logs: Path, kafka, moto) -> Edge:
    """Reads records of vault-east's DEKs through aws-west only (its wraps from the keys topic)."""
    rule = {"topic": "*", "kms": "aws-west", "kek": f"alias/{KEK}"}
    vc = VirtualCluster("west", kafka.bootstrap_servers,
                        extra={"encryption": {"rules": [rule], "keys_topic": {}}})
    return Edge(logs, [vc], binary=edge_bin("release"), extra={"kms": [moto.kms_entry("aws-west")]}).start()


def overhead(kafka, one: Edge, two: Edge, records: int) -> list[dict]:
    rows = []
    for size in SIZES:
        for codec in CODECS:
            vals = values(size, codec, records, seed=size)
            sizes = {}
            for variant, bootstrap in (("plain", kafka.bootstrap), ("one", one.bootstrap),
                                       ("two", two.bootstrap)):
                topic = f"overhead-{variant}-{size}-{codec}"
                produce(bootstrap, topic, vals, codec)
                sizes[variant] = stored_bytes(kafka, topic)
            one_o = (sizes["one"] - sizes["plain"]) / records
            two_o = (sizes["two"] - sizes["plain"]) / records
            rows.append({"size": size, "codec": codec, "records": records,
                         "plain_bytes_per_record": sizes["plain"] / records,
                         "one_realm_overhead": one_o, "two_realm_overhead": two_o,
                         "ratio": two_o / one_o if one_o else None})
            print(f"{size:5} B {codec:5}: plain {sizes['plain'] / records:7.1f} B/rec, overhead one realm "
                  f"{one_o:6.1f} B, two realms {two_o:6.1f} B ({two_o / one_o:.3f}x)", flush=True)
    return rows


def throughput(one: Edge, two: Edge, records: int, connections: int, reps: int, timeout: int) -> dict:
    out: dict = {"one": [], "two": []}
    for rep in range(reps):
        for variant, e in (("one", one), ("two", two)):  # interleaved: machine drift hits both alike
            topic = f"tput-{variant}-{rep}"
            common = ["--bootstrap", e.bootstrap, "--topic", topic]
            run_loadgen(["produce", *common, "--count", "1", "--size", "1000", "--create-partitions", "4"],
                        timeout)
            share = records // connections
            import subprocess
            from run import loadgen_bin
            procs = [subprocess.Popen([loadgen_bin(), "produce", *common, "--count", str(share), "--size", "1000",
                                       "--inflight", "200", "--timeout-secs", str(timeout)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(connections)]
            reports = []
            for p in procs:
                o, err = p.communicate(timeout=timeout + 30)
                if p.returncode != 0:
                    raise RuntimeError(f"{variant}: producer failed: {err[:1500]}")
                reports.append(json.loads(o.strip().splitlines()[-1]))
            secs = max(r["finished_at"] for r in reports) - min(r["started_at"] for r in reports)
            consume = run_loadgen(["consume", *common, "--count", str(share * connections + 1),
                                   "--timeout-secs", str(timeout)], timeout + 30)
            sample = {"produce_rps": share * connections / secs, "consume_rps": consume.get("records_per_s", 0.0)}
            out[variant].append(sample)
            print(f"rep {rep + 1}/{reps} {variant}: produce {sample['produce_rps']:9.0f} rec/s, consume "
                  f"{sample['consume_rps']:9.0f} rec/s", flush=True)
    return out


def median_spread(xs: list[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    return s[len(s) // 2], s[0], s[-1]


def west_calls(kafka, logs: Path, moto, topics: list[str], records: int, timeout: int) -> dict:
    west = west_edge(logs, kafka, moto)
    try:
        for t in topics:
            run_loadgen(["consume", "--bootstrap", west.bootstrap, "--topic", t, "--count", str(records),
                         "--timeout-secs", str(timeout)], timeout + 30)
        return {"kms_calls": west.metric("strait_encryption_kms_calls"),
                "decrypted": west.metric("strait_encryption_decrypted_records")}
    finally:
        west.terminate(timeout=15)


def markdown(result: dict) -> str:
    lines = ["# Federation costs (issue 13)", "",
             f"Stored bytes per record in Kafka's log segments, {result['overhead'][0]['records']} records per "
             "run, one librdkafka producer (linger 200 ms), one partition. Overhead = encrypted minus "
             "plaintext; one realm = format v2 (vault-east), two realms = format v3 (every DEK also "
             "wrapped for aws-west, in the keys topic, not the record).", "",
             "| value | codec | plaintext B/record | overhead, one realm | overhead, two realms | two / one |",
             "|---|---|---|---|---|---|"]
    for r in result["overhead"]:
        lines.append(f"| {r['size']} B | {r['codec']} | {r['plain_bytes_per_record']:.1f} | "
                     f"{r['one_realm_overhead']:.1f} B | {r['two_realm_overhead']:.1f} B | {r['ratio']:.3f}x |")
    t = result["throughput"]
    p1, p1lo, p1hi = median_spread([s["produce_rps"] for s in t["one"]])
    p2, p2lo, p2hi = median_spread([s["produce_rps"] for s in t["two"]])
    c1, c1lo, c1hi = median_spread([s["consume_rps"] for s in t["one"]])
    c2, c2lo, c2hi = median_spread([s["consume_rps"] for s in t["two"]])
    lines += ["", f"Encrypting edge throughput, 1 KB records, {result['connections']} producer connections, "
                  f"{result['records']} records per round, medians of {len(t['one'])} interleaved rounds "
                  "(min-max):", "",
              "| | one realm rec/s | two realms rec/s | two / one |", "|---|---|---|---|",
              f"| produce | {p1:.0f} ({p1lo:.0f}-{p1hi:.0f}) | {p2:.0f} ({p2lo:.0f}-{p2hi:.0f}) | "
              f"{100 * p2 / p1:.1f} % |",
              f"| consume (decrypt) | {c1:.0f} ({c1lo:.0f}-{c1hi:.0f}) | {c2:.0f} ({c2lo:.0f}-{c2hi:.0f}) | "
              f"{100 * c2 / c1:.1f} % |"]
    k = result["kms"]
    lines += ["", "KMS calls for the whole run (alias resolutions, DEK generations, wraps for the other "
                  "realm, unwraps):", "",
              "| site | KMS calls | record values | per million |", "|---|---|---|---|"]
    for site in ("east, one realm", "east, two realms", "west (aws-west only, cold)"):
        s = k[site]
        lines.append(f"| {site} | {s['kms_calls']:.0f} | {s['records']:.0f} | "
                     f"{1e6 * s['kms_calls'] / max(s['records'], 1):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--overhead-records", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=180)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one round, nothing written")
    args = parser.parse_args()
    if args.smoke:
        args.records, args.overhead_records, args.connections, args.reps = 2000, 200, 2, 1
    os.environ.setdefault("STRAIT_EDGE_RUST_LOG", "warn")
    os.environ["VAULT_TOKEN"] = ROOT_TOKEN
    os.environ.update(AWS_DUMMY_ENV)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"strait-federation-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    kafka = KafkaCluster(logs, brokers=1, name="kafka-federation").start()
    bao, moto = OpenBao(logs).start(), Moto(logs).start()
    bao.create_key(KEK)
    moto.create_key(KEK)
    one = encrypting_edge(logs, kafka, bao, moto, 1, "one")
    two = encrypting_edge(logs, kafka, bao, moto, 2, "two")
    try:
        result = {"date": time.strftime("%Y-%m-%d"), "records": args.records, "connections": args.connections}
        result["overhead"] = overhead(kafka, one, two, args.overhead_records)
        result["throughput"] = throughput(one, two, args.records, args.connections, args.reps, args.timeout)
        wait_for(lambda: two.metric("strait_encryption_federation_pending_wraps", realm="aws-west") == 0, 60,
                 what="every DEK of the two-realm edge wrapped for aws-west")
        kms = {}
        for site, e in (("east, one realm", one), ("east, two realms", two)):
            # Wraps for the other realm are counted apart from the edge's own realm's calls.
            kms[site] = {"kms_calls": e.metric("strait_encryption_kms_calls")
                         + e.metric("strait_encryption_federation_wraps"),
                         "records": e.metric("strait_encryption_encrypted_records")
                         + e.metric("strait_encryption_decrypted_records")}
        two_topics = [f"tput-two-{rep}" for rep in range(args.reps)]
        w = west_calls(kafka, logs, moto, two_topics, (args.records // args.connections) * args.connections,
                       args.timeout)
        kms["west (aws-west only, cold)"] = {"kms_calls": w["kms_calls"], "records": w["decrypted"]}
        result["kms"] = kms
    finally:
        for e in (one, two):
            e.terminate(timeout=15)
        bao.stop()
        moto.stop()
        kafka.stop()
    text = markdown(result)
    print(text)
    if args.smoke:
        return 0
    (HERE / "federation.json").write_text(json.dumps(result, indent=2))
    (HERE / "federation.md").write_text(text)
    bench_doc = ROOT / "docs" / "benchmarks.md"
    doc = bench_doc.read_text()
    block = f"<!-- federation:begin -->\n{text}<!-- federation:end -->"
    if "<!-- federation:begin -->" in doc:
        doc = re.sub(r"<!-- federation:begin -->.*<!-- federation:end -->", lambda _m: block, doc, flags=re.S)
    else:
        doc += "\n## Federation (issue 13)\n\n`make bench-federation` (integration/bench/federation.py).\n\n" + block + "\n"
    bench_doc.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
