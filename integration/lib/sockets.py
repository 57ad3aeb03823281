"""Which TCP peers a process is connected to, read from /proc (no psutil, no ss parsing).

A client that talks to a cluster through the edge must never hold a connection to a broker port; the
scenarios sample this while clients run and assert it stays empty.
"""

import os
from pathlib import Path


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed between listing and reading
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _tcp_table(pid: int) -> list[tuple[int, int, int]]:
    """(remote_port, state, inode) for every IPv4 and IPv6 TCP socket in the pid's network namespace."""
    rows = []
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            remote, state, inode = cols[2], int(cols[3], 16), int(cols[9])
            rows.append((int(remote.rsplit(":", 1)[1], 16), state, inode))
    return rows


TCP_ESTABLISHED = 0x01
TCP_SYN_SENT = 0x02


def remote_ports(pid: int | None = None) -> set[int]:
    """Remote ports of the process' TCP connections that are established or being opened."""
    pid = pid or os.getpid()
    mine = _socket_inodes(pid)
    return {port for port, state, inode in _tcp_table(pid)
            if inode in mine and state in (TCP_ESTABLISHED, TCP_SYN_SENT)}


def client_pids() -> list[int]:
    """This process (confluent-kafka, kafka-python) and the Java client driver's JVM, if one runs."""
    pids = [os.getpid()]
    from . import java_client
    driver = java_client._driver
    if driver is not None and driver.alive():
        pids.append(driver.proc.pid)
    return pids
