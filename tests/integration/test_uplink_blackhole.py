"""The daemon's loop stays responsive to the reader while the host's connect hangs.

A black-holed host (a TCP connect that never completes, or a TLS server that never answers the
ClientHello) must not stop the guard from ACKing reader frames within 100 ms: the reader
retransmits after T2 and resyncs after three retransmissions, so a loop blocked in ``connect``
for ``connect_timeout`` seconds breaks the reader link. Every sale still gets a final RESULT
(declined: no host) instead of silence.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from firmware_bridge import messages as M
from firmware_bridge.constants import T2_S, FrameType
from firmware_bridge.frame import Frame
from firmware_bridge.link import Acked, LinkEndpoint, LinkEvent
from firmware_bridge.nullmodem import NullModem
from firmware_bridge.serial_port import open_port
from guard.core.model import TxnState
from guard.hostlink.uplink import CONNECT_TIMEOUT, TLS_HANDSHAKE_FAILED
from guard.journal.keys import init_keys
from guard.simulation import readersim
from guard.simulation.readersim import ReaderSim
from posguard.config import parse
from posguard.run import build

LOCAL = "127.0.0.1"
PAN = "4761739001010119"
CONNECT_TIMEOUT_S = 4.0
SALES = 20
SALE_GAP_S = 0.45  # 20 sales span ~2 connect timeouts: attempts expire and restart mid-run


class TcpBlackHole:
    """A listening socket whose accept backlog is full: the kernel drops further SYNs, so a
    client's connect() stays in progress (verified on Linux loopback; tcp_abort_on_overflow=0)."""

    def __init__(self) -> None:
        self.lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lst.bind((LOCAL, 0))
        self.lst.listen(0)
        self.port = self.lst.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((LOCAL, self.port))
            self.fillers.append(s)
        time.sleep(0.05)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.lst.close()


class TlsBlackHole:
    """Accepts TCP connections and reads whatever arrives, but never sends a ServerHello."""

    def __init__(self) -> None:
        self.lst = socket.create_server((LOCAL, 0))
        self.lst.settimeout(0.1)
        self.port = self.lst.getsockname()[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.lst.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        for c in self._conns:
            c.close()
        self.lst.close()


class TimedLink(LinkEndpoint):
    """The reader's link endpoint, recording how long each DATA frame waited for its ACK."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_sent: dict[bytes, float] = {}
        self.ack_latencies: list[float] = []

    def _emit(self, frame: Frame) -> None:
        if frame.kind is FrameType.DATA:
            self.first_sent.setdefault(frame.payload, time.monotonic())
        super()._emit(frame)

    def receive_bytes(self, data: bytes, now: float) -> list[LinkEvent]:
        events = super().receive_bytes(data, now)
        for ev in events:
            if isinstance(ev, Acked) and ev.payload in self.first_sent:
                self.ack_latencies.append(time.monotonic() - self.first_sent.pop(ev.payload))
        return events


class Guard:
    """The daemon's objects (posguard.run.build) stepped in a thread, as `posguard run` does."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self._cfg = parse(cfg)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.last_error = ""
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        assert self._ready.wait(10) and self.error is None, repr(self.error)

    def _loop(self) -> None:
        try:
            svc, bridge = build(self._cfg)
            self._ready.set()
            try:
                while not self._stop.is_set():
                    svc.step(0.01)
                    if svc.uplink.last_error:
                        self.last_error = svc.uplink.last_error
            finally:
                bridge.link.port.close()
                svc.close()
        except BaseException as e:  # surfaced by stop()
            self.error = e
            self._ready.set()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=CONNECT_TIMEOUT_S + 10)
        assert not self._t.is_alive(), "the guard loop did not stop"
        assert self.error is None, repr(self.error)


@pytest.fixture(params=["tcp-connect-hangs", "tls-handshake-hangs"])
def blackhole(request: pytest.FixtureRequest) -> Iterator[tuple[str, int, bool]]:
    tls = request.param.startswith("tls")
    hole: TcpBlackHole | TlsBlackHole = TlsBlackHole() if tls else TcpBlackHole()
    yield request.param, hole.port, tls
    hole.close()


def test_reader_is_acked_within_t2_while_host_connect_hangs(
    tmp_path: Path, blackhole: tuple[str, int, bool], monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, port, tls = blackhole
    init_keys(tmp_path / "keys")
    cable = NullModem()
    cfg = {
        "terminal": {"terminal_id": "BLKHOLE1", "merchant_id": "BLKHOLEMERCH001"},
        "reader": {"url": cable.a, "reader_id": "R1"},
        "host": {"address": LOCAL, "port": port, "tls": tls, "connect_timeout": CONNECT_TIMEOUT_S,
                 "timeout": 1.0, "reversal_timeout": 1.0},
        "journal": {"path": str(tmp_path / "journal.db"), "keys": str(tmp_path / "keys")},
        "policy": {"double_swipe_window": 0, "card_max_count": 0, "card_max_amount": 0, "terminal_max_count": 0},
    }
    monkeypatch.setattr(readersim, "LinkEndpoint", TimedLink)
    guard = Guard(cfg)
    r = ReaderSim(open_port(cable.b), reader_id="R1", rng=random.Random(11))
    results: list[Any] = []
    t0 = time.monotonic()
    try:
        r.sync(timeout=3 * CONNECT_TIMEOUT_S)
        retx0, downs0 = r.retransmissions, r.stats.link_downs
        link = r.link
        assert isinstance(link, TimedLink)
        link.ack_latencies.clear()
        for i in range(SALES):
            results.append(r.auth(r.new_txn_id(), 1000 + i, "978", PAN, "2912", timeout=4 * CONNECT_TIMEOUT_S))
            time.sleep(SALE_GAP_S)
        retx, downs = r.retransmissions - retx0, r.stats.link_downs - downs0
        latencies = list(r.link.ack_latencies) if isinstance(r.link, TimedLink) else []
    finally:
        r.close()
        guard.stop()
        cable.close()
    elapsed = time.monotonic() - t0
    worst = max(latencies, default=float("nan"))
    print(f"\n[{name}] {SALES} sales in {elapsed:.1f}s: acks={len(latencies)} max_ack_latency={worst * 1000:.1f}ms "
          f"retransmissions={retx} link_downs={downs} host_error={guard.last_error}")
    expected_error = TLS_HANDSHAKE_FAILED if tls else CONNECT_TIMEOUT
    assert guard.last_error == expected_error, "no connect attempt expired during the run: the test proves nothing"
    finals = [x for x in results if isinstance(x, M.ResultMessage) and not x.in_progress]
    assert len(finals) == SALES, results
    assert all(x.state in (TxnState.DECLINED, TxnState.DEFERRED) for x in finals), [x.state for x in finals]
    assert retx == 0 and downs == 0, f"{retx} retransmissions, {downs} resyncs: the loop stalled"
    assert len(latencies) >= SALES
    assert worst < T2_S, f"an ACK took {worst:.3f}s (T2 is {T2_S}s)"
