#!/usr/bin/env python3
"""Builds and runs the libFuzzer targets of edge/fuzz (docs/fuzzing.md). Standard library only.

    scripts/fuzz.py build                      cargo fuzz build (stable, --sanitizer none, debug assertions)
    scripts/fuzz.py run [--runs N] [TARGET..]  long runs; records each in edge/fuzz/results.json
    scripts/fuzz.py smoke [--seconds S]        every target briefly, from the checked-in seeds (CI)
    scripts/fuzz.py report                     the results table of docs/fuzzing.md, from results.json
    scripts/fuzz.py text-seeds                 config and control-plane spec seeds (make fuzz-corpus)
    scripts/fuzz.py minimize [TARGET..]        keep only the seeds that add coverage (make fuzz-corpus)

Long runs keep their growing corpus in ~/.cache/strait/fuzz-corpus/<target> (the checked-in seeds in
edge/fuzz/corpus stay small) and write crashes to edge/fuzz/artifacts/<target>/.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "edge" / "fuzz"
CACHE = Path(os.environ.get("STRAIT_CACHE", Path.home() / ".cache" / "strait"))
TARGET_DIR = Path(os.environ.get("STRAIT_FUZZ_TARGET_DIR", CACHE / "target-fuzz"))
CARGO_FUZZ = CACHE / "tools" / "bin" / "cargo-fuzz"
RESULTS = FUZZ / "results.json"
DOC = ROOT / "docs" / "fuzzing.md"
TRIPLE = "x86_64-unknown-linux-gnu"
# The edge's memory bound applies to the fuzzed code as well: an input that makes it allocate more than
# this in one go (a count trusted before the bytes behind it were read) is a finding.
RSS_LIMIT_MB = 2048
MALLOC_LIMIT_MB = 512


def targets() -> list[str]:
    return sorted(p.stem for p in (FUZZ / "fuzz_targets").glob("*.rs"))


def env() -> dict:
    e = dict(os.environ, CARGO_TARGET_DIR=str(TARGET_DIR))
    e.setdefault("CARGO_BUILD_JOBS", "2")
    return e


def build() -> float:
    started = time.monotonic()
    subprocess.run([str(CARGO_FUZZ), "build", "--sanitizer", "none", "--debug-assertions",
                    "--fuzz-dir", str(FUZZ)], cwd=FUZZ, env=env(), check=True)
    return time.monotonic() - started


def binary(target: str) -> Path:
    return TARGET_DIR / TRIPLE / "release" / target


def run_one(target: str, runs: int | None, seconds: int | None, work: Path, artifacts: Path) -> dict:
    """One libFuzzer run; its executions from the final stats, its findings from the artifacts dir."""
    work.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    seeds = FUZZ / "corpus" / target
    argv = [str(binary(target)), str(work), *([str(seeds)] if seeds.is_dir() else []),
            f"-rss_limit_mb={RSS_LIMIT_MB}", f"-malloc_limit_mb={MALLOC_LIMIT_MB}", "-timeout=10",
            "-print_final_stats=1", f"-artifact_prefix={artifacts}/"]
    if runs is not None:
        argv.append(f"-runs={runs}")
    if seconds is not None:
        argv.append(f"-max_total_time={seconds}")
    started = time.monotonic()
    log = artifacts.parent / f"{target}.log"
    with open(log, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    text = log.read_text(errors="replace")
    executed = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    if executed:
        executions = int(executed[-1])
    else:
        # A run that died early prints no final stats: its last status line says how far it got.
        progress = re.findall(r"^#(\d+)\s", text, re.M)
        executions = int(progress[-1]) if progress else 0
    found = sorted(p.name for p in set(artifacts.iterdir()) - before)
    return {
        "target": target,
        "executions": executions,
        "seconds": round(time.monotonic() - started, 1),
        "crashes": len(found),
        "artifacts": found,
        "exit": proc.returncode,
        "corpus": sum(1 for _ in work.iterdir()),
        "log": str(log),
    }


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def stamp() -> dict:
    """When, what and where a run was built: taken before the build, so the commit is the fuzzed code's."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "rss_limit_mb": RSS_LIMIT_MB,
        "malloc_limit_mb": MALLOC_LIMIT_MB,
    }


def record(results: list[dict], built: dict) -> None:
    """Adds the runs to results.json: per target the latest run and every earlier one, with when and where."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"targets": {}}
    for r in results:
        entry = {k: r[k] for k in ("executions", "seconds", "crashes", "artifacts", "exit")} | built
        data["targets"].setdefault(r["target"], {"runs": []})["runs"].append(entry)
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run(args) -> int:
    chosen = args.targets or targets()
    built = stamp()
    if not args.no_build:
        build()
    out = CACHE / "fuzz-runs"

    def one(t: str) -> dict:
        r = run_one(t, args.runs, args.seconds, CACHE / "fuzz-corpus" / t, FUZZ / "artifacts" / t)
        print(f"[fuzz] {t}: {r['executions']:,} executions in {r['seconds']} s, {r['crashes']} findings"
              f" (exit {r['exit']}; log {r['log']})", flush=True)
        return r

    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, chosen))
    record(results, built)
    report(None)
    return 1 if any(r["crashes"] or r["exit"] for r in results) else 0


def smoke(args) -> int:
    """Every target for a short while from the checked-in seeds; nothing is kept but the findings."""
    started = time.monotonic()
    if not args.no_build:
        print(f"[fuzz-smoke] build: {build():.0f} s", flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="strait-fuzz-smoke-") as tmp:
        for t in targets():
            r = run_one(t, args.runs, args.seconds, Path(tmp) / "corpus" / t, Path(tmp) / "artifacts" / t)
            print(f"[fuzz-smoke] {t}: {r['executions']:,} executions in {r['seconds']} s,"
                  f" {r['crashes']} findings", flush=True)
            if r["crashes"] or r["exit"]:
                keep = FUZZ / "artifacts" / t
                keep.mkdir(parents=True, exist_ok=True)
                for name in r["artifacts"]:
                    shutil.copy(Path(tmp) / "artifacts" / t / name, keep / name)
                print(Path(r["log"]).read_text(errors="replace")[-4000:], file=sys.stderr)
                failed.append(t)
    print(f"[fuzz-smoke] {len(targets())} targets in {time.monotonic() - started:.0f} s"
          f"{'; FAILED: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


BEGIN, END = "<!-- fuzz-results:begin -->", "<!-- fuzz-results:end -->"


def report(_args) -> int:
    """Rewrites the table between the markers of docs/fuzzing.md from results.json."""
    if not RESULTS.exists() or not DOC.exists():
        return 0
    data = json.loads(RESULTS.read_text())
    rows = ["| target | latest run: executions | findings | date | commit | all runs: executions | findings |",
            "|---|---:|---:|---|---|---:|---:|"]
    for target in sorted(data["targets"]):
        runs = data["targets"][target]["runs"]
        last = runs[-1]
        commit = last["commit"] + (" (+ local changes)" if last.get("dirty") else "")
        rows.append(f"| `{target}` | {last['executions']:,} | {last['crashes']} | {last['date'][:10]} | {commit}"
                    f" | {sum(r['executions'] for r in runs):,} | {sum(r['crashes'] for r in runs)} |")
    machines = sorted({r["machine"] for t in data["targets"].values() for r in t["runs"]})
    rows.append("")
    rows.append(f"Limits: `-rss_limit_mb={RSS_LIMIT_MB} -malloc_limit_mb={MALLOC_LIMIT_MB} -timeout=10`. "
                f"Machines: {'; '.join(machines)}.")
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + "\n".join(rows) + "\n" + text[end:])
    return 0


def text_seeds(_args) -> int:
    """Edge configs (examples, and the YAML the Rust tests write) and control-plane specs as JSON lines."""
    import hashlib

    def put(target: str, text: str) -> None:
        data = text.encode()
        if not data.strip() or len(data) > 16 * 1024:
            return
        out = FUZZ / "corpus" / target
        out.mkdir(parents=True, exist_ok=True)
        (out / f"text-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)

    # Edge configs: example files, and every raw-string YAML literal in the edge's Rust tests.
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        if "virtual_clusters:" in path.read_text():
            put("edge_config", path.read_text())
    literal = re.compile(r'r#"(.*?)"#', re.S)
    for path in sorted((ROOT / "edge").rglob("*.rs")):
        if "third_party" in path.parts or "fuzz" in path.parts:
            continue
        for text in literal.findall(path.read_text()):
            if "virtual_clusters:" in text or "upstream:" in text:
                put("edge_config", text)

    # Control-plane specs: the manifests of examples and tests, as the JSON lines control_spec reads.
    import yaml  # PyYAML, in the integration venv (make fuzz-corpus runs this with it)
    documents = []
    sources = sorted((ROOT / "examples").rglob("*.yaml")) + sorted((ROOT / "integration").rglob("*.py"))
    for path in sources:
        text = path.read_text()
        chunks = [text] if path.suffix == ".yaml" else re.findall(r'"""(.*?)"""', text, re.S)
        for chunk in chunks:
            if "kind:" not in chunk or "spec:" not in chunk:
                continue
            try:
                docs = [d for d in yaml.safe_load_all(chunk) if isinstance(d, dict) and "kind" in d]
            except yaml.YAMLError:
                continue
            documents.extend(docs)
            if docs:
                put("control_spec", "\n".join(json.dumps(d, default=str) for d in docs) + "\n")
    # Each kind's first document alone, then every other command shape Raft stores.
    seen = set()
    for d in documents:
        if d["kind"] not in seen:
            seen.add(d["kind"])
            put("control_spec", json.dumps(d, default=str) + "\n")
    first = documents[0] if documents else {"kind": "KafkaCluster", "name": "local"}
    commands = [
        {"Delete": {"kind": first["kind"], "name": first["name"], "expected_revision": 1}},
        {"UpdateStatus": {"kind": first["kind"], "name": first["name"], "status": {"ready": True}}},
        {"Failover": {"group": "payments", "to": "west", "expected_generation": 0, "planned": True,
                      "failback": False, "reason": "drill", "by": "admin", "at_unix_ms": 1795334400000,
                      "fence": "switch"}},
        "Noop",
    ]
    put("control_spec", "\n".join([json.dumps(d, default=str) for d in documents[:6]]
                                  + [json.dumps(c) for c in commands]) + "\n")
    return 0


def minimize(args) -> int:
    """Keeps only the seeds that add coverage (libFuzzer's -merge), per target."""
    if not args.no_build:
        build()
    for t in args.targets or targets():
        seeds = FUZZ / "corpus" / t
        if not seeds.is_dir():
            continue
        with tempfile.TemporaryDirectory(prefix=f"strait-fuzz-merge-{t}-") as tmp:
            subprocess.run([str(binary(t)), "-merge=1", f"-rss_limit_mb={RSS_LIMIT_MB}",
                            f"-malloc_limit_mb={MALLOC_LIMIT_MB}", tmp, str(seeds)],
                           check=True, capture_output=True)
            before = sum(1 for _ in seeds.iterdir())
            shutil.rmtree(seeds)
            shutil.copytree(tmp, seeds)
        size = sum(p.stat().st_size for p in seeds.iterdir())
        print(f"[fuzz-minimize] {t}: {before} -> {sum(1 for _ in seeds.iterdir())} seeds, {size:,} bytes")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build")
    p = sub.add_parser("run")
    p.add_argument("--runs", type=int, default=None, help="executions per target (default 10,000,000)")
    p.add_argument("--seconds", type=int, default=None, help="stop each target after this long at most")
    p.add_argument("--jobs", type=int, default=1, help="targets run at once (one core each)")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("targets", nargs="*")
    p = sub.add_parser("smoke")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--runs", type=int, default=500_000)
    p.add_argument("--no-build", action="store_true")
    sub.add_parser("report")
    sub.add_parser("text-seeds")
    p = sub.add_parser("minimize")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("targets", nargs="*")
    args = parser.parse_args()
    if args.command == "build":
        print(f"[fuzz] build: {build():.0f} s")
        return 0
    if args.command == "run" and args.runs is None and args.seconds is None:
        args.runs = 10_000_000
    commands = {"run": run, "smoke": smoke, "report": report, "text-seeds": text_seeds, "minimize": minimize}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
