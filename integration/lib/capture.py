"""A recording TCP relay for Kafka traffic: seeds for the fuzz targets (edge/fuzz, docs/fuzzing.md).

Clients connect to the relay, the relay connects to the broker and copies bytes both ways unchanged,
and every frame it sees is written out: each connection gets a directory `conn-<n>/` holding its frames
in order, `<seq>-req-<api key>-<version>.bin` and `<seq>-resp-<api key>-<version>.bin` (a response
named after the request it answers, matched by correlation id), each the frame without its 4-byte
length field. The broker must advertise the relay's address (`advertised.listeners`), so that every
connection a client opens after bootstrap is recorded too.
"""

import socket
import struct
import threading
from pathlib import Path


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _frames(sock: socket.socket):
    """Yields (length field, body) until the peer closes."""
    while True:
        head = _recv_exact(sock, 4)
        if head is None:
            return
        (size,) = struct.unpack(">i", head)
        body = _recv_exact(sock, size) if size > 0 else b""
        if body is None:
            return
        yield head, body


class _Connection:
    def __init__(self, relay: "CaptureRelay", client: socket.socket, index: int):
        self.relay = relay
        self.client = client
        self.dir = relay.out_dir / f"conn-{index:04d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.seq = 0
        self.in_flight: dict[int, tuple[int, int]] = {}

    def _write(self, kind: str, api_key: int, version: int, body: bytes) -> None:
        with self.lock:
            self.seq += 1
            (self.dir / f"{self.seq:05d}-{kind}-{api_key}-{version}.bin").write_bytes(body)

    def run(self) -> None:
        try:
            upstream = socket.create_connection(self.relay.upstream, timeout=10)
        except OSError:
            self.client.close()
            return
        upstream.settimeout(None)
        back = threading.Thread(target=self._responses, args=(upstream,), daemon=True)
        back.start()
        try:
            for head, body in _frames(self.client):
                if len(body) >= 8:
                    api_key, version, correlation_id = struct.unpack(">hhi", body[:8])
                    with self.lock:
                        self.in_flight[correlation_id] = (api_key, version)
                    self._write("req", api_key, version, body)
                upstream.sendall(head + body)
        except OSError:
            pass
        finally:
            try:
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            back.join(timeout=10)
            upstream.close()
            self.client.close()

    def _responses(self, upstream: socket.socket) -> None:
        try:
            for head, body in _frames(upstream):
                if len(body) >= 4:
                    (correlation_id,) = struct.unpack(">i", body[:4])
                    with self.lock:
                        request = self.in_flight.pop(correlation_id, None)
                    if request is not None:
                        self._write("resp", request[0], request[1], body)
                self.client.sendall(head + body)
        except OSError:
            pass
        finally:
            try:
                self.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class CaptureRelay:
    """`CaptureRelay(port, ("127.0.0.1", broker_port), out_dir).start()`; `stop()` closes the listener."""

    def __init__(self, port: int, upstream: tuple[str, int], out_dir: Path):
        self.port = port
        self.upstream = upstream
        self.out_dir = Path(out_dir)
        self._listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self._connections = 0
        self._stopped = threading.Event()

    def start(self) -> "CaptureRelay":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._connections += 1
            conn = _Connection(self, client, self._connections)
            threading.Thread(target=conn.run, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
