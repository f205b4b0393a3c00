"""The guard's end of the reader cable, kept open: a port that disappears is reopened.

A USB serial adapter unplugged, a pty whose other side closed, a device path not there yet at
start: the daemon keeps running (reversals, advices and checkpoint deposits go on in the same
loop), logs the loss once, and tries to reopen the port with a bounded exponential backoff
(REOPEN_MIN_S doubling to REOPEN_MAX_S). ``ReaderPort`` stands in for the pyserial port inside
``SerialLink``: while the port is down, reads return nothing and writes are dropped (the link's
retransmission and the reader's STATUS after a resync recover what was lost; every result is
journaled first). When the port is back the link starts a new epoch (SYNC), as after a reader
reboot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import serial

from firmware_bridge.link import LinkEndpoint
from firmware_bridge.serial_port import SerialLink

log = logging.getLogger("posguard.reader")

REOPEN_MIN_S = 0.5  # first retry after a loss
REOPEN_MAX_S = 30.0  # cap of the doubling retry delay: a re-plugged adapter is picked up within this
STILL_DOWN_LOG_EVERY_S = 300.0  # while the port stays missing, one reminder line per this many seconds
PORT_ERRORS = (OSError, serial.SerialException, ValueError)  # ValueError: pyserial on a closed or bad port


class ReaderPort:
    """Duck-types the pyserial port ``SerialLink`` uses (``in_waiting``, ``read``, ``write``,
    ``fileno``, ``close``) over a port that may come and go. ``attach`` joins it to the
    service loop in place of ``ReaderBridge.attach``."""

    def __init__(self, opener: Callable[[], Any], url: str, *, clock: Callable[[], float] = time.monotonic,
                 reopen_min_s: float = REOPEN_MIN_S, reopen_max_s: float = REOPEN_MAX_S) -> None:
        self.opener = opener
        self.url = url
        self.clock = clock
        self.reopen_min_s = reopen_min_s
        self.reopen_max_s = reopen_max_s
        self.port: Any = None
        self.losses = 0
        self.opens = 0
        self._delay = reopen_min_s
        self._next_open = 0.0
        self._down_since: float | None = None
        self._opened_at = 0.0
        self._logged_at = 0.0
        self._svc: Any = None
        self._fd: int | None = None
        self._link: SerialLink | None = None
        self._on_readable: Callable[[], None] | None = None

    # -- what SerialLink calls --

    @property
    def is_open(self) -> bool:
        return self.port is not None

    @property
    def in_waiting(self) -> int:
        if self.port is None:
            return 0
        try:
            return int(self.port.in_waiting)
        except PORT_ERRORS as e:
            self._lost(e)
            return 0

    def read(self, n: int = 1) -> bytes:
        if self.port is None:
            return b""
        try:
            return bytes(self.port.read(n))
        except PORT_ERRORS as e:
            self._lost(e)
            return b""

    def write(self, data: bytes) -> int:
        if self.port is None:
            return 0
        try:
            return int(self.port.write(data) or 0)
        except PORT_ERRORS as e:
            self._lost(e)
            return 0

    def fileno(self) -> int:
        if self.port is None:
            raise OSError("reader port is not open")
        return int(self.port.fileno())

    def close(self) -> None:
        self._unregister()
        port, self.port = self.port, None
        if port is not None:
            try:
                port.close()
            except PORT_ERRORS:
                pass

    # -- the loop --

    def attach(self, svc: Any, link: SerialLink, on_readable: Callable[[], None]) -> None:
        """Share ``svc``'s loop: ``on_readable`` (the bridge's pump) runs when the port has input
        and every round (link timers); a missing port is retried from the loop."""
        self._svc, self._link, self._on_readable = svc, link, on_readable
        self._try_open(self.clock())

        def tick() -> None:
            if self.port is None:
                self._try_open(self.clock())
            on_readable()

        svc.tickers.append(tick)
        svc.wait_hints.append(self._wait_hint)

    def _wait_hint(self) -> float:
        if self.port is None:
            return max(0.0, min(0.05, self._next_open - self.clock()))
        assert self._link is not None
        return self._link.seconds_until_deadline(cap=0.05)

    def _try_open(self, now: float) -> None:
        if now < self._next_open:
            return
        try:
            self.port = self.opener()
        except PORT_ERRORS as e:
            self.port = None
            self._retry_later(now, e, first=self._down_since is None)
            return
        self.opens += 1
        self._opened_at = now
        fields: dict[str, Any] = {"event": "reader_port_open", "url": self.url}
        if self._down_since is not None:
            fields["down_s"] = round(now - self._down_since, 1)
        self._down_since = None
        log.info("reader port %s open", self.url, extra={"fields": fields})
        if self._svc is not None and self._on_readable is not None:
            try:
                fd = int(self.port.fileno())
                self._svc.register(fd, self._on_readable)
                self._fd = fd
            except (OSError, ValueError):
                log.info("reader port has no file descriptor; polled every loop round")
        if self._link is not None:
            self._link.start()  # a new epoch: the reader resynchronises as after its own reboot

    def _retry_later(self, now: float, e: BaseException, *, first: bool) -> None:
        if first:
            self._down_since = now
        self._next_open = now + self._delay
        if first or now >= self._logged_at + STILL_DOWN_LOG_EVERY_S:
            self._logged_at = now
            log.error("reader port %s unavailable: %s; retrying every %.0f s at most", self.url, _why(e),
                      self.reopen_max_s, extra={"fields": {
                          "event": "reader_port_unavailable", "url": self.url, "reason": _why(e),
                          "down_s": round(now - (self._down_since or now), 1), "code": "READER_PORT_UNAVAILABLE"}})
        self._delay = min(self._delay * 2.0, self.reopen_max_s)

    def _lost(self, e: BaseException) -> None:
        """The port failed under us (EIO, device gone): close it, keep the loop, reopen later."""
        self.losses += 1
        now = self.clock()
        log.error("reader port %s lost: %s; the guard keeps running and reopens it", self.url, _why(e),
                  extra={"fields": {"event": "reader_port_lost", "url": self.url, "reason": _why(e),
                                    "code": "READER_PORT_UNAVAILABLE"}})
        self.close()
        if now - self._opened_at >= self.reopen_max_s:  # it had worked for a while: retry soon
            self._delay = self.reopen_min_s  # (a port that fails right after each open keeps backing off)
        self._down_since = now
        self._logged_at = now
        self._next_open = now + self._delay
        self._delay = min(self._delay * 2.0, self.reopen_max_s)

    def _unregister(self) -> None:
        if self._fd is not None and self._svc is not None:
            try:
                self._svc.unregister(self._fd)
            except (KeyError, ValueError, OSError):
                pass
        self._fd = None


def _why(e: BaseException) -> str:
    """A short reason without a traceback: errno name or the exception's text, bounded."""
    text = str(e) or type(e).__name__
    return text[:160]


def reader_link(opener: Callable[[], Any], url: str, endpoint: LinkEndpoint) -> tuple[ReaderPort, SerialLink]:
    """A ``SerialLink`` over a ``ReaderPort``: what ``posguard run`` hands the ``ReaderBridge``."""
    port = ReaderPort(opener, url)
    return port, SerialLink(port, endpoint)  # type: ignore[arg-type]
