"""guard.hostlink.uplink never blocks the loop: the connect state machine against real loopback
sockets (in progress, connected, refused, timed out, name lookup off the loop) and the outbox
(queued, flushed in order, stalled host dropped, over its bound -> MAYBE_SENT). TLS cases are in
test_uplink.py, next to its throwaway certificates."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from guard.hostlink.iso import HostCodec, HostMessage
from tests.support import connected
from guard.hostlink.uplink import CONNECT_REFUSED, CONNECT_TIMEOUT, DISC_SEND_FAILED, Disconnected, SendOutcome, Uplink
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer

LOCAL = "127.0.0.1"


def sale(stan: str = "000001") -> dict[str, str]:
    return {
        "t": "0200", "2": "4111111111111111", "3": "000000", "4": "000000001000", "7": "1122153000", "11": stan,
        "41": "TERM0001", "42": "MERCHANT0000001", "49": "978",
    }


def has_message(items: list[object]) -> bool:
    return any(isinstance(i, HostMessage) for i in items)


def collect(up: Uplink, done: Callable[[list[object]], bool], timeout: float = 3.0) -> list[object]:
    items: list[object] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(items):
        items += up.poll()
        time.sleep(0.005)
    return items


def _inject(up: Uplink, sock: socket.socket) -> None:
    up._sock = sock  # noqa: SLF001 - a connected socket whose peer the test controls
    up._decoder = up.codec.decoder("terminal")  # noqa: SLF001


def _timed_connect(up: Uplink) -> tuple[bool, float]:
    t0 = time.monotonic()
    ok = up.connect()
    return ok, time.monotonic() - t0


@pytest.fixture()
def host() -> Iterator[tuple[HostServer, int]]:
    server = HostServer(HostCore(seed=7, dup_detection=True), HostCodec())
    port = server.start()
    yield server, port
    assert server.stop()


# --- the outbox ------------------------------------------------------------------------------------


def _full_socketpair() -> tuple[socket.socket, socket.socket]:
    """``a`` whose kernel send buffer is full because ``b`` does not read."""
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        while True:
            a.send(b"x" * 65536)
    except BlockingIOError:
        pass
    return a, b


def _drain(b: socket.socket, until: Callable[[bytes], bool], timeout: float = 3.0) -> bytes:
    got = b""
    b.settimeout(0.05)
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        try:
            got += b.recv(1 << 20)
        except (TimeoutError, socket.timeout):
            pass
    return got


def test_send_never_blocks_and_a_host_that_stops_reading_is_dropped_after_send_timeout() -> None:
    a, b = _full_socketpair()
    with a, b:
        up = Uplink(LOCAL, 1, HostCodec(), send_timeout=0.3)
        _inject(up, a)
        t0 = time.monotonic()
        assert up.send(sale()) is SendOutcome.SENT  # queued: the kernel takes nothing now
        assert time.monotonic() - t0 < 0.2 and up.connected
        assert up.queued == len(HostCodec().encode(sale()))
        assert up.flush() and up.connected
        while up.flush() and time.monotonic() - t0 < 3.0:
            time.sleep(0.01)
        assert not up.connected and 0.3 <= time.monotonic() - t0 < 3.0
        items = up.poll()
        assert isinstance(items[-1], Disconnected) and items[-1].reason == DISC_SEND_FAILED


def test_outbox_is_flushed_in_order_once_the_host_reads() -> None:
    a, b = _full_socketpair()
    codec = HostCodec()
    with a, b:
        up = Uplink(LOCAL, 1, codec, send_timeout=5.0)
        _inject(up, a)
        msgs = [sale(stan=f"{i:06d}") for i in range(1, 4)]
        assert all(up.send(m) is SendOutcome.SENT for m in msgs)
        assert up.queued == sum(len(codec.encode(m)) for m in msgs)
        tail = b"".join(codec.encode(m) for m in msgs)
        got = b""
        deadline = time.monotonic() + 3.0
        while not got.endswith(tail) and time.monotonic() < deadline:
            got += _drain(b, lambda g: len(g) > 0, timeout=0.1)
            assert up.flush()
        assert got.endswith(tail) and up.queued == 0 and up.connected
        assert up.send(sale(stan="000004")) is SendOutcome.SENT and up.queued == 0


def test_outbox_over_its_bound_drops_the_connection_with_maybe_sent() -> None:
    a, b = _full_socketpair()
    with a, b:
        up = Uplink(LOCAL, 1, HostCodec(), send_timeout=60.0, outbox_limit=1000)
        _inject(up, a)
        outcomes = []
        for i in range(1, 100):
            outcomes.append(up.send(sale(stan=f"{i:06d}")))
            if outcomes[-1] is not SendOutcome.SENT:
                break
        assert outcomes[-1] is SendOutcome.MAYBE_SENT and len(outcomes) > 2
        assert all(o is SendOutcome.SENT for o in outcomes[:-1])
        assert not up.connected and up.queued == 0
        items = up.poll()
        assert isinstance(items[-1], Disconnected) and items[-1].reason == DISC_SEND_FAILED
        assert up.send(sale()) is SendOutcome.NOT_SENT


def test_failure_behind_queued_bytes_is_maybe_sent() -> None:
    """A write error that cuts messages already queued is not NOT_SENT: the engine must hear that
    the messages in flight are gone (MAYBE_SENT runs on_host_down), even if this one never left."""
    a, b = _full_socketpair()
    with a, b:
        up = Uplink(LOCAL, 1, HostCodec(), send_timeout=60.0)
        _inject(up, a)
        assert up.send(sale()) is SendOutcome.SENT and up.queued > 0
        b.close()
        assert up.send(sale(stan="000002")) is SendOutcome.MAYBE_SENT and not up.connected


# --- the connect state machine ---------------------------------------------------------------------


class BlackHole:
    """A listener with a full accept backlog: further connects stay in progress (Linux drops
    the SYNs) until ``release()`` accepts the queued ones and the client's SYN retry gets in."""

    def __init__(self) -> None:
        self.lst = socket.socket()
        self.lst.bind((LOCAL, 0))
        self.lst.listen(0)
        self.port = self.lst.getsockname()[1]
        self.fillers = []
        for _ in range(2):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex((LOCAL, self.port))
            self.fillers.append(f)
        time.sleep(0.05)
        self.accepted: list[socket.socket] = []

    def release(self, timeout: float = 5.0) -> None:
        self.lst.settimeout(0.05)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.accepted.append(self.lst.accept()[0])
            except (TimeoutError, socket.timeout):
                if len(self.accepted) >= 3:
                    return

    def close(self) -> None:
        for s in self.fillers + self.accepted:
            s.close()
        self.lst.close()


@pytest.fixture()
def blackhole() -> Iterator[BlackHole]:
    h = BlackHole()
    yield h
    h.close()


def test_connect_in_progress_then_connected(blackhole: BlackHole) -> None:
    up = Uplink(LOCAL, blackhole.port, HostCodec(), connect_timeout=8.0)
    ok, took = _timed_connect(up)
    assert not ok and up.connecting and not up.connected and took < 0.1
    assert up.fileno() == -1 and up.poll() == [] and up.send(sale()) is SendOutcome.NOT_SENT
    assert not up.connect() and up.connecting
    releaser = threading.Thread(target=blackhole.release, daemon=True)
    releaser.start()
    worst = 0.0
    deadline = time.monotonic() + 7.0
    while time.monotonic() < deadline:
        ok, took = _timed_connect(up)
        worst = max(worst, took)
        if ok:
            break
        time.sleep(0.01)
    releaser.join(6.0)
    assert ok and up.connected and not up.connecting and up.last_error == "" and up.connections == 1
    assert worst < 0.1, f"connect() blocked for {worst:.3f}s"
    up.close()
    assert not up.connecting and not up.connected


def test_connect_times_out_without_blocking(blackhole: BlackHole) -> None:
    up = Uplink(LOCAL, blackhole.port, HostCodec(), connect_timeout=0.5)
    t0 = time.monotonic()
    worst, calls = 0.0, 0
    while time.monotonic() - t0 < 3.0:
        ok, took = _timed_connect(up)
        worst, calls = max(worst, took), calls + 1
        if not up.connecting:
            break
        time.sleep(0.01)
    assert not ok and not up.connected and up.last_error == CONNECT_TIMEOUT
    assert 0.5 <= time.monotonic() - t0 < 2.0 and calls > 5 and worst < 0.1
    assert not up.connect() and up.connecting, "the next call starts a new attempt"
    up.close()
    assert not up.connecting


def test_close_abandons_an_attempt(blackhole: BlackHole) -> None:
    up = Uplink(LOCAL, blackhole.port, HostCodec(), connect_timeout=5.0)
    assert not up.connect() and up.connecting
    up.close()
    assert not up.connecting and not up.connected and up.last_error == ""


def test_host_name_is_resolved_off_the_loop(host: tuple[HostServer, int], monkeypatch: pytest.MonkeyPatch) -> None:
    _, port = host
    real = socket.getaddrinfo
    lookups: list[str] = []

    def slow(h: str, port: int, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        if not flags & socket.AI_NUMERICHOST:
            lookups.append(h)
            time.sleep(0.5)
        return real(h, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    up = Uplink("localhost", port, HostCodec(), connect_timeout=5.0)
    ok, took = _timed_connect(up)
    assert not ok and up.connecting and took < 0.1
    assert connected(up) and lookups == ["localhost"]
    assert up.send(sale()) is SendOutcome.SENT and has_message(collect(up, has_message))
    up.close()


def test_connect_refused_without_blocking() -> None:
    s = socket.create_server((LOCAL, 0))
    port = s.getsockname()[1]
    s.close()
    up = Uplink(LOCAL, port, HostCodec(), connect_timeout=5.0)
    t0 = time.monotonic()
    assert not connected(up, timeout=1.0) and up.last_error == CONNECT_REFUSED
    assert time.monotonic() - t0 < 0.5 and not up.connecting
