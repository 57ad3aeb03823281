"""The strait-edge binary under test: config writer, process, admin endpoint, log checks."""

import os
import re
import signal
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .ports import free_port, free_range
from .procs import Proc
from .wait import wait_for

METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


class EdgeBinaryMissing(RuntimeError):
    pass


def default_target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/strait/target")))


def edge_bin(profile: str = "debug") -> str:
    """Tests: `$STRAIT_EDGE_BIN`; benchmark (release): `$STRAIT_EDGE_RELEASE_BIN`;
    else `$CARGO_TARGET_DIR/<profile>/strait-edge`."""
    env = "STRAIT_EDGE_BIN" if profile == "debug" else "STRAIT_EDGE_RELEASE_BIN"
    path = os.environ.get(env) or str(default_target_dir() / profile / "strait-edge")
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        raise EdgeBinaryMissing(
            f"strait-edge binary not found at {path}: build it with "
            f"`cargo build {'--release ' if profile != 'debug' else ''}-p strait-edge` "
            f"(CARGO_TARGET_DIR={default_target_dir()}) or set {env}"
        )
    return path


@dataclass
class VirtualCluster:
    name: str
    upstream: list[str]
    bootstrap_port: int = field(default_factory=free_port)
    ports: range = field(default_factory=lambda: free_range(8))
    advertised_host: str = "127.0.0.1"
    # Where the bootstrap listens (an address of the network namespace the edge runs in).
    host: str = "127.0.0.1"
    # Extra virtual-cluster keys (tls, quotas, authorization, ...), merged into the config as given.
    extra: dict = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.bootstrap_port}"

    def config(self) -> dict:
        return {
            "name": self.name,
            "bootstrap": self.bootstrap,
            "brokers": {
                "advertised_host": self.advertised_host,
                "port_range": f"{self.ports.start}-{self.ports.stop - 1}",
            },
            "upstream": {"bootstrap_servers": list(self.upstream)},
            **self.extra,
        }


class Edge:
    def __init__(self, log_dir: Path, clusters: list[VirtualCluster], max_frame_bytes: int = 104857600,
                 binary: str | None = None, log_format: str = "json", extra: dict | None = None,
                 netns: str | None = None, admin_host: str = "127.0.0.1"):
        self.log_dir = Path(log_dir)
        self.clusters = clusters
        self.admin_port = free_port()
        self.max_frame_bytes = max_frame_bytes
        self.binary = binary or edge_bin()
        self.log_format = log_format
        self.extra = extra or {}
        # Run inside this network namespace (`ip netns exec`); the admin endpoint then listens on one of
        # its addresses that the tests can reach.
        self.netns = netns
        self.admin_host = admin_host
        self.expected_errors: list[re.Pattern] = []
        self.config_path = self.log_dir / f"edge-{self.admin_port}.yaml"
        self.proc: Proc | None = None

    # ---- configuration
    def config(self) -> dict:
        cfg = {
            "admin": {"listen": f"{self.admin_host}:{self.admin_port}"},
            "virtual_clusters": [c.config() for c in self.clusters],
            "limits": {"max_frame_bytes": self.max_frame_bytes},
        }
        cfg.update(self.extra)
        return cfg

    def write_config(self) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return self.config_path

    def cluster(self, name: str | None = None) -> VirtualCluster:
        if name is None:
            return self.clusters[0]
        return next(c for c in self.clusters if c.name == name)

    @property
    def bootstrap(self) -> str:
        return self.clusters[0].bootstrap

    # ---- process
    def start(self, timeout: float = 30.0) -> "Edge":
        self.write_config()
        argv = [self.binary, "--config", str(self.config_path), "--log-format", self.log_format]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        env = {"RUST_LOG": os.environ.get("STRAIT_EDGE_RUST_LOG", "info,rustify=off,vaultrs=off"), "NO_COLOR": "1"}
        self.proc = Proc(f"edge-{self.admin_port}", argv, self.log_dir, env=env)
        self.proc.start()

        def ready():
            if not self.proc.alive():
                raise RuntimeError(f"strait-edge exited with {self.proc.popen.returncode}:\n{self.proc.tail()}")
            return self.http_status("/readyz") == 200
        wait_for(ready, timeout, what=f"strait-edge /readyz on {self.admin_host}:{self.admin_port}")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; the exit code, or None if it had to be killed."""
        if self.proc is None:
            return None
        if not self.proc.alive():
            return self.proc.popen.returncode
        self.proc.signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        if code is None:
            self.proc.popen.kill()
            self.proc.popen.wait(timeout=10)
        return code

    # ---- admin endpoint
    def http_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.admin_host}:{self.admin_port}{path}", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.admin_host}:{self.admin_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels) -> float:
        """Sum of every sample named `name` (also `name_total`) whose labels include `labels`."""
        total = 0.0
        names = {name, name + "_total"} if not name.endswith("_total") else {name}
        for line in self.metrics_text().splitlines():
            m = METRIC_LINE.match(line)
            if not m or m.group(1) not in names:
                continue
            sample_labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(sample_labels.get(k) == str(v) for k, v in labels.items()):
                total += float(m.group(3))
        return total

    # ---- logs
    def expect_error(self, pattern: str) -> None:
        """Declare that ERROR lines matching `pattern` are part of this test's expected behaviour."""
        self.expected_errors.append(re.compile(pattern))

    def error_lines(self) -> list[str]:
        return self.proc.error_lines() if self.proc else []

    def unexpected_errors(self) -> list[str]:
        return [l for l in self.error_lines() if not any(p.search(l) for p in self.expected_errors)]

    def log_text(self) -> str:
        return self.proc.all_logs() if self.proc else ""
