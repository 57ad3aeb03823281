"""Memory and connection limits (`limits:`), against the real strait-edge and Apache Kafka.

Each attack runs beside a well-behaved confluent-kafka client on the same edge, which must complete
every request; each refusal must be counted with its reason and logged as a WARN line, never ERROR.
"""

import json
import os
import struct
import threading

import pytest

from lib.clients import Rec, client, unique
from lib.edge import VirtualCluster
from lib.kafka_wire import API_VERSIONS, METADATA, closed_by_peer, connect, frame, recv_frame, request_v0_header
from lib.wait import wait_for

PRODUCE = 0
MiB = 1024 * 1024

# Every principal (here: anonymous, plain TCP) may do everything: the filter is installed, so every
# request but ApiVersions is decoded, which is what the buffer budget is about.
ALLOW_ALL_RULES = [
    {"principal": "*", "allow": ["All"], "topic": "*"},
    {"principal": "*", "allow": ["All"], "group": "*"},
    {"principal": "*", "allow": ["All"], "cluster": True},
]


def host_port(bootstrap: str) -> tuple[str, int]:
    host, port = bootstrap.rsplit(":", 1)
    return host, int(port)


def authorizing_edge(broker, edge, **limits):
    t = broker()
    vc = VirtualCluster(name="authz", upstream=t.bootstrap_servers,
                        extra={"authorization": {"rules": ALLOW_ALL_RULES}})
    return t, edge([vc], extra={"limits": {"max_frame_bytes": 100 * MiB, **limits}})


def warn_lines(e, needle: str) -> list[str]:
    out = []
    for line in e.proc.all_logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if str(entry.get("level", "")).upper() == "WARN" and needle in line:
            out.append(line)
    return out


class WellBehaved:
    """A confluent-kafka producer and consumer on the edge; `run()` must deliver and read back every record."""

    def __init__(self, bootstrap: str):
        self.c = client("confluent", bootstrap)
        self.topic = unique("limits")
        self.c.create_topic(self.topic)
        big = {"message.max.bytes": 4 * MiB}
        self.producer = self.c.producer(**big)
        self.consumer = self.c.consumer(self.topic, **{"fetch.max.bytes": 8 * MiB,
                                                       "max.partition.fetch.bytes": 4 * MiB})
        self.sent: list[bytes] = []

    def run(self, rounds: int = 3) -> None:
        for r in range(rounds):
            # A 1 MiB record (plus batch overhead) passes the default per-connection budget.
            records = [Rec(b"big", os.urandom(MiB))] + [Rec(b"k", b"v-%d-%d" % (r, i)) for i in range(20)]
            self.producer.send_all(self.topic, records, 60)
            self.sent += [rec.value for rec in records]

    def check(self) -> None:
        got = self.consumer.take(len(self.sent), timeout=90)
        assert [r.value for r in got] == self.sent


def test_oversized_prefix_is_refused_before_its_body(broker, edge):
    """100 anonymous connections each announce a 100 MiB Produce to an authorizing listener: every one is
    closed from its 12-byte prefix (the body is never sent), counted as `buffer_budget`."""
    t, e = authorizing_edge(broker, edge)
    good = WellBehaved(e.bootstrap)
    attackers = 100
    before = e.metric("strait_frames_rejected", reason="buffer_budget")
    outcome: dict[str, int] = {"closed": 0, "open": 0}

    def attack():
        socks = [connect(*host_port(e.bootstrap)) for _ in range(attackers)]
        for s in socks:
            # Produce v9, 100 MiB - 16 announced (under max_frame_bytes: the budget is what refuses it).
            s.sendall(struct.pack(">ihhi", 100 * MiB - 16, PRODUCE, 9, 1))
        for s in socks:
            outcome["closed" if closed_by_peer(s, timeout=30) else "open"] += 1
            s.close()

    attacker = threading.Thread(target=attack)
    attacker.start()
    good.run()
    attacker.join(120)
    assert not attacker.is_alive()
    good.check()
    assert outcome == {"closed": attackers, "open": 0}
    wait_for(lambda: e.metric("strait_frames_rejected", reason="buffer_budget") == before + attackers,
             timeout=10, what="every refusal counted as buffer_budget")
    assert e.metric("strait_frames_rejected", reason="buffer_budget") == before + attackers
    assert len(warn_lines(e, "buffer_budget")) == attackers
    assert e.alive()


def test_slowloris_is_closed_after_request_read_timeout(broker, edge):
    """A request dribbled a byte at a time is cut off after `request_read_timeout`; counted as `read_timeout`."""
    t, e = authorizing_edge(broker, edge, request_read_timeout="2s")
    good = WellBehaved(e.bootstrap)
    # A Metadata request padded so that, at 5 bytes a second, it would take a minute to arrive.
    body = request_v0_header(METADATA, 1, 9) + struct.pack(">i", 0) + b"\x00" * 300
    request = frame(body)
    sock = connect(*host_port(e.bootstrap))
    stop = threading.Event()
    sent = {"bytes": 0}

    def dribble():
        for byte in request[:-1]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
            sent["bytes"] += 1
            if stop.wait(0.2):
                return

    dribbler = threading.Thread(target=dribble)
    dribbler.start()
    good.run(rounds=2)
    try:
        assert closed_by_peer(sock, timeout=60), "slowloris connection was not closed"
    finally:
        stop.set()
        dribbler.join(10)
        sock.close()
    assert sent["bytes"] < len(request) - 1, "closed only after the whole frame was sent"
    good.check()
    wait_for(lambda: e.metric("strait_frames_rejected", reason="read_timeout") == 1, timeout=10,
             what="the slowloris refusal counted as read_timeout")
    assert len(warn_lines(e, "read_timeout")) == 1


def test_max_connections_per_listener(broker, edge):
    """Beyond `max_connections` a listener accepts and closes at once; the refusals are counted, the WARN
    line is rate-limited, connections already open (a client's, on the broker ports) keep working."""
    limit = 4
    t, e = authorizing_edge(broker, edge, max_connections=limit)
    good = WellBehaved(e.bootstrap)
    good.run(rounds=1)
    held = []
    refused = 0
    # The client holds some bootstrap connections of its own: fill the rest, then try three more.
    while refused < 3:
        assert len(held) <= limit, "more connections than max_connections were served"
        s = connect(*host_port(e.bootstrap))
        s.sendall(frame(request_v0_header(API_VERSIONS, 0, 5)))
        try:
            s.settimeout(10)
            body = recv_frame(s)
            assert struct.unpack(">i", body[:4])[0] == 5
            held.append(s)
        except (ConnectionError, OSError):
            refused += 1
            s.close()
    good.run(rounds=1)
    good.check()
    assert e.metric("strait_connections_limited", reason="max_connections") == refused
    assert len(warn_lines(e, "max_connections")) == 1, "refusals must be logged at most every 10 s"
    # A slot freed is a slot served again.
    held.pop().close()
    wait_for(lambda: _served(e.bootstrap), timeout=10, what="a freed slot served again")
    for s in held:
        s.close()


def _served(bootstrap: str) -> bool:
    try:
        with connect(*host_port(bootstrap)) as s:
            s.sendall(frame(request_v0_header(API_VERSIONS, 0, 6)))
            s.settimeout(5)
            return struct.unpack(">i", recv_frame(s)[:4])[0] == 6
    except (ConnectionError, OSError):
        return False


def test_idle_connection_is_closed(broker, edge):
    """No byte either way for `idle_timeout`: closed and counted as `idle_timeout`."""
    t, e = authorizing_edge(broker, edge, idle_timeout="2s")
    s = connect(*host_port(e.bootstrap))
    s.sendall(frame(request_v0_header(API_VERSIONS, 0, 5)))
    assert struct.unpack(">i", recv_frame(s)[:4])[0] == 5
    assert closed_by_peer(s, timeout=30), "idle connection was not closed"
    s.close()
    wait_for(lambda: e.metric("strait_connections_limited", reason="idle_timeout") >= 1, timeout=10,
             what="idle close counted")
