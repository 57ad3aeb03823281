"""strait-edge command line: --check-config (every error with its path, exit codes), and the rule for
following the control plane without TLS."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lib.edge import EdgeBinaryMissing, edge_bin


@pytest.fixture
def binary():
    try:
        return edge_bin()
    except EdgeBinaryMissing as e:
        pytest.fail(str(e), pytrace=False)


def check(binary, tmp_path, cfg) -> subprocess.CompletedProcess:
    path = tmp_path / "edge.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return subprocess.run([binary, "--check-config", str(path)], capture_output=True, text=True, timeout=30)


VALID = {
    "admin": {"listen": "127.0.0.1:9901"},
    "virtual_clusters": [{
        "name": "local",
        "bootstrap": "127.0.0.1:19092",
        "brokers": {"advertised_host": "127.0.0.1", "port_range": "19100-19199"},
        "upstream": {"bootstrap_servers": ["127.0.0.1:9092"]},
    }],
    "limits": {"max_frame_bytes": 104857600},
}


def test_check_config_valid(binary, tmp_path):
    r = check(binary, tmp_path, VALID)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_quickstart_edge_config_is_valid(binary):
    """The README's quick start hands users examples/quickstart/edge.yaml: it must stay valid."""
    example = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "edge.yaml"
    r = subprocess.run([binary, "--check-config", str(example)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "configuration is valid" in r.stdout + r.stderr


def test_a_health_probe_reaches_one_member_directly_or_through_a_mesh_peer(binary, tmp_path):
    """health_probes (failover evidence) probe one member: its brokers, or a peer edge's virtual cluster
    (a standby behind a peer edge), which needs that peer in mesh.peers; a failover upstream is no
    member. Every error is reported with its path."""
    cfg = yaml.safe_load(yaml.safe_dump(VALID))
    cfg["health_probes"] = [
        {"group": "orders-dr", "cluster": "east", "interval": "0s",
         "upstream": {"remote": {"peer": "edge-east", "virtual_cluster": "orders"}}},
        {"group": "orders-dr", "cluster": "west",
         "upstream": {"bootstrap_servers": ["127.0.0.1:9092"],
                      "failover": {"group": "orders-dr", "cluster": "west", "generation": 0}}},
    ]
    r = check(binary, tmp_path, cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "health_probes[0].interval: must be at least 10ms" in out, out
    assert "health_probes[0].upstream.remote.peer: 'edge-east' is not a peer in mesh.peers" in out, out
    assert "health_probes[1].upstream.failover: a probe reaches one member" in out, out


def test_check_config_reports_every_error_with_path(binary, tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(VALID))
    bad["admin"]["listen"] = "not-an-address"
    bad["virtual_clusters"][0]["bootstrap"] = "nowhere"
    second = yaml.safe_load(yaml.safe_dump(VALID["virtual_clusters"][0]))
    second["name"] = "other"
    second["bootstrap"] = "127.0.0.1:29092"
    second["brokers"]["port_range"] = "29199-29100"
    bad["virtual_clusters"].append(second)
    r = check(binary, tmp_path, bad)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    for path in ("admin.listen", "virtual_clusters[0].bootstrap", "virtual_clusters[1].brokers.port_range"):
        assert path in out, f"{path!r} missing from:\n{out}"


def test_check_config_unknown_key(binary, tmp_path):
    bad = yaml.safe_load(yaml.safe_dump(VALID))
    bad["virtual_clusters"][0]["bootstrapp"] = "127.0.0.1:1"
    r = check(binary, tmp_path, bad)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "bootstrapp" in out


def test_check_config_not_yaml(binary, tmp_path):
    r = check(binary, tmp_path, "admin: [unclosed\n")
    assert r.returncode == 1, r.stdout + r.stderr


def run_edge(binary, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--cache-dir", str(tmp_path / "cache"), *args],
                          capture_output=True, text=True, timeout=30)


def test_control_plane_without_tls_needs_insecure_plaintext(binary, tmp_path):
    r = run_edge(binary, tmp_path, "--control", "127.0.0.1:7001", "--name", "e1")
    assert r.returncode != 0
    assert "strait-edge --control: no TLS configured; give the TLS flags, or --insecure-plaintext" in r.stderr


def test_insecure_plaintext_only_to_loopback(binary, tmp_path):
    r = run_edge(binary, tmp_path, "--control", "127.0.0.1:7001,10.9.9.9:7001", "--name", "e1",
                 "--insecure-plaintext")
    assert r.returncode != 0
    assert "only works when every address is loopback; not loopback: 10.9.9.9:7001" in r.stderr


def test_control_tls_needs_all_three_files(binary, tmp_path):
    r = run_edge(binary, tmp_path, "--control", "127.0.0.1:7001", "--name", "e1", "--control-ca", "ca.pem")
    assert r.returncode != 0
    assert "--control-cert" in r.stderr


def test_readme_benchmark_tables_are_generated_from_the_results_files():
    """The README's benchmark tables are integration/bench/readme.py's rendering of the results files
    that `make bench` and `make bench-features` write: a hand edit, or a results file without its
    table, fails here."""
    script = Path(__file__).resolve().parents[1] / "bench" / "readme.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
