"""Just enough of the Kafka wire protocol to probe a listener and to send malformed input."""

import socket
import struct
import time

FETCH = 1
API_VERSIONS = 18
METADATA = 3


def request_v0_header(api_key: int, api_version: int, correlation_id: int, client_id: str = "strait-probe") -> bytes:
    """Request header v1 (api_key, api_version, correlation_id, nullable client_id)."""
    cid = client_id.encode()
    return struct.pack(">hhih", api_key, api_version, correlation_id, len(cid)) + cid


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">i", recv_exact(sock, 4))
    return recv_exact(sock, size)


def connect(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def api_versions(host: str, port: int, timeout: float = 5.0) -> dict[int, tuple[int, int]]:
    """Send ApiVersions v0 and return {api_key: (min_version, max_version)}; raises on any failure."""
    with connect(host, port, timeout) as sock:
        sock.sendall(frame(request_v0_header(API_VERSIONS, 0, 7)))
        body = recv_frame(sock)
    correlation_id, error_code, count = struct.unpack(">ihi", body[:10])
    if correlation_id != 7:
        raise ValueError(f"correlation id {correlation_id} != 7")
    if error_code != 0:
        raise ValueError(f"ApiVersions error code {error_code}")
    out = {}
    for i in range(count):
        key, lo, hi = struct.unpack(">hhh", body[10 + 6 * i : 16 + 6 * i])
        out[key] = (lo, hi)
    return out


def answers_api_versions(host: str, port: int) -> bool:
    try:
        return bool(api_versions(host, port, timeout=1.0))
    except (OSError, ValueError, struct.error):
        return False


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closes (EOF or reset) within `timeout`; any data read is discarded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not data:
            return True
    return False


def fetch_v4(correlation_id: int, topic: str, partition: int, offset: int, max_wait_ms: int) -> bytes:
    """A framed Fetch v4 for one partition from `offset`, min_bytes 1: past the end of the log, the
    broker holds it for `max_wait_ms` (a request that stays in flight on purpose)."""
    name = topic.encode()
    body = struct.pack(">iiiib", -1, max_wait_ms, 1, 1 << 20, 0)
    body += struct.pack(">ih", 1, len(name)) + name
    body += struct.pack(">iiqi", 1, partition, offset, 1 << 20)
    return frame(request_v0_header(FETCH, 4, correlation_id) + body)


def correlation_id(response: bytes) -> int:
    (cid,) = struct.unpack(">i", response[:4])
    return cid
