"""Free loopback ports and port ranges, never handed out twice in one process."""

import random
import socket

_taken: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_range(count: int, low: int = 20000, high: int = 60000) -> range:
    """A range of `count` consecutive ports that are bindable now and not handed out before."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(low, high - count)
        ports = range(base, base + count)
        if any(p in _taken for p in ports):
            continue
        if all(_bindable(p) for p in ports):
            _taken.update(ports)
            return ports
    raise RuntimeError(f"no free range of {count} loopback ports found")


def free_port() -> int:
    return free_range(1)[0]
