"""Malformed input on raw sockets: the connection may die, the process and other connections must not."""

import os
import struct

import pytest

from lib.clients import Rec, client, unique
from lib.kafka_wire import (API_VERSIONS, METADATA, api_versions, closed_by_peer, connect, frame, recv_frame,
                            request_v0_header)

FRAMES_REJECTED = os.environ.get("STRAIT_METRIC_FRAMES_REJECTED", "strait_frames_rejected_total")


def host_port(bootstrap: str) -> tuple[str, int]:
    host, port = bootstrap.rsplit(":", 1)
    return host, int(port)


def assert_still_serving(target, bystander):
    """The edge (or broker) is alive, an already-open connection still answers, a fresh client works."""
    if target.edge:
        assert target.edge.alive(), f"strait-edge died:\n{target.edge.proc.tail()}"
    bystander.sendall(frame(request_v0_header(API_VERSIONS, 0, 4242)))
    body = recv_frame(bystander)
    assert struct.unpack(">i", body[:4])[0] == 4242
    assert api_versions(*host_port(target.bootstrap))
    c = client("confluent", target.bootstrap)
    topic = unique("after-bad")
    c.create_topic(topic)
    c.produce(topic, [Rec(b"k", b"still-works")])
    assert c.consumer(topic).take(1, timeout=60)[0].value == b"still-works"


@pytest.fixture
def bystander(target):
    s = connect(*host_port(target.bootstrap))
    yield s
    s.close()


def test_oversized_length_prefix_closes_connection(target, bystander):
    limit = 104857600
    before = target.edge.metric(FRAMES_REJECTED) if target.edge else 0.0
    s = connect(*host_port(target.bootstrap))
    s.sendall(struct.pack(">i", limit + 1) + b"\x00" * 64)
    closed = closed_by_peer(s, timeout=10 if target.edge else 2)
    s.close()
    # Tansu itself keeps waiting for the 100 MiB; the edge must refuse it.
    if target.edge:
        assert closed, "connection with an oversized frame was not closed"
    if target.edge:
        after = target.edge.metric(FRAMES_REJECTED)
        assert after >= before + 1, f"{FRAMES_REJECTED} went from {before} to {after}"
    assert_still_serving(target, bystander)


def test_garbage_bytes(target, bystander):
    s = connect(*host_port(target.bootstrap))
    # A negative length prefix, then noise.
    s.sendall(b"\xff\xff\xff\xf0" + os.urandom(4096))
    assert closed_by_peer(s, timeout=10), "connection sending garbage was not closed"
    s.close()
    s = connect(*host_port(target.bootstrap))
    # A well-framed body that is not a Kafka request header.
    s.sendall(frame(b"\x7f\x7f" + os.urandom(200)))
    closed_by_peer(s, timeout=3)
    s.close()
    assert_still_serving(target, bystander)


def test_truncated_frame_then_close(target, bystander):
    s = connect(*host_port(target.bootstrap))
    body = request_v0_header(API_VERSIONS, 0, 1)
    s.sendall(struct.pack(">i", len(body) + 100) + body)
    s.close()
    assert_still_serving(target, bystander)


def _answer_or_close(sock, correlation_id: int) -> str:
    """'closed' if the peer closes, else the response must carry our correlation id."""
    sock.settimeout(10)
    try:
        body = recv_frame(sock)
    except (ConnectionError, OSError):
        return "closed"
    assert struct.unpack(">i", body[:4])[0] == correlation_id
    return "answered"


def test_unknown_api_key(target, bystander):
    s = connect(*host_port(target.bootstrap))
    s.sendall(frame(request_v0_header(9999, 0, 77) + b"\x00" * 8))
    outcome = _answer_or_close(s, 77)
    s.close()
    assert outcome in ("closed", "answered")
    assert_still_serving(target, bystander)


def test_unknown_metadata_version(target, bystander):
    s = connect(*host_port(target.bootstrap))
    s.sendall(frame(request_v0_header(METADATA, 99, 78) + b"\x00" * 8))
    outcome = _answer_or_close(s, 78)
    s.close()
    assert outcome in ("closed", "answered")
    assert_still_serving(target, bystander)
