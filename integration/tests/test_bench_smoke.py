"""The comparison benchmark's smoke run (integration/bench/compare.py --smoke), as CI runs it.

One round at 1 KB / one connection, both variants, every target: direct, strait-edge, Kroxylicious,
socat, and strait-edge and Kroxylicious encrypting with OpenBao. compare.py itself fails on any lost
record or on plaintext at rest; this test also checks the results file it wrote. Needs what
scripts/setup.sh installs (Kafka and Kroxylicious jars, OpenBao, socat) and the workspace build
(debug binaries, as `make test` builds them; STRAIT_BENCH_PROFILE=release for release ones).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPARE = Path(__file__).resolve().parents[1] / "bench" / "compare.py"


@pytest.mark.timeout(900)
def test_compare_smoke_every_target_delivers_and_encrypts(tmp_path):
    out = tmp_path / "compare.json"
    env = dict(os.environ, STRAIT_BENCH_LOGS=str(tmp_path))
    profile = os.environ.get("STRAIT_BENCH_PROFILE", "debug")
    r = subprocess.run([sys.executable, str(COMPARE), "--smoke", "--profile", profile, "--json", str(out)],
                       capture_output=True, text=True, timeout=840, env=env)
    assert r.returncode == 0, f"compare.py --smoke failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"

    result = json.loads(out.read_text())
    samples = result["samples"]
    seen = {(s["target"], s["variant"]) for s in samples}
    assert seen == {("direct", "passthrough"), ("strait-edge", "passthrough"), ("kroxylicious", "passthrough"),
                    ("socat", "passthrough"), ("strait-edge", "encryption"), ("kroxylicious", "encryption")}
    for s in samples:
        label = f"{s['target']}/{s['variant']}"
        assert "error" not in s, f"{label}: {s.get('error')}"
        assert s["produced"] == s["count"], f"{label}: {s['produced']} of {s['count']} acknowledged"
        assert s["stored"] == s["count"], f"{label}: {s['stored']} of {s['count']} stored at the broker"
        assert s["consumed"] == s["count"], f"{label}: {s['consumed']} of {s['count']} consumed back"
        at_rest = s["at_rest"]
        if s["variant"] == "encryption":
            assert at_rest["ciphertext"] == at_rest["sampled"] > 0, f"{label}: plaintext at rest: {at_rest}"
        else:
            assert at_rest["plaintext"] == at_rest["sampled"] > 0, f"{label}: records altered: {at_rest}"
        if s["target"] != "direct":
            assert s["cpu_s_per_gb"] and s["cpu_s_per_gb"] > 0, f"{label}: no proxy CPU measured"
    md = out.with_suffix(".md").read_text()
    assert "| 1000 B | 1 | encryption | kroxylicious |" in md
    assert result["meta"]["kroxylicious_version"] in md


@pytest.mark.timeout(600)
def test_mesh_benchmark_smoke_runs_every_path():
    """integration/bench/mesh.py --smoke: quic, tls-tcp and direct paths each deliver every record."""
    mesh = Path(__file__).resolve().parents[1] / "bench" / "mesh.py"
    r = subprocess.run([sys.executable, str(mesh), "--smoke"], capture_output=True, text=True, timeout=540,
                       env=dict(os.environ, RUST_BACKTRACE="0"))
    assert r.returncode == 0, f"mesh.py --smoke failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "[bench-mesh] smoke OK: quic" in r.stdout
    assert "tls-tcp" in r.stdout and "direct" in r.stdout
