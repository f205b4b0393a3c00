"""A stateful acquirer simulator that counts every debit.

Three layers:

- ``HostCore``: pure (no sockets, files during ``handle``, clocks or global randomness). It keeps
  a ledger of debits, reversals and tombstones and turns each request into ``Reply`` actions,
  shaped by seeded or forced network faults. The deterministic simulator drives it directly.
- ``HostServer``: a TCP/TLS adapter in a background thread (``selectors`` loop + timer heap)
  that executes those actions on real sockets.
- ``main``: the ``posguard hostsim`` entry point.

Ledger rules (the "no double debit, no silent debit" oracle):

- Key = (41, 42, 11, MMDD of field 7). An approved 0200 (or 0220 advice) creates one record, a debit
  or, for processing code 20xxxx, a refund credit (``type`` REFUND), holding a keyed
  card token (HMAC-SHA256 of the PAN under a key drawn at random for each run, 16 hex), the
  masked PAN, amount, a unique 12-digit RRN and a 6-digit approval code. The clear PAN is never
  stored.
- Duplicate detection ON: a 0200 whose key was already seen is answered 94 without a debit; a
  0201/0221 repeat gets the original answer again. OFF: every request is processed, so a resent sale
  debits twice (what a real host without duplicate detection does).
- Reversal (0400/0401, also 0420/0421): the original key comes from field 90 (STAN + MMDD of the
  original field 7) and 41/42. The first reversal for a key reverses the earliest active debit
  and answers 00. Reversals are idempotent per key: later ones change nothing and get the first
  answer again, except that with duplicate detection ON a repeat MTI (0401/0421) gets 94. All of
  00/25/94 are in ``REVERSAL_DONE_CODES``.
- Reversal for an unknown original: answer 25 and record a tombstone. A 0200 that later arrives
  with a tombstoned key is declined 68 ("too late") and never debited, whatever the duplicate
  detection setting: the reversal overtook it, so the terminal has already given up on it.

Faults (at most one per request; forced ones first, FIFO, then one seeded draw per configured
kind in FAULT_KINDS order; only MTI classes in ``fault_classes``, default 02 and 04, so 0800
keepalives never consume a forced fault):

- ``drop_request``: not processed, no reply.
- ``debit_drop_response``: processed (a sale debits), reply dropped.
- ``delay_response``: processed, reply sent ``late_delay`` seconds later (default above the
  terminal's 30 s timeout).
- ``close_mid_frame``: processed, the first half of the framed reply is sent, then the host
  half-closes and ignores anything else on that connection.
- ``duplicate_response``: processed, the same reply sent twice.
- ``wrong_echo``: processed, reply with one of 41 / 42 / 4 altered (same length).
- ``garbage``: processed or not (seeded coin), then one well-framed undecodable payload
  (first byte 0xFF) instead of a reply, so the terminal sees HOST_UNDECODABLE and stays in sync.
Every applied fault is counted in ``stats()["faults"]`` and logged in ``fault_log``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import hashlib
import heapq
import hmac
import io
import itertools
import json
import os
import random
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from guard.core.constants import (
    F_AMOUNT,
    F_MERCHANT_ID,
    F_NET_MGMT_CODE,
    F_ORIGINAL_DATA,
    F_PAN,
    F_PRIVATE_DATA,
    F_STAN,
    F_TERMINAL_ID,
    F_TRANSMISSION_DT,
    HOST_HEADERS,
    HOST_TIMEOUT_S,
    NET_CHECKPOINT,
    NET_ECHO,
    NET_SIGN_ON,
    RC_APPROVED,
    RC_DO_NOT_HONOUR,
    RC_DUPLICATE,
    RC_INSUFFICIENT_FUNDS,
    RC_INVALID_MERCHANT,
    RC_NOT_PERMITTED_TERMINAL,
    RC_ORIGINAL_NOT_FOUND,
    RC_TOO_LATE,
)
from guard.core.errors import ConfigError, HostProtocolError, KeyFileError
from guard.hostlink.iso import (
    CodecError,
    FrameDecoder,
    HostCodec,
    HostGarbage,
    HostMessage,
    is_request_mti,
    load_spec,
    mti_class,
    parse_field90,
    response_mti,
    swap_tpdu,
    transmission_dt,
)
from guard.core.model import mask_pan

# Response codes used only by the simulator (not in guard.core.constants).
RC_INVALID_TRANSACTION = "12"  # MTI we do not process
RC_FORMAT_ERROR = "30"  # a required field is missing or malformed
RC_TOMBSTONED = RC_TOO_LATE  # original arrived after its own reversal

FAULT_DROP_REQUEST = "drop_request"
FAULT_DEBIT_DROP_RESPONSE = "debit_drop_response"
FAULT_DELAY_RESPONSE = "delay_response"
FAULT_CLOSE_MID_FRAME = "close_mid_frame"
FAULT_DUPLICATE_RESPONSE = "duplicate_response"
FAULT_WRONG_ECHO = "wrong_echo"
FAULT_GARBAGE = "garbage"
FAULT_KINDS: tuple[str, ...] = (
    FAULT_DROP_REQUEST,
    FAULT_DEBIT_DROP_RESPONSE,
    FAULT_DELAY_RESPONSE,
    FAULT_CLOSE_MID_FRAME,
    FAULT_DUPLICATE_RESPONSE,
    FAULT_WRONG_ECHO,
    FAULT_GARBAGE,
)

ACTION_SEND = "send"
ACTION_DROP = "drop"
ACTION_CLOSE_MID_FRAME = "close_mid_frame"
ACTION_GARBAGE = "garbage"

DEFAULT_LATE_DELAY_S = HOST_TIMEOUT_S + 15.0
DEFAULT_FAULT_CLASSES = ("02", "04")  # keepalives (08) are left alone so forced faults hit sales
_SALE_MTIS = frozenset({"0200", "0201", "0220", "0221"})  # financial requests and advices book alike
_REVERSAL_MTIS = frozenset({"0400", "0401", "0420", "0421"})
_NET_CODES = frozenset({NET_SIGN_ON, "002", NET_ECHO, NET_CHECKPOINT})
_ECHOED = ("3", F_AMOUNT, F_STAN, F_TERMINAL_ID, F_MERCHANT_ID, "49")

ApproveRule = Callable[[Mapping[str, str]], str]
LedgerKey = tuple[str, str, str, str]


def default_approve_rule(fields: Mapping[str, str]) -> str:
    """00, except amounts ending in 51 (insufficient funds) or 05 (do not honour)."""
    amount = fields.get(F_AMOUNT, "")
    if amount.endswith("51"):
        return RC_INSUFFICIENT_FUNDS
    if amount.endswith("05"):
        return RC_DO_NOT_HONOUR
    return RC_APPROVED


@dataclass(frozen=True)
class Reply:
    """One thing the adapter must do in answer to a request.

    ``action``: ``send`` the fields; ``drop`` (nothing goes out; ``fields`` shows what would
    have); ``close_mid_frame`` (send the first half of the framed fields, then close);
    ``garbage`` (send ``garbage`` as one well-framed but undecodable message). ``delay`` is
    seconds after the request. ``fault`` names the fault that shaped the reply, if any.
    """

    fields: dict[str, str] | None
    delay: float = 0.0
    action: str = ACTION_SEND
    garbage: bytes = b""
    fault: str | None = None


@dataclass
class Debit:
    id: int
    tid: str
    mid: str
    stan: str
    date: str
    mti: str
    card: str
    masked_pan: str
    amount: int
    currency: str
    rrn: str
    approval_code: str
    at: float
    reversed: bool = False
    reversal_id: int | None = None
    type: str = "SALE"  # SALE (a debit, from 0200 or an 0220 advice) or REFUND (a credit, processing code 20)


@dataclass
class ReversalRecord:
    id: int
    mti: str
    stan: str
    tid: str
    mid: str
    orig_mti: str
    orig_stan: str
    orig_date: str
    amount: int
    response: str
    effect: str  # "reversed", "not_found" (tombstoned) or "repeat" (no change)
    debit_id: int | None
    rrn: str  # the original's RRN; "" when the original was not found
    at: float


@dataclass
class SaleRecord:
    tid: str
    mid: str
    stan: str
    date: str
    mti: str
    amount: int
    rrn: str
    response: str
    debit_id: int | None
    at: float
    type: str = "SALE"


@dataclass
class FaultRecord:
    kind: str
    mti: str
    stan: str
    tid: str
    processed: bool
    forced: bool
    at: float


def _fixed_digits(v: str | None, n: int) -> bool:
    return v is not None and len(v) == n and v.isascii() and v.isdigit()


class HostCore:
    """The acquirer's brain: ``handle(fields, now) -> [Reply]``. Thread-safe (one internal lock)."""

    def __init__(
        self,
        *,
        seed: int,
        dup_detection: bool,
        faults: Mapping[str, float] | None = None,
        approve_rule: ApproveRule | None = None,
        terminal_id: str | None = None,
        merchant_id: str | None = None,
        late_delay: float = DEFAULT_LATE_DELAY_S,
        fault_classes: Iterable[str] = DEFAULT_FAULT_CLASSES,
    ) -> None:
        faults = dict(faults or {})
        for kind, rate in faults.items():
            if kind not in FAULT_KINDS:
                raise ConfigError("hostsim.faults", f"unknown fault kind '{kind}'")
            if not 0.0 <= float(rate) <= 1.0:
                raise ConfigError("hostsim.faults", f"rate for '{kind}' must be within 0..1")
        if late_delay < 0:
            raise ConfigError("hostsim.late_delay", "must be >= 0")
        self.seed = seed
        self.dup_detection = dup_detection
        self.faults = {k: float(v) for k, v in faults.items()}
        self.approve_rule: ApproveRule = approve_rule or default_approve_rule
        self.terminal_id = terminal_id
        self.merchant_id = merchant_id
        self.late_delay = late_delay
        self.fault_classes = frozenset(fault_classes)
        self._fault_rng = random.Random(seed)
        self._data_rng = random.Random(f"posguard.hostsim.data.{seed}")
        # Random per run, never from the seed: the ledger shows each token next to the masked PAN and
        # the seed, and a key anyone can derive would let BIN + last 4 be completed by brute force.
        self._card_key = os.urandom(32)
        self._lock = threading.RLock()
        self._forced: collections.deque[str] = collections.deque()
        self._rrn_seq = itertools.count(1)
        self._debits: list[Debit] = []
        self._by_key: dict[LedgerKey, list[Debit]] = {}
        self._seen: dict[LedgerKey, dict[str, str]] = {}
        self._reversals: list[ReversalRecord] = []
        self._reversal_answer: dict[LedgerKey, ReversalRecord] = {}
        self._tombstones: dict[LedgerKey, float] = {}
        self._sales: list[SaleRecord] = []
        self._checkpoints: list[dict[str, Any]] = []
        self.fault_log: list[FaultRecord] = []
        self._counters: collections.Counter[str] = collections.Counter()
        self._by_mti: collections.Counter[str] = collections.Counter()
        self._by_rc: collections.Counter[str] = collections.Counter()
        self._fault_counts: collections.Counter[str] = collections.Counter()

    # --- faults --------------------------------------------------------------------------------

    def force(self, fault_kind: str, count: int = 1) -> None:
        """Apply ``fault_kind`` to the next ``count`` fault-eligible requests (FIFO after earlier forces)."""
        if fault_kind not in FAULT_KINDS:
            raise ConfigError("hostsim.force", f"unknown fault kind '{fault_kind}'")
        with self._lock:
            self._forced.extend([fault_kind] * count)

    def _pick_fault(self, mti: str) -> tuple[str | None, bool]:
        if mti_class(mti) not in self.fault_classes:
            return None, False
        if self._forced:
            return self._forced.popleft(), True
        chosen: str | None = None
        for kind in FAULT_KINDS:
            rate = self.faults.get(kind, 0.0)
            if rate > 0.0 and self._fault_rng.random() < rate and chosen is None:
                chosen = kind
        return chosen, False

    # --- request handling -------------------------------------------------------------------------

    def handle(self, fields: Mapping[str, str], now: float) -> list[Reply]:
        """Process one request received at ``now``; return what to send back (maybe nothing)."""
        with self._lock:
            mti = fields.get("t", "")
            self._counters["requests"] += 1
            self._by_mti[mti] += 1
            if not is_request_mti(mti):
                self._counters["ignored_non_requests"] += 1
                return []
            fault, forced = self._pick_fault(mti)
            if fault == FAULT_DROP_REQUEST:
                self._record_fault(fault, fields, processed=False, forced=forced, now=now)
                return [Reply(None, action=ACTION_DROP, fault=fault)]
            if fault == FAULT_GARBAGE:
                processed = self._fault_rng.random() < 0.5
                if processed:
                    self._process(fields, now)
                self._record_fault(fault, fields, processed=processed, forced=forced, now=now)
                return [Reply(None, action=ACTION_GARBAGE, garbage=self._garbage_bytes(), fault=fault)]
            resp = self._process(fields, now)
            if fault is None:
                return [Reply(resp)]
            self._record_fault(fault, fields, processed=True, forced=forced, now=now)
            if fault == FAULT_DEBIT_DROP_RESPONSE:
                return [Reply(resp, action=ACTION_DROP, fault=fault)]
            if fault == FAULT_DELAY_RESPONSE:
                return [Reply(resp, delay=self.late_delay, fault=fault)]
            if fault == FAULT_CLOSE_MID_FRAME:
                return [Reply(resp, action=ACTION_CLOSE_MID_FRAME, fault=fault)]
            if fault == FAULT_DUPLICATE_RESPONSE:
                return [Reply(resp, fault=fault), Reply(dict(resp), fault=fault)]
            return [Reply(self._alter_echo(resp), fault=fault)]

    def _record_fault(self, kind: str, fields: Mapping[str, str], *, processed: bool, forced: bool, now: float) -> None:
        self._fault_counts[kind] += 1
        self.fault_log.append(
            FaultRecord(kind, fields.get("t", ""), fields.get(F_STAN, ""), fields.get(F_TERMINAL_ID, ""),
                        processed, forced, now)
        )

    def _garbage_bytes(self) -> bytes:
        n = self._fault_rng.randrange(8, 48)
        return b"\xff" + self._fault_rng.randbytes(n - 1)

    def _alter_echo(self, resp: dict[str, str]) -> dict[str, str]:
        out = dict(resp)
        candidates = [f for f in (F_TERMINAL_ID, F_MERCHANT_ID, F_AMOUNT) if f in out]
        if not candidates:
            out[F_STAN] = f"{(int(out.get(F_STAN, '0') or 0) + 1) % 1_000_000:06d}"
            return out
        f = self._fault_rng.choice(candidates)
        v = out[f]
        if f == F_AMOUNT:
            out[f] = f"{(int(v) + 1) % 10**len(v):0{len(v)}d}"
        else:
            out[f] = v[:-1] + ("X" if v[-1:] != "X" else "Y")
        return out

    def _process(self, fields: Mapping[str, str], now: float) -> dict[str, str]:
        mti = fields["t"]
        if mti_class(mti) == "08":
            return self._network(fields, now)
        if mti in _SALE_MTIS:
            return self._sale(fields, now)
        if mti in _REVERSAL_MTIS:
            return self._reversal(fields, now)
        return self._respond(fields, now, RC_INVALID_TRANSACTION)

    def _respond(self, fields: Mapping[str, str], now: float, rc: str, **extra: str) -> dict[str, str]:
        resp = {"t": response_mti(fields["t"])}
        for f in _ECHOED:
            if f in fields:
                resp[f] = fields[f]
        resp[F_TRANSMISSION_DT] = transmission_dt(now)
        resp.update(extra)
        resp["39"] = rc
        self._by_rc[rc] += 1
        return resp

    def _next_rrn(self) -> str:
        return f"{next(self._rrn_seq) % 10**12:012d}"

    def _terminal_problem(self, tid: str, mid: str) -> str | None:
        if self.terminal_id is not None and tid != self.terminal_id:
            return RC_NOT_PERMITTED_TERMINAL
        if self.merchant_id is not None and mid != self.merchant_id:
            return RC_INVALID_MERCHANT
        return None

    @staticmethod
    def _sale_format_ok(fields: Mapping[str, str]) -> bool:
        pan = fields.get(F_PAN, "")
        return (
            12 <= len(pan) <= 19 and pan.isascii() and pan.isdigit()
            and _fixed_digits(fields.get(F_AMOUNT), 12)
            and _fixed_digits(fields.get(F_TRANSMISSION_DT), 10)
            and _fixed_digits(fields.get(F_STAN), 6)
            and bool(fields.get(F_TERMINAL_ID)) and bool(fields.get(F_MERCHANT_ID))
        )

    def _sale(self, fields: Mapping[str, str], now: float) -> dict[str, str]:
        if not self._sale_format_ok(fields):
            self._counters["format_errors"] += 1
            return self._respond(fields, now, RC_FORMAT_ERROR)
        mti = fields["t"]
        tid, mid, stan = fields[F_TERMINAL_ID], fields[F_MERCHANT_ID], fields[F_STAN]
        key: LedgerKey = (tid, mid, stan, fields[F_TRANSMISSION_DT][:4])
        amount = int(fields[F_AMOUNT])
        bad = self._terminal_problem(tid, mid)
        if bad is not None:
            self._counters["terminal_rejects"] += 1
            return self._respond(fields, now, bad)
        kind = "REFUND" if fields.get("3", "").startswith("20") else "SALE"
        if self.dup_detection and key in self._seen:
            if mti[3] == "1":
                self._counters["repeats_answered"] += 1
                again = dict(self._seen[key])
                self._by_rc[again["39"]] += 1
                return again
            self._counters["duplicates_declined"] += 1
            resp = self._respond(fields, now, RC_DUPLICATE)
            self._sales.append(SaleRecord(tid, mid, stan, key[3], mti, amount, "", RC_DUPLICATE, None, now, kind))
            return resp
        rrn = self._next_rrn()
        debit_id: int | None = None
        extra: dict[str, str] = {"37": rrn}
        if key in self._tombstones:
            self._counters["tombstone_declines"] += 1
            rc = RC_TOMBSTONED
        else:
            rc = self.approve_rule(fields)
            if not (isinstance(rc, str) and len(rc) == 2 and rc.isascii() and rc.isalnum()):
                raise ConfigError("hostsim.approve_rule", "must return a 2-character response code")
        if rc == RC_APPROVED:
            pan = fields[F_PAN]
            approval = f"{self._data_rng.randrange(1, 1_000_000):06d}"
            d = Debit(
                id=len(self._debits) + 1, tid=tid, mid=mid, stan=stan, date=key[3], mti=mti,
                card=self._card_token(pan), masked_pan=mask_pan(pan), amount=amount,
                currency=fields.get("49", ""), rrn=rrn, approval_code=approval, at=now, type=kind,
            )
            self._debits.append(d)
            self._by_key.setdefault(key, []).append(d)
            self._counters["debits"] += 1
            debit_id = d.id
            extra["38"] = approval
        resp = self._respond(fields, now, rc, **extra)
        self._seen[key] = resp
        self._sales.append(SaleRecord(tid, mid, stan, key[3], mti, amount, rrn, rc, debit_id, now, kind))
        return resp

    def _reversal(self, fields: Mapping[str, str], now: float) -> dict[str, str]:
        mti = fields["t"]
        tid, mid, stan = fields.get(F_TERMINAL_ID, ""), fields.get(F_MERCHANT_ID, ""), fields.get(F_STAN, "")
        f90 = fields.get(F_ORIGINAL_DATA, "")
        try:
            orig_mti, orig_stan, orig_f7, _, _ = parse_field90(f90)
        except HostProtocolError:
            orig_mti = orig_stan = orig_f7 = ""
        amount_s = fields.get(F_AMOUNT, "0")
        if not (orig_f7 and tid and mid and _fixed_digits(stan, 6) and amount_s.isdigit()):
            self._counters["format_errors"] += 1
            return self._respond(fields, now, RC_FORMAT_ERROR)
        bad = self._terminal_problem(tid, mid)
        if bad is not None:
            self._counters["terminal_rejects"] += 1
            return self._respond(fields, now, bad)
        key: LedgerKey = (tid, mid, orig_stan, orig_f7[:4])
        amount = int(amount_s)
        first = self._reversal_answer.get(key)
        debit: Debit | None = None
        if first is not None:
            repeat_mti = mti[3] == "1"
            rc = RC_DUPLICATE if (self.dup_detection and repeat_mti) else first.response
            effect, rrn = "repeat", first.rrn
            self._counters["reversal_repeats"] += 1
        else:
            debit = next((d for d in self._by_key.get(key, []) if not d.reversed), None)
            if debit is not None:
                rc, effect, rrn = RC_APPROVED, "reversed", debit.rrn
                self._counters["reversals_applied"] += 1
            else:
                rc, effect, rrn = RC_ORIGINAL_NOT_FOUND, "not_found", ""
                self._tombstones.setdefault(key, now)
                self._counters["tombstones"] += 1
        rec = ReversalRecord(
            id=len(self._reversals) + 1, mti=mti, stan=stan, tid=tid, mid=mid, orig_mti=orig_mti,
            orig_stan=orig_stan, orig_date=orig_f7[:4], amount=amount, response=rc, effect=effect,
            debit_id=debit.id if debit else (first.debit_id if first else None), rrn=rrn, at=now,
        )
        self._reversals.append(rec)
        if debit is not None:
            debit.reversed = True
            debit.reversal_id = rec.id
        if first is None:
            self._reversal_answer[key] = rec
        return self._respond(fields, now, rc, **{"37": rrn or self._next_rrn(), F_ORIGINAL_DATA: f90})

    def _network(self, fields: Mapping[str, str], now: float) -> dict[str, str]:
        code = fields.get(F_NET_MGMT_CODE, "")
        rc = RC_APPROVED if code in _NET_CODES else RC_FORMAT_ERROR
        if code == NET_CHECKPOINT:
            rc = RC_APPROVED if self._keep_checkpoint(fields.get(F_PRIVATE_DATA, ""), now) else RC_FORMAT_ERROR
        resp = self._respond(fields, now, rc)
        if code:
            resp[F_NET_MGMT_CODE] = code
        return resp

    def _keep_checkpoint(self, text: str, now: float) -> bool:
        """Store a deposited journal checkpoint as received (an auditor's anchor); shape only."""
        try:
            cp = json.loads(text)
        except ValueError:
            return False
        if not (isinstance(cp, dict) and isinstance(cp.get("covers_seq"), int) and isinstance(cp.get("sig"), str)):
            return False
        self._checkpoints.append({"received_at": now, "checkpoint": cp})
        self._counters["checkpoints_kept"] += 1
        return True

    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoints terminals deposited (0800 / 880), oldest first."""
        with self._lock:
            return [dict(c["checkpoint"]) for c in self._checkpoints]

    def _card_token(self, pan: str) -> str:
        return hmac.new(self._card_key, pan.encode(), hashlib.sha256).hexdigest()[:16]

    # --- queries ------------------------------------------------------------------------------------

    def net_debits(self, tid: str, mid: str, stan: str | int, mmdd: str) -> int:
        """Active (not reversed) debits for the key; > 1 means a double debit."""
        s = f"{stan:06d}" if isinstance(stan, int) else stan.zfill(6)
        with self._lock:
            return sum(1 for d in self._by_key.get((tid, mid, s, mmdd), []) if not d.reversed)

    def net_by_key(self) -> dict[LedgerKey, int]:
        """Active debit count per ledger key (tid, mid, stan, MMDD), for every key ever debited."""
        with self._lock:
            return {k: sum(1 for d in ds if not d.reversed) for k, ds in self._by_key.items()}

    def total_net_debits(self) -> int:
        with self._lock:
            return sum(1 for d in self._debits if not d.reversed)

    def debits(self) -> list[Debit]:
        with self._lock:
            return [Debit(**asdict(d)) for d in self._debits]

    def ledger(self) -> dict[str, Any]:
        """JSON-serialisable snapshot: debits, reversals, tombstones, per-card counts, totals."""
        with self._lock:
            per_card: dict[str, dict[str, Any]] = {}
            for d in self._debits:
                c = per_card.setdefault(
                    d.card, {"masked_pan": d.masked_pan, "debits": 0, "reversed": 0, "net": 0, "net_amount": 0}
                )
                c["debits"] += 1
                if d.reversed:
                    c["reversed"] += 1
                else:
                    c["net"] += 1
                    c["net_amount"] += -d.amount if d.type == "REFUND" else d.amount
            return {
                "seed": self.seed,
                "dup_detection": self.dup_detection,
                "debits": [asdict(d) for d in self._debits],
                "reversals": [asdict(r) for r in self._reversals],
                "tombstones": [
                    {"tid": k[0], "mid": k[1], "stan": k[2], "date": k[3], "at": at}
                    for k, at in self._tombstones.items()
                ],
                "counts_per_card": per_card,
                "totals": {
                    "debits": len(self._debits),
                    "reversed": sum(1 for d in self._debits if d.reversed),
                    "net_debits": sum(1 for d in self._debits if not d.reversed),
                    "net_amount": sum(-d.amount if d.type == "REFUND" else d.amount for d in self._debits if not d.reversed),
                    "refunds": sum(1 for d in self._debits if d.type == "REFUND" and not d.reversed),
                },
                "faults": [asdict(f) for f in self.fault_log],
                "checkpoints": [dict(c) for c in self._checkpoints],
            }

    def stats(self) -> dict[str, Any]:
        """Counters: requests (total, by MTI), responses by code, faults applied by kind, ledger events."""
        with self._lock:
            return {
                **dict(self._counters),
                "requests_by_mti": dict(self._by_mti),
                "responses_by_rc": dict(self._by_rc),
                "faults": dict(self._fault_counts),
                "faults_forced_pending": len(self._forced),
            }

    def dump_ledger(self, path: str | os.PathLike[str]) -> None:
        """Write ``ledger()`` as JSON atomically (temp file + fsync + rename)."""
        _atomic_write(path, json.dumps(self.ledger(), indent=2, sort_keys=True).encode())

    def settlement_rows(self) -> list[dict[str, str]]:
        """Every processed sale (any response) and every reversal, in arrival order.

        REVERSAL rows carry the *original* STAN and date (the ledger key) and the original RRN
        when it was found, so they join with their SALE row.
        """
        with self._lock:
            events: list[tuple[float, int, dict[str, str]]] = []
            for i, s in enumerate(self._sales):
                events.append((s.at, 2 * i, {
                    "date": s.date, "tid": s.tid, "mid": s.mid, "stan": s.stan, "rrn": s.rrn,
                    "amount": str(s.amount), "type": s.type, "response": s.response}))
            for i, r in enumerate(self._reversals):
                events.append((r.at, 2 * i + 1, {
                    "date": r.orig_date, "tid": r.tid, "mid": r.mid, "stan": r.orig_stan,
                    "rrn": r.rrn, "amount": str(r.amount),
                    "type": "REVERSAL", "response": r.response}))
            events.sort(key=lambda e: (e[0], e[1]))
            return [e[2] for e in events]

    def write_settlement_csv(self, path: str | os.PathLike[str]) -> None:
        """Settlement export: ``date,tid,mid,stan,rrn,amount,type,response`` (amount in minor units)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SETTLEMENT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(self.settlement_rows())
        _atomic_write(path, buf.getvalue().encode())


SETTLEMENT_COLUMNS = ["date", "tid", "mid", "stan", "rrn", "amount", "type", "response"]


def _atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- TCP / TLS adapter ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    id: int
    sock: socket.socket
    decoder: FrameDecoder
    handshaking: bool
    out: bytearray = field(default_factory=bytearray)
    close_after_flush: bool = False
    draining: bool = False
    drain_deadline: float = 0.0
    events: int = selectors.EVENT_READ
    closed: bool = False


class HostServer:
    """Runs ``HostCore`` behind a real listening socket in one background thread.

    Each decoded request is handled on arrival (``time.time()`` as ``now``); replies are written
    on the connection they came from, immediately or from a timer heap when delayed. Garbage
    from a client closes that connection. ``close_mid_frame`` sends half a frame, half-closes
    (FIN) and discards input until the client hangs up or ``linger`` seconds pass.
    """

    def __init__(
        self,
        core: HostCore,
        codec: HostCodec,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        linger: float = 2.0,
    ) -> None:
        self.core = core
        self.codec = codec
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.linger = linger
        self.counters: collections.Counter[str] = collections.Counter()
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._timers: list[tuple[float, int, int, Reply, bytes | None]] = []
        self._timer_seq = itertools.count()

    def start(self) -> int:
        """Bind, listen and start the loop thread; returns the bound port."""
        if self._thread is not None:
            return self.port
        lst = socket.create_server((self.host, self.port), reuse_port=False)
        lst.setblocking(False)
        self.port = lst.getsockname()[1]
        self._listener = lst
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(lst, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"hostsim:{self.port}", daemon=True)
        self._thread.start()
        return self.port

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the loop and close every socket; True if the thread ended within ``timeout``."""
        t = self._thread
        if t is None:
            return True
        self._stop.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        t.join(timeout)
        self._thread = None
        return not t.is_alive()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def write_settlement_csv(self, path: str | os.PathLike[str]) -> None:
        self.core.write_settlement_csv(path)

    def dump_ledger(self, path: str | os.PathLike[str]) -> None:
        self.core.dump_ledger(path)

    # --- loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stop.is_set():
                for key, mask in sel.select(self._next_timeout()):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._service(key.data, mask)
                self._run_timers()
                self._expire_drains()
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            for s in (self._listener, self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            sel.close()

    def _next_timeout(self) -> float:
        now = time.monotonic()
        t = 0.5
        if self._timers:
            t = min(t, self._timers[0][0] - now)
        for c in self._conns.values():
            if c.draining:
                t = min(t, c.drain_deadline - now)
        return max(t, 0.0)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r is not None and self._wake_r.recv(512):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["accept_errors"] += 1
                return
            tls = self.ssl_context is not None
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:
                self.counters["accept_errors"] += 1
                sock.close()
                continue
            conn = _Conn(next(self._ids), sock, self.codec.decoder("host"), handshaking=tls)
            self._conns[conn.id] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self.counters["connections"] += 1
            if tls:
                self._handshake(conn)

    def _set_events(self, conn: _Conn, events: int) -> None:
        if conn.closed or events == conn.events or self._sel is None:
            return
        conn.events = events
        self._sel.modify(conn.sock, events, conn)

    def _handshake(self, conn: _Conn) -> None:
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_events(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError):
            self.counters["tls_failures"] += 1
            self._close(conn)
            return
        conn.handshaking = False
        self._set_events(conn, selectors.EVENT_READ)
        self._read(conn)

    def _service(self, conn: _Conn, mask: int) -> None:
        if conn.closed:
            return
        try:
            if conn.handshaking:
                self._handshake(conn)
                return
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and not conn.closed:
                if conn.draining:
                    self._discard(conn)
                else:
                    self._read(conn)
        except Exception:  # noqa: BLE001 - one bad connection must not kill the simulator
            self.counters["internal_errors"] += 1
            self._close(conn)

    def _read(self, conn: _Conn) -> None:
        reads = 0
        while reads < 16 or (isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending() > 0):
            reads += 1
            try:
                chunk = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            except OSError:
                self._close(conn)
                return
            if not chunk:
                self._close(conn)
                return
            items = conn.decoder.feed(chunk)
            for n, item in enumerate(items):
                if conn.closed or conn.close_after_flush:
                    self.counters["requests_lost_at_close"] += len(items) - n
                    return
                if isinstance(item, HostGarbage):
                    self.counters["client_garbage"] += 1
                    self.counters[f"client_garbage.{item.code}"] += 1
                    self._close(conn)
                    return
                self._dispatch(conn, item)
            if conn.closed or conn.close_after_flush:
                return

    def _discard(self, conn: _Conn) -> None:
        try:
            data = socket.socket.recv(conn.sock, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)

    def _dispatch(self, conn: _Conn, msg: HostMessage) -> None:
        replies = self.core.handle(msg.fields, time.time())
        tpdu = swap_tpdu(msg.tpdu) if msg.tpdu is not None else None
        for r in replies:
            if r.delay > 0:
                due = time.monotonic() + r.delay
                heapq.heappush(self._timers, (due, next(self._timer_seq), conn.id, r, tpdu))
            else:
                self._perform(conn, r, tpdu)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, cid, r, tpdu = heapq.heappop(self._timers)
            conn = self._conns.get(cid)
            if conn is None:
                self.counters["delayed_reply_no_connection"] += 1
                continue
            try:
                self._perform(conn, r, tpdu)
            except Exception:  # noqa: BLE001
                self.counters["internal_errors"] += 1
                self._close(conn)

    def _perform(self, conn: _Conn, r: Reply, tpdu: bytes | None) -> None:
        if conn.closed or conn.close_after_flush or conn.draining:
            self.counters["reply_after_close"] += 1
            return
        if r.action == ACTION_DROP:
            self.counters["replies_dropped"] += 1
            return
        try:
            if r.action == ACTION_GARBAGE:
                data = self.codec.frame(r.garbage, tpdu=tpdu)
            else:
                assert r.fields is not None
                data = self.codec.encode(r.fields, tpdu=tpdu)
        except CodecError:
            self.counters["encode_errors"] += 1
            return
        if r.action == ACTION_CLOSE_MID_FRAME:
            data = data[: max(1, len(data) // 2)]
            conn.close_after_flush = True
        conn.out += data
        self.counters["replies_sent"] += 1
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._set_events(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
                return
            except OSError:
                self._close(conn)
                return
            del conn.out[:n]
        self._set_events(conn, selectors.EVENT_READ)
        if conn.close_after_flush and not conn.draining:
            try:
                socket.socket.shutdown(conn.sock, socket.SHUT_WR)
            except OSError:
                self._close(conn)
                return
            conn.draining = True
            conn.drain_deadline = time.monotonic() + self.linger
            self.counters["closed_mid_frame"] += 1

    def _expire_drains(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.draining and c.drain_deadline <= now]:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.id, None)
        if self._sel is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass


def make_server_context(certfile: str, keyfile: str | None = None, client_cafile: str | None = None) -> ssl.SSLContext:
    """TLS >= 1.2 server context; with ``client_cafile`` clients must present a certificate (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
        if client_cafile:
            ctx.load_verify_locations(cafile=client_cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError):
        raise KeyFileError("hostsim TLS certificate/key/CA cannot be loaded", code="KEY_FILE_INVALID") from None
    return ctx


# --- CLI ----------------------------------------------------------------------------------------


def _fault_arg(s: str) -> tuple[str, float]:
    kind, sep, rate = s.partition("=")
    if not sep or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(f"expected KIND=RATE with KIND in {', '.join(FAULT_KINDS)}")
    try:
        r = float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError("RATE must be a number between 0 and 1") from None
    if not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError("RATE must be between 0 and 1")
    return kind, r


def _port_arg(s: str) -> int:
    try:
        port = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError("PORT must be a number 0-65535 (0: any free port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("PORT must be 0-65535 (0: any free port)")
    return port


def _out_path_problem(path: str | None) -> str | None:
    """Why the ledger or settlement file could not be written at exit, checked before serving."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return f"{path} is a directory"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"directory {parent} is not writable"
    return None


def _tpdu_arg(s: str) -> bytes:
    try:
        b = bytes.fromhex(s)
    except ValueError:
        raise argparse.ArgumentTypeError("TPDU must be 10 hex digits, e.g. 6000010000") from None
    if len(b) != 5 or b[0] != 0x60:
        raise argparse.ArgumentTypeError("TPDU must be 5 bytes starting with 60")
    return b


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posguard hostsim", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stateful ISO 8583 acquirer simulator: answers 0200/0220/0400/0401/0800, keeps a ledger of "
                    "net debits per (41, 42, 11, date of field 7), and injects seeded faults.",
        epilog="fault kinds (--fault KIND=RATE, rate 0..1, repeatable; at most one fault per request):\n"
               "  drop_request         not processed, no reply\n"
               "  debit_drop_response  processed (a sale debits), reply dropped\n"
               "  delay_response       processed, reply sent --late-delay seconds later\n"
               "  close_mid_frame      processed, half the reply sent, then the connection closes\n"
               "  duplicate_response   processed, the reply sent twice\n"
               "  wrong_echo           processed, the reply's 41, 42 or 4 altered\n"
               "  garbage              processed or not, an undecodable frame instead of the reply\n"
               "amounts ending in 51 are declined 51, in 05 declined 05; everything else is approved.\n"
               "exit status: 0 stopped cleanly (SIGINT/SIGTERM or --duration); 2 bad arguments, TLS files, or "
               "the port cannot be listened on; 3 the ledger or settlement file could not be written at exit.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port_arg, default=8583, help="TCP port; 0 picks a free one and prints it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed for faults, approval codes and RRNs (default: %(default)s)")
    p.add_argument("--dup-detection", action=argparse.BooleanOptionalAction, default=True,
                   help="answer a repeated 0200 with 94 instead of debiting it again (default: on)")
    p.add_argument("--fault", action="append", type=_fault_arg, default=[], metavar="KIND=RATE",
                   help="inject a fault kind at this rate (see below)")
    p.add_argument("--late-delay", type=float, default=DEFAULT_LATE_DELAY_S, help="seconds for delay_response")
    p.add_argument("--ledger", metavar="PATH", help="ledger JSON, written on SIGINT/SIGTERM and at exit")
    p.add_argument("--settlement", metavar="PATH", help="settlement CSV, written at exit")
    p.add_argument("--header", choices=HOST_HEADERS, default=HOST_HEADERS[0])
    p.add_argument("--tpdu", type=_tpdu_arg, metavar="HEX")
    p.add_argument("--spec", default="default", metavar="NAME|FILE",
                   help="ISO 8583 spec: default, default_ascii or a pyiso8583 spec JSON file (as host.spec)")
    p.add_argument("--terminal-id", help="accept only this field 41 (others get 58)")
    p.add_argument("--merchant-id", help="accept only this field 42 (others get 03)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA")
    p.add_argument("--duration", type=float, default=0.0, help="stop after N seconds (0: until signalled)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``posguard hostsim``: serve until SIGINT/SIGTERM (or --duration), then dump the ledger."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    for opt, path in (("--ledger", args.ledger), ("--settlement", args.settlement)):
        if (why := _out_path_problem(path)) is not None:
            parser.error(f"{opt}: {why}")
    try:
        core = HostCore(
            seed=args.seed, dup_detection=args.dup_detection, faults=dict(args.fault),
            terminal_id=args.terminal_id, merchant_id=args.merchant_id, late_delay=args.late_delay,
        )
        codec = HostCodec(load_spec(args.spec), header=args.header, tpdu=args.tpdu)
        ctx = make_server_context(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    except (ConfigError, KeyFileError) as e:
        print(f"hostsim: {e}", file=sys.stderr)
        return 2
    server = HostServer(core, codec, args.host, args.port, ssl_context=ctx)
    try:
        port = server.start()
    except OSError as e:
        print(f"hostsim: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"hostsim listening on {args.host}:{port}", flush=True)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    try:
        while not stop.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        server.stop()
        for sig_, handler in previous.items():
            signal.signal(sig_, handler)
        rc = 0
        for path, write in ((args.ledger, core.dump_ledger), (args.settlement, core.write_settlement_csv)):
            if path:
                try:
                    write(path)
                except OSError as e:
                    print(f"hostsim: cannot write {path}: {e.strerror or e}", file=sys.stderr)
                    rc = 3
        totals = core.ledger()["totals"]
        print(
            f"hostsim stopped: {core.stats().get('requests', 0)} requests, "
            f"{totals['debits']} debits, {totals['reversed']} reversed, {totals['net_debits']} net",
            flush=True,
        )
    return rc


__all__ = [
    "ACTION_CLOSE_MID_FRAME",
    "ACTION_DROP",
    "ACTION_GARBAGE",
    "ACTION_SEND",
    "Debit",
    "FAULT_KINDS",
    "HostCore",
    "HostServer",
    "RC_FORMAT_ERROR",
    "RC_INVALID_TRANSACTION",
    "RC_TOMBSTONED",
    "Reply",
    "ReversalRecord",
    "SETTLEMENT_COLUMNS",
    "build_arg_parser",
    "default_approve_rule",
    "main",
    "make_server_context",
]
