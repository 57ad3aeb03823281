"""`strait-impair`: a userspace delay/loss relay on loopback (the kernel here has no netem).

Relays UDP and TCP from a listen port to a target port, adding a one-way delay in each direction and, for
UDP, random loss; commands on its stdin rebind the UDP flows (the target sees the sender from a new
address, as after a NAT rebinding) or drop everything (a partition)."""

import json
import select
import subprocess
import time
from pathlib import Path

from .edge import default_target_dir


def impair_bin(profile: str = "debug") -> str:
    return str(default_target_dir() / profile / "strait-impair")


class Impair:
    def __init__(self, log_dir: Path, udp: list[tuple[int, int]] = (), tcp: list[tuple[int, int]] = (),
                 delay_ms: float = 0.0, loss: float = 0.0, profile: str = "debug", listen_host: str = "127.0.0.1"):
        argv = [impair_bin(profile), "--delay-ms", str(delay_ms), "--loss", str(loss)]
        for listen, target in udp:
            argv += ["--udp", f"{listen_host}:{listen}=127.0.0.1:{target}"]
        for listen, target in tcp:
            argv += ["--tcp", f"{listen_host}:{listen}=127.0.0.1:{target}"]
        self.stderr = open(Path(log_dir) / f"impair-{int(time.time() * 1000)}.log", "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)
        ready = self._answer(10)
        if not ready.get("ready"):
            raise RuntimeError(f"strait-impair did not start: {ready}")

    def _answer(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"strait-impair exited with {self.proc.wait()}")
                return json.loads(line)
        raise TimeoutError("no answer from strait-impair")

    def command(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self._answer(10)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def stats(self) -> dict:
        return self.command("stats")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.close()
