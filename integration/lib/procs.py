"""Child processes with logs captured to files, stopped by pid only."""

import ctypes
import json
import os
import re
import signal
import subprocess
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so that a crashed or killed pytest
    never leaves brokers (JVMs hold GBs) or edges running."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Proc:
    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        self.log_path: Path | None = None

    def start(self) -> None:
        self.starts += 1
        # A second Proc under the same name (a restarted edge) must not overwrite the first one's log.
        while (self.log_dir / f"{self.name}.{self.starts}.log").exists():
            self.starts += 1
        self.log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        log = open(self.log_path, "wb")
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.popen = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=_die_with_parent,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code of the graceful stop or None."""
        if self.popen is None:
            return None
        if self.popen.poll() is not None:
            return self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        return code

    def log_text(self) -> str:
        return self.all_logs()

    def current_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def all_logs(self) -> str:
        parts = []
        for i in range(1, self.starts + 1):
            p = self.log_dir / f"{self.name}.{i}.log"
            if p.exists():
                parts.append(p.read_text(errors="replace"))
        return "".join(parts)

    def error_lines(self) -> list[str]:
        """The ERROR lines of every start's log, text or JSON format."""
        return error_lines(self.all_logs())

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.all_logs().splitlines()[-lines:])


ANSI = re.compile(r"\x1b\[[0-9;]*m")
TEXT_LEVEL = re.compile(r"^\S+\s+(TRACE|DEBUG|INFO|WARN|ERROR)\b")


def error_lines(log: str) -> list[str]:
    """The lines of a tracing log (text or JSON) logged at ERROR."""
    out = []
    for raw in log.splitlines():
        line = ANSI.sub("", raw).strip()
        level = None
        if line.startswith("{"):
            try:
                level = str(json.loads(line).get("level", "")).upper()
            except ValueError:
                level = None
        if level is None:
            m = TEXT_LEVEL.match(line)
            level = m.group(1) if m else None
        if level == "ERROR":
            out.append(line)
    return out
