"""Simulated ports for the one ``Executor``: the deterministic simulator drives the same executor
class as the daemon, over a simulated network, a simulated reader and the real journal.

The host port models what a TCP uplink can report: SENT (the message is scheduled on the
simulated network), NOT_SENT (the link is down, or the write failed before any byte left) and,
at a seeded rate, MAYBE_SENT (the connection closed during the send: some of those messages still
reach the host, whose answer is then lost with the connection; others never arrive).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Sequence

from guard.core import constants as C
from guard.core.model import Result
from guard.hostlink.uplink import SendOutcome
from guard.journal.store import Journal

if TYPE_CHECKING:
    from guard.simulation.deterministic import _World


class SimStore:
    """StorePort: the world's real journal, each commit written to the trace."""

    def __init__(self, world: _World) -> None:
        self.w = world

    def _journal(self) -> Journal:
        assert self.w.journal is not None
        return self.w.journal

    def append(self, records: Sequence[tuple[str, str | None, dict[str, Any]]], *, now: float,
               vault_put: Sequence[Any] = (), vault_shred: Sequence[str] = ()) -> Any:
        out = self._journal().append(records, now=now, vault_put=vault_put, vault_shred=vault_shred)
        self.w.log("commit " + ",".join(f"{k}:{(t or '-')[-6:]}" for k, t, _ in records))
        return out

    def vault_open(self, ref: str) -> bytes | None:
        return self._journal().vault_open(ref)

    def maybe_checkpoint(self, now: float) -> bool:
        return self._journal().maybe_checkpoint(now)

    def entries_for(self, txn: str) -> list[Any]:
        return self._journal().entries_for(txn)


class SimHost:
    """HostPort on the simulated network (connection number ``world.conn``)."""

    def __init__(self, world: _World, rng: random.Random) -> None:
        self.w = world
        self.rng = rng

    @property
    def connected(self) -> bool:
        return self.w.up

    def send(self, fields: dict[str, str]) -> SendOutcome:
        w, cfg = self.w, self.w.cfg
        what = f"{fields['t']} stan={fields.get(C.F_STAN)}"
        if w.faults_on:
            r = self.rng.random()
            if r < cfg.not_sent_rate:
                w.log(f"send {what} NOT_SENT")
                return SendOutcome.NOT_SENT
            if r < cfg.not_sent_rate + cfg.maybe_sent_rate:
                arrives = self.rng.random() < 0.5
                w.log(f"send {what} MAYBE_SENT ({'arrives' if arrives else 'lost'})")
                if arrives:  # reached the host just before the close: its answer dies with the connection
                    w.at(cfg.latency, "to_host", (w.conn, fields, True))
                return SendOutcome.MAYBE_SENT
        w.log(f"send {what}")
        w.at(cfg.latency, "to_host", (w.conn, fields))
        return SendOutcome.SENT

    def drop(self, now: float) -> None:
        """The terminal closes the connection; it reconnects after an outage."""
        w = self.w
        w.conn += 1
        w.up = False
        w.at(w.rng.uniform(0.5, w.cfg.outage_s) if w.cfg.outage_s > 0.5 else 0.5, "reconnect", w.conn)

    def cork(self, on: bool) -> None:
        pass


class SimReader:
    """ReaderPort: what the simulated reader is shown, checked against the host at that moment."""

    def __init__(self, world: _World) -> None:
        self.w = world

    def deliver(self, result: Result) -> None:
        w = self.w
        w.shown.setdefault(result.key, []).append(result)
        w.log(f"reply {result.key[-6:]} {result.state.value}{' (in progress)' if result.in_progress else ''}")
        w.check_shown(result)
        w.on_shown(result)
