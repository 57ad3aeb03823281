"""A real Tansu broker on a loopback port."""

import os
import shutil
from pathlib import Path

from .kafka_wire import answers_api_versions
from .ports import free_port
from .procs import Proc
from .wait import wait_for


def tansu_bin() -> str:
    """`$STRAIT_TANSU_BIN`, else `tansu` on PATH, else the copy scripts/setup.sh installs."""
    explicit = os.environ.get("STRAIT_TANSU_BIN")
    candidates = [explicit] if explicit else [
        shutil.which("tansu"),
        str(Path.home() / ".cache/strait/tools/bin/tansu"),
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        f"tansu binary not found (looked at {candidates}); run scripts/setup.sh or set STRAIT_TANSU_BIN"
    )


class Tansu:
    """`tansu broker` listening on 127.0.0.1:port.

    advertised_port: what metadata tells clients (defaults to the listener port); benchmarks set it to a
    forwarder's port. storage: a Tansu storage URL; memory by default, `sqlite://...` survives restarts.
    """

    def __init__(self, log_dir: Path, port: int | None = None, advertised_port: int | None = None,
                 storage: str = "memory://tansu/", name: str = "tansu", cluster_id: str = "tansu_cluster"):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.storage = storage
        argv = [
            tansu_bin(), "broker",
            "--cluster-id", cluster_id,
            "--listener-url", f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url", f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine", storage,
        ]
        self.proc = Proc(f"{name}-{self.port}", argv, log_dir, env={"RUST_LOG": os.environ.get("TANSU_RUST_LOG", "warn")})

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def bootstrap_servers(self) -> list[str]:
        return [self.bootstrap]

    def start(self, timeout: float = 30.0) -> "Tansu":
        self.proc.start()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        def ready():
            if not self.proc.alive():
                raise RuntimeError(f"tansu exited with {self.proc.popen.returncode}:\n{self.proc.tail()}")
            return answers_api_versions(self.host, self.port)
        wait_for(ready, timeout, what=f"tansu on {self.bootstrap} to answer ApiVersions")

    def stop(self) -> None:
        self.proc.stop(timeout=10)

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.proc.start()
        self._wait_ready(timeout)
