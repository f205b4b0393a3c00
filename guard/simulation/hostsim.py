"""A stateful acquirer simulator that counts every debit.

Three layers:

- ``HostCore`` (this module): pure (no sockets, files during ``handle``, clocks or global
  randomness). It keeps a ledger of debits, reversals and tombstones and turns each request into
  ``Reply`` actions (guard.simulation.hosttypes), shaped by seeded or forced network faults. The
  deterministic simulator drives it directly.
- ``HostServer`` (guard.simulation.hostserver): a TCP/TLS adapter in a background thread
  (``selectors`` loop + timer heap) that executes those actions on real sockets.
- ``main`` (guard.simulation.hostcli): the ``posguard hostsim`` entry point.

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

import collections
import contextlib
import csv
import io
import itertools
import json
import os
import random
import threading
from dataclasses import asdict
from typing import Any, Iterable, Mapping

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
    NET_CHECKPOINT,
    NET_ECHO,
    NET_SIGN_ON,
    RC_APPROVED,
    RC_DUPLICATE,
    RC_INVALID_MERCHANT,
    RC_NOT_PERMITTED_TERMINAL,
    RC_ORIGINAL_NOT_FOUND,
    SETTLE_REFUND,
    SETTLE_REVERSAL,
    SETTLE_SALE,
    SETTLEMENT_COLUMNS,
)
from guard.core.errors import ConfigError, HostProtocolError
from guard.hostlink.iso import is_request_mti, mti_class, parse_field90, response_mti, transmission_dt
from guard.core.model import mask_pan
from guard.journal.mac import hmac_sha256
from guard.simulation.hosttypes import (
    ACTION_CLOSE_MID_FRAME,
    ACTION_DROP,
    ACTION_GARBAGE,
    DEFAULT_FAULT_CLASSES,
    DEFAULT_LATE_DELAY_S,
    FAULT_CLOSE_MID_FRAME,
    FAULT_DEBIT_DROP_RESPONSE,
    FAULT_DELAY_RESPONSE,
    FAULT_DROP_REQUEST,
    FAULT_DUPLICATE_RESPONSE,
    FAULT_GARBAGE,
    FAULT_KINDS,
    RC_FORMAT_ERROR,
    RC_INVALID_TRANSACTION,
    RC_TOMBSTONED,
    ApproveRule,
    Debit,
    FaultRecord,
    LedgerKey,
    Reply,
    ReversalRecord,
    SaleRecord,
    default_approve_rule,
)

_SALE_MTIS = frozenset({"0200", "0201", "0220", "0221"})  # financial requests and advices book alike
_REVERSAL_MTIS = frozenset({"0400", "0401", "0420", "0421"})
_NET_CODES = frozenset({NET_SIGN_ON, "002", NET_ECHO, NET_CHECKPOINT})
_ECHOED = ("3", F_AMOUNT, F_STAN, F_TERMINAL_ID, F_MERCHANT_ID, "49")


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
        kind = SETTLE_REFUND if fields.get("3", "").startswith("20") else SETTLE_SALE
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
        return hmac_sha256(self._card_key, pan.encode()).hex()[:16]

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
                    c["net_amount"] += -d.amount if d.type == SETTLE_REFUND else d.amount
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
                    "net_amount": sum(-d.amount if d.type == SETTLE_REFUND else d.amount for d in self._debits if not d.reversed),
                    "refunds": sum(1 for d in self._debits if d.type == SETTLE_REFUND and not d.reversed),
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
                    "type": SETTLE_REVERSAL, "response": r.response}))
            events.sort(key=lambda e: (e[0], e[1]))
            return [e[2] for e in events]

    def write_settlement_csv(self, path: str | os.PathLike[str]) -> None:
        """Settlement export: ``date,tid,mid,stan,rrn,amount,type,response`` (amount in minor units)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SETTLEMENT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(self.settlement_rows())
        _atomic_write(path, buf.getvalue().encode())


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

