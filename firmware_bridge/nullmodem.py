"""A virtual null-modem cable: two pty pairs whose masters are joined by a relay thread.

Both ends are real tty devices (``a`` and ``b`` paths), so the guard and a reader each open a
port exactly as on hardware (pyserial, ``open_port(path)``). Used by the demo and the end-to-end
tests; it needs no external tool (socat, tty0tty).
"""

from __future__ import annotations

import os
import pty
import select
import threading
import tty


class NullModem:
    """``NullModem()`` then open ``.a`` on one side and ``.b`` on the other; ``close()`` ends it."""

    def __init__(self) -> None:
        self._m1, self._s1 = pty.openpty()
        self._m2, self._s2 = pty.openpty()
        for fd in (self._m1, self._s1, self._m2, self._s2):
            tty.setraw(fd)
        self.a = os.ttyname(self._s1)
        self.b = os.ttyname(self._s2)
        self.bytes_relayed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="nullmodem", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        peer = {self._m1: self._m2, self._m2: self._m1}
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(list(peer), [], [], 0.05)
            except (OSError, ValueError):
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: the slave side is closed for now; keep the cable up
                    continue
                if data:
                    self.bytes_relayed += len(data)
                    try:
                        os.write(peer[fd], data)
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        for fd in (self._m1, self._s1, self._m2, self._s2):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> NullModem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
