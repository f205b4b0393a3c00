"""Journals produced by the real engine, fast (benchmark and test data).

``Gen`` drives ``guard.core.engine.Engine`` with a fake clock against an in-process ``HostCore``
(fields handed over as dicts, no codec), and commits the engine's ``Append`` actions in batches:
records, vault puts and shreds are the engine's own, only the number of commits differs.
``bulk_journal`` writes settled sales straight through ``Journal.append`` in the engine's record
format, for journals too large to drive sale by sale.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.core.engine import Append, Engine, EngineConfig
from guard.core.model import CardData, Request, Result, TxnKind, TxnState
from guard.core.policies import OFF
from guard.hostlink.uplink import SendOutcome
from guard.journal.keys import DeviceKeys, init_keys
from guard.journal.store import Journal
from guard.runtime.executor import DAEMON, Executor
from guard.runtime.service import JournalCrypto
from guard.simulation.hostsim import HostCore

TID, MID = "OPSTEST1", "OPSMERCHANT0001"
PANS = ("4761739001010119", "5413330089020011", "4111111111111111", "5555555555554444", "6011111111111117")
T0 = 1_710_000_000.0  # 2024-03-09 16:00 UTC


class Shown:
    """ReaderPort: the latest result per key."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}

    def deliver(self, result: Result) -> None:
        self.results[result.key] = result


class RecordingHost:
    """HostPort that is always connected and keeps what was sent (fields 2 / 14 filled)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    @property
    def connected(self) -> bool:
        return True

    def send(self, fields: dict[str, str]) -> SendOutcome:
        self.sent.append(fields)
        return SendOutcome.SENT

    def drop(self, now: float) -> None:
        pass

    def cork(self, on: bool) -> None:
        pass


@dataclass
class Gen:
    """Engine + journal + in-process host with batched commits. Use ``close()`` when done."""

    dir: Path
    core: HostCore
    t: float = T0
    step: float = 3.0
    ecfg: EngineConfig = field(default_factory=lambda: EngineConfig(TID, MID, policy=OFF, reversal_timeout_s=5.0,
                                                                    backoff_base_s=1.0, backoff_max_s=4.0))
    keys: DeviceKeys | None = None
    journal_name: str = "journal.db"

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.keys is None:
            self.keys = init_keys(self.dir / "keys")
        self.path = self.dir / self.journal_name
        self.journal = Journal.create(self.path, self.keys, terminal_id=TID, now=self.t)
        self.engine = Engine(self.ecfg, JournalCrypto(self.journal, self.keys.token_key), random.Random(1))
        self._buf: Append | None = None
        self._n = 0
        self.rng = random.Random(7)
        self.host = RecordingHost()
        self.sends = self.host.sent  # delivered after the next flush: write-ahead per batch
        self.ex = Executor(self.engine, self, self.host, Shown(), lambda: self.t, policy=DAEMON)

    # -- plumbing --

    def tick_clock(self, dt: float | None = None) -> float:
        self.t += self.step if dt is None else dt
        return self.t

    def run(self, actions: list[Any]) -> None:
        """Execute through the daemon's executor; commits wait in a buffer until ``flush``."""
        self.ex.run(actions)

    # -- StorePort: the executor's commits are buffered and written in one commit per batch --

    def append(self, records: Sequence[Any], *, now: float,
               vault_put: Sequence[Any] = (), vault_shred: Sequence[str] = ()) -> None:
        if self._buf is None:
            self._buf = Append(list(records), list(vault_put), list(vault_shred))
        else:
            self._buf.records.extend(records)
            self._buf.vault_put.extend(vault_put)
            self._buf.vault_shred.extend(vault_shred)

    def entries_for(self, txn: str) -> list[Any]:
        return self.journal.entries_for(txn)

    def vault_open(self, ref: str) -> bytes | None:
        return self.journal.vault_open(ref)

    def maybe_checkpoint(self, now: float) -> bool:
        return False

    def flush(self) -> None:
        b, self._buf = self._buf, None
        if b is not None and b.records:
            self.journal.append(b.records, now=self.t, vault_put=b.vault_put, vault_shred=b.vault_shred)

    def deliver(self, fields: dict[str, str], *, respond: bool = True, process: bool = True) -> None:
        """Hand one sent message (fields 2 and 14 filled by the executor) to the host; feed its
        answer back unless ``respond`` is False."""
        if not process:
            return
        for r in self.core.handle(dict(fields), self.t):
            if respond and r.fields is not None and r.action == "send":
                self.run(self.engine.host_message(r.fields, self.t))

    def request(self, amount: int | None = None) -> Request:
        self._n += 1
        txn = hashlib.sha256(f"ops:{self.dir}:{self._n}".encode()).digest()[:16]
        amt = amount if amount is not None else self.rng.randrange(100, 99_999)
        return Request("R1", txn, TxnKind.SALE, amt, "978", CardData(PANS[self._n % len(PANS)], "2912"))

    # -- scenarios --

    def host_up(self) -> None:
        self.run(self.engine.on_host_up(self.t))
        self._drain_sends(respond=True)

    def sales(self, n: int, *, batch: int = 500, respond: bool = True, process: bool = True,
              amount: int | None = None) -> list[str]:
        """``n`` sales sent to the host. respond=False: the host acted (debit) but the answer was
        lost; process=False: the request never arrived. Both leave the sale SENT."""
        keys = []
        for b in range(0, n, batch):
            for _ in range(min(batch, n - b)):
                req = self.request(amount)
                keys.append(req.key)
                self.tick_clock()
                self.run(self.engine.submit(req, self.t))
            self.flush()
            self._drain_sends(respond=respond, process=process)
            self.flush()
        return keys

    def _drain_sends(self, *, respond: bool, process: bool = True) -> None:
        sends = list(self.sends)
        self.sends.clear()
        for s in sends:
            self.deliver(s, respond=respond, process=process)
        self.flush()

    def host_down(self) -> None:
        """The connection drops: every SENT sale becomes REVERSAL_PENDING (HOST_DISCONNECTED)."""
        self.sends.clear()
        self.run(self.engine.on_host_down(self.t))
        self.flush()

    def no_host_sales(self, n: int) -> list[str]:
        """Sales while the host is down: DECLINED NO_HOST, nothing sent."""
        keys = []
        for _ in range(n):
            req = self.request()
            keys.append(req.key)
            self.tick_clock()
            self.run(self.engine.submit(req, self.t))
        self.flush()
        return keys

    def exhaust_reversals(self, rounds: int = 200) -> None:
        """Host up but every reversal is refused (0410 with 96, the debit stays): attempts until
        the cap of explicit refusals -> NEEDS_MANUAL. (Silence alone never reaches the cap.)"""
        self.run(self.engine.on_host_up(self.t))
        for _ in range(rounds):
            sends = list(self.sends)
            self.sends.clear()
            for s in sends:
                if s["t"] in ("0400", "0401"):
                    refusal = {k: s[k] for k in ("11", "41", "42")} | {"t": "0410", "39": "96"}
                    self.run(self.engine.host_message(refusal, self.t))
            self.flush()
            if not self.engine.pending_reversals():
                break
            self.tick_clock(self.ecfg.reversal_timeout_s + self.ecfg.backoff_max_s + 1)
            self.run(self.engine.tick(self.t))
            self.flush()
        self.sends.clear()
        self.engine.host_up = False

    def close(self) -> None:
        self.flush()
        self.journal.close()

    def states(self) -> dict[str, TxnState]:
        return {k: t.state for k, t in self.engine.txns.items()}


def bulk_journal(path: Path, keys: DeviceKeys, n: int, *, t0: float = T0, step: float = 3.0,
                 batch: int = 1000, seed: int = 3, tid: str = TID) -> list[dict[str, str]]:
    """``n`` settled sales written straight through ``Journal.append`` (2000 records per commit),
    in the engine's record format (intent, outcome), with a stan_use every 1000 sales. Returns
    the matching settlement rows (hostsim columns): the journal and the host agree exactly."""
    from guard.hostlink.iso import transmission_dt
    from guard.core.model import mask_pan

    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    j = Journal.create(path, keys, terminal_id=tid, now=t0)
    stan = 0
    try:
        for b in range(0, n, batch):
            recs: list[tuple[str, str | None, dict[str, Any]]] = []
            ts = t0 + b * step
            for i in range(b, min(n, b + batch)):
                stan = stan % 999_999 + 1
                ts = t0 + i * step
                key = f"R1:{hashlib.sha256(f'bulk:{seed}:{i}'.encode()).hexdigest()[:32]}"
                amount = rng.randrange(100, 99_999)
                f7 = transmission_dt(ts)
                pan = PANS[i % len(PANS)]
                recs.append(("intent", key, {
                    "kind": "SALE", "fp": hashlib.sha256(key.encode()).hexdigest()[:32], "amount": amount,
                    "currency": "978", "card_token": hashlib.sha256(pan.encode()).hexdigest()[:32],
                    "masked_pan": mask_pan(pan), "vault_ref": hashlib.sha256(f"v{i}".encode()).hexdigest(),
                    "stan": stan, "f7": f7, "tid": tid, "mid": MID}))
                rrn = f"{i + 1:012d}"
                ok = str(amount)[-2:] not in ("51", "05")
                rc = "00" if ok else ("51" if str(amount).endswith("51") else "05")
                recs.append(("outcome", key, {"state": "APPROVED" if ok else "DECLINED", "rc": rc,
                                              "approval": f"{i % 999_999 + 1:06d}" if ok else "", "rrn": rrn,
                                              "reason": "" if ok else "HOST_DECLINED"}))
                rows.append({"date": f7[:4], "tid": tid, "mid": MID, "stan": f"{stan:06d}", "rrn": rrn,
                             "amount": str(amount), "type": "SALE", "response": rc})
                if i % 1000 == 999:
                    stan = stan % 999_999 + 1
                    recs.append(("stan_use", None, {"stan": stan, "purpose": "echo"}))
            j.append(recs, now=ts)
    finally:
        j.close()
    return rows
