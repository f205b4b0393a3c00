"""pyserial adapter: open any ``serial_for_url`` URL and pump bytes through a LinkEndpoint.

Thin on purpose: all protocol logic is in ``link`` and ``frame``. Reads never block
(``timeout=0``): pyserial's ``read(n)`` waits the whole timeout when fewer than n bytes arrive,
and ``inter_byte_timeout`` does nothing on POSIX, so we read what ``in_waiting`` reports and
let the parser time byte gaps from the ``now`` we pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import serial

from firmware_bridge.constants import DEFAULT_BAUDRATE, DEFAULT_BYTESIZE, DEFAULT_PARITY, DEFAULT_STOPBITS
from firmware_bridge.link import LinkEndpoint, LinkEvent


def open_port(
    url: str,
    baudrate: int = DEFAULT_BAUDRATE,
    bytesize: int = DEFAULT_BYTESIZE,
    parity: str = DEFAULT_PARITY,
    stopbits: float = DEFAULT_STOPBITS,
    *,
    write_timeout: float | None = 1.0,
) -> serial.Serial:
    """Open a device path or a URL (socket://, rfc2217://, loop://, spy://...) non-blocking,
    no flow control. ``write_timeout`` keeps a stalled peer from blocking the guard forever."""
    # serial_for_url's URL handlers all subclass Serial (in_waiting, reset_input_buffer...).
    return serial.serial_for_url(
        url,
        baudrate=baudrate,
        bytesize=bytesize,
        parity=parity,
        stopbits=stopbits,
        timeout=0,
        write_timeout=write_timeout,
        xonxoff=False,
        rtscts=False,
        dsrdtr=False,
    )


class SerialLink:
    """Moves bytes between a pyserial port and a LinkEndpoint. Serial errors propagate
    (SerialException): the caller closes, reopens and calls ``endpoint.start``."""

    def __init__(
        self,
        port: serial.Serial,
        endpoint: LinkEndpoint,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port = port
        self.endpoint = endpoint
        self.clock = clock

    def fileno(self) -> int:
        """The port's file descriptor for select/poll. Device paths and ptys have one; URL
        ports such as loop:// raise io.UnsupportedOperation (an OSError)."""
        return int(self.port.fileno())

    def pump(self, now: float | None = None) -> list[LinkEvent]:
        """Read what is waiting, feed it, run the timers, write what the endpoint produced
        (ACKs included, before the caller sees the Delivered events)."""
        t = self.clock() if now is None else now
        events: list[LinkEvent] = []
        waiting = self.port.in_waiting
        data = self.port.read(waiting if waiting > 0 else 1)
        if data:
            events += self.endpoint.receive_bytes(data, t)
        events += self.endpoint.tick(t)
        self.flush()
        return events

    def start(self, now: float | None = None) -> list[LinkEvent]:
        events = self.endpoint.start(self.clock() if now is None else now)
        self.flush()
        return events

    def send_message(self, payload: bytes, now: float | None = None) -> None:
        self.endpoint.send_message(payload, self.clock() if now is None else now)
        self.flush()

    def flush(self) -> None:
        out = self.endpoint.bytes_to_send()
        if out:
            self.port.write(out)

    def seconds_until_deadline(self, now: float | None = None, cap: float = 1.0) -> float:
        """How long a caller may sleep in select() before ``pump`` has timer work."""
        t = self.clock() if now is None else now
        d = self.endpoint.next_deadline()
        return cap if d is None else max(0.0, min(cap, d - t))
