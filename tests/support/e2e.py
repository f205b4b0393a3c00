"""The daemon end to end for tests: a guard.toml for a pty reader and a loopback host, the
daemon's own objects (``posguard.run.build``) stepped in a thread, and journal/STATUS helpers.
Shared by the e2e reader, chip and acquirer tests."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from firmware_bridge import messages as M
from firmware_bridge.nullmodem import NullModem
from firmware_bridge.serial_port import open_port
from guard.core.model import TxnState
from guard.journal.keys import init_keys
from guard.simulation.readersim import ReaderSim
from posguard.config import parse
from posguard.run import build
from tests.support.acquirer_host import AcquirerHost

TID, MID = "E2ETERM1", "E2EMERCHANT0001"
PAN = "4761739001010119"
AMOUNT = 1250
SETTLE_S = 20.0  # bound on a reversal's round trip under a loaded machine


def config(tmp: Path, reader_url: str, host_port: int, **host: Any) -> dict[str, Any]:
    return {
        "terminal": {"terminal_id": TID, "merchant_id": MID},
        "reader": {"url": reader_url, "reader_id": "R1"},
        "host": {"address": "127.0.0.1", "port": host_port, "timeout": 1.0, "reversal_timeout": 1.0, **host},
        "journal": {"path": str(tmp / "journal.db"), "keys": str(tmp / "keys")},
        "policy": {"double_swipe_window": 0, "card_max_count": 0, "card_max_amount": 0, "terminal_max_count": 0},
    }


class Guard:
    """The daemon's objects (posguard.run.build) stepped in a thread, as `posguard run` does."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self._cfg = parse(cfg)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        assert self._ready.wait(10) and self.error is None, repr(self.error)

    def _loop(self) -> None:
        try:
            self.svc, self.bridge = build(self._cfg)  # SQLite objects belong to this thread
            self._ready.set()
            try:
                while not self._stop.is_set():
                    self.svc.step(0.01)
            finally:
                self.bridge.link.port.close()
                self.svc.close()
        except BaseException as e:  # surfaced by stop()
            self.error = e
            self._ready.set()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)
        assert self.error is None, repr(self.error)


def journal_kinds(tmp_path: Path, *kinds: str) -> list[tuple[str, dict[str, Any]]]:
    from guard.journal.store import Journal
    from guard.journal.keys import load_keys

    j = Journal.open(tmp_path / "journal.db", load_keys(tmp_path / "keys"), terminal_id=TID)
    try:
        return [(e.kind, e.payload) for e in j.entries() if e.kind in kinds]
    finally:
        j.close()


def status_after(r: ReaderSim, txn: bytes, state: TxnState, deadline: float) -> Any:
    """STATUS of ``txn`` until it leaves ``state`` or the monotonic ``deadline`` passes."""
    final = r.status(txn, timeout=10)
    while isinstance(final, M.ResultMessage) and final.state is state and time.monotonic() < deadline:
        time.sleep(0.1)
        final = r.status(txn, timeout=10)
    return final


@contextlib.contextmanager
def counter(tmp: Path, acq: AcquirerHost, seed: int = 1, reader: dict[str, Any] | None = None,
            **host: Any) -> Iterator[ReaderSim]:
    """The daemon's objects on a fresh journal, talking to ``acq``, and a synced reader on a
    pty null-modem; torn down in order (reader, guard, cable). ``host`` adds [host] keys,
    ``reader`` [reader] keys."""
    if not (tmp / "keys").exists():
        init_keys(tmp / "keys")
    cable = NullModem()
    try:
        cfg = config(tmp, cable.a, acq.port, **host)
        cfg["reader"].update(reader or {})
        guard = Guard(cfg)
        r = ReaderSim(open_port(cable.b), reader_id="R1", rng=random.Random(seed), boot_counter=seed)
        try:
            r.sync(timeout=5)
            yield r
        finally:
            r.close()
            guard.stop()
    finally:
        cable.close()


def settled(r: ReaderSim, res: M.ResultMessage | M.ErrorMessage) -> M.ResultMessage | M.ErrorMessage:
    """The sale's state once a reversal it started has been answered (bounded)."""
    if isinstance(res, M.ResultMessage) and res.state is TxnState.REVERSAL_PENDING:
        final: M.ResultMessage | M.ErrorMessage = status_after(r, res.txn_id, TxnState.REVERSAL_PENDING,
                                                               time.monotonic() + SETTLE_S)
        return final
    return res
