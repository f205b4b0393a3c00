"""ReaderPort: a reader port that is missing or fails is retried with a bounded, doubling delay,
and a port that fails right after each open does not reset that delay (no reopen storm)."""

from __future__ import annotations

from typing import Any

import serial

from firmware_bridge.reader_port import ReaderPort


class FakePort:
    def __init__(self, fail_reads: bool) -> None:
        self.fail_reads = fail_reads
        self.closed = False

    @property
    def in_waiting(self) -> int:
        return 0

    def read(self, n: int) -> bytes:
        if self.fail_reads:
            raise serial.SerialException("read failed: [Errno 5] Input/output error")
        return b""

    def write(self, data: bytes) -> int:
        raise OSError(5, "Input/output error")

    def fileno(self) -> int:
        raise OSError("no fd")

    def close(self) -> None:
        self.closed = True


class Svc:
    def __init__(self) -> None:
        self.tickers: list[Any] = []
        self.wait_hints: list[Any] = []

    def register(self, fd: int, cb: Any) -> None:
        raise AssertionError("FakePort has no fd")

    def unregister(self, fd: int) -> None:
        pass


class Link:
    def __init__(self) -> None:
        self.starts = 0

    def start(self) -> None:
        self.starts += 1

    def seconds_until_deadline(self, cap: float) -> float:
        return cap


def test_missing_port_is_retried_with_a_doubling_delay_capped_at_reopen_max() -> None:
    t = [0.0]
    attempts: list[float] = []

    def opener() -> Any:
        attempts.append(t[0])
        raise serial.SerialException("could not open port /dev/ttyUSB0: [Errno 2] No such file or directory")

    p = ReaderPort(opener, "/dev/ttyUSB0", clock=lambda: t[0], reopen_min_s=0.5, reopen_max_s=8.0)
    p.attach(Svc(), Link(), lambda: None)  # type: ignore[arg-type]
    tick = p._svc.tickers[0]
    for _ in range(4000):  # 200 s in 50 ms rounds
        t[0] += 0.05
        tick()
    gaps = [round(b - a, 1) for a, b in zip(attempts, attempts[1:])]
    assert gaps[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and max(gaps) <= 8.1, gaps
    assert p.port is None and p.opens == 0


def test_io_errors_close_the_port_without_raising_and_flapping_keeps_backing_off() -> None:
    t = [0.0]
    opened: list[float] = []

    def opener() -> Any:
        opened.append(t[0])
        return FakePort(fail_reads=True)

    link = Link()
    p = ReaderPort(opener, "/dev/ttyUSB0", clock=lambda: t[0], reopen_min_s=0.5, reopen_max_s=8.0)
    p.attach(Svc(), link, lambda: p.read(1))  # type: ignore[arg-type]
    assert p.port is not None and link.starts == 1
    assert p.write(b"x") == 0 and p.port is None and p.losses == 1, "a failed write closes the port, no exception"
    tick = p._svc.tickers[0]
    for _ in range(2000):
        t[0] += 0.05
        tick()  # each reopen is lost at once by the read
    gaps = [round(b - a, 1) for a, b in zip(opened, opened[1:])]
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0] and max(gaps) <= 8.1, gaps
    assert link.starts == len(opened), "every reopen starts a new link epoch"
