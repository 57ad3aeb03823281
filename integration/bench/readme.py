#!/usr/bin/env python3
"""Writes the README's benchmark tables from the results files, so no figure there is copied by hand:

- `make bench` → integration/bench/results.json → the "through" table;
- `make bench-features` → integration/bench/features.json → the "edge" table.

Each table is the block between `<!-- generated: NAME begin ... -->` and `<!-- generated: NAME end -->`.
Headline figures are medians over the run's interleaved repetitions; the range after them is the lowest
and highest repetition. `--check` exits 1 when the README differs from what the files give (CI runs it).
"""

import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
FEATURE_NAMES = {"plain": "plain", "mtls": "mTLS", "authz": "authz + audit", "encrypt": "encrypt (local KMS)"}


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def spread(ratios: list[float]) -> str:
    return f"{pct(statistics.median(ratios))} ({100 * min(ratios):.0f}–{100 * max(ratios):.0f})"


def results_table(doc: dict) -> str:
    rows = {(r["target"], r["size"]): r for r in doc["rows"]}
    sizes = sorted({size for _, size in rows})
    lines = [f"From `make bench`, {doc['environment']}. Medians of each row's repetitions, with the "
             "lowest and highest repetition in brackets:", "",
             "| through | produce vs direct (100 B / 1 KB) | consume vs direct | added p50 | CPU s/GB (100 B / 1 KB) |",
             "|---|---|---|---|---|"]
    for target in [t for t in dict.fromkeys(t for t, _ in rows) if t != "direct"]:
        cells = {"produce": [], "consume": [], "p50": [], "cpu": []}
        for size in sizes:
            row, base = rows[(target, size)], rows[("direct", size)]
            pairs = list(zip(row["samples"], base["samples"]))
            for key, out in (("produce_rps", "produce"), ("consume_rps", "consume")):
                cells[out].append(spread([s[key] / b[key] for s, b in pairs]))
            cells["p50"].append(f"{row['p50_us'] - base['p50_us']:+d}")
            cells["cpu"].append("n/a" if row["cpu_s_per_gb"] is None else f"{row['cpu_s_per_gb']:.2f}")
        lines.append(f"| {target} | {' / '.join(cells['produce'])} | {' / '.join(cells['consume'])} | "
                     f"{' / '.join(cells['p50'])} µs | {' / '.join(cells['cpu'])} |")
    return "\n".join(lines) + "\n"


def features_table(doc: dict) -> str:
    # Files written before the environment was recorded hold only the per-variant repetitions.
    results = doc.get("results", doc)
    environment = doc.get("environment", "date, commit and machine not recorded (written before they were)")
    reps = {len(v) for v in results.values()}
    med = {v: {k: statistics.median([r[k] for r in rs]) for k in rs[0] if k != "variant"}
           for v, rs in results.items()}
    base = med["plain"]
    lines = [f"From `make bench-features`, {environment}. Medians of {'/'.join(map(str, sorted(reps)))} "
             "repetitions; produce rate with its lowest and highest repetition:", "",
             "| edge | produce rec/s | vs plain | consume rec/s | vs plain | p50 µs | p99 µs | edge CPU s/GB "
             "| minimal client vs plain | its edge CPU s/GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, rs in results.items():
        m = med[v]
        produce = [r["produce_rps"] for r in rs]
        lines.append(
            f"| {FEATURE_NAMES.get(v, v)} | {m['produce_rps']:,.0f} ({min(produce):,.0f}–{max(produce):,.0f}) | "
            f"{pct(m['produce_rps'] / base['produce_rps'])} | {m['consume_rps']:,.0f} | "
            f"{pct(m['consume_rps'] / base['consume_rps'])} | {m['p50_us']:.0f} | {m['p99_us']:.0f} | "
            f"{m['cpu_s_per_gb']:.2f} | {pct(m['raw_produce_rps'] / base['raw_produce_rps'])} | "
            f"{m['raw_cpu_s_per_gb']:.2f} |")
    return "\n".join(lines) + "\n"


BLOCKS = {"bench-results": ("results.json", results_table), "bench-features": ("features.json", features_table)}


def render(readme: str) -> str:
    for name, (file, table) in BLOCKS.items():
        begin = f"<!-- generated: {name} begin (integration/bench/readme.py from integration/bench/{file}) -->"
        end = f"<!-- generated: {name} end -->"
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no block {begin!r}")
        text = table(json.loads((HERE / file).read_text()))
        readme = pattern.sub(lambda _m: f"{begin}\n{text}{end}", readme)
    return readme


def main() -> int:
    current = README.read_text()
    wanted = render(current)
    if "--check" in sys.argv[1:]:
        if wanted != current:
            print("README.md benchmark tables differ from integration/bench/*.json: run integration/bench/readme.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
