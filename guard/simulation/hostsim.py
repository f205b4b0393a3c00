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

- Key = (41, 42, 11, MMDD of field 7). A 0200 (or 0220 advice) the host books creates one record,
  a debit or, for processing code 20xxxx, a refund credit (``type`` REFUND), holding a keyed
  card token (HMAC-SHA256 of the PAN under a key drawn at random for each run, 16 hex), the
  masked PAN, amount (the approved amount of a partial), the answer's field 39, a unique 12-digit
  RRN and a 6-digit approval code. The clear PAN is never stored. The host books every answer the
  acquirers' documentation calls an approval (00 08 11 16, and 10 for its partial amount), whoever
  chose it (approve rule, profile, ``force_answer``), and other answers only when the profile or a
  forced answer says it booked them.
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

Acquirer answers (``AcquirerProfile``, guard.simulation.acquirer; the default changes nothing):
a new 0200/0201 may be answered 08/11/16 (debit), 10 (partial debit, amount in field 4 or 54), a
system or unknown code (debited in a seeded share of cases), or with a wrong MTI (debited);
reversals may meet a silence (dropped, checked before faults), an explicit refusal (0410 with 12
or 96, debit stays) or a 0411. Whatever posguard makes of an answer, the ledger debits every
answer the acquirers' documentation calls an approval, and an ambiguous one exactly when the
host booked it. ``force_answer`` / ``force_reversal_answer`` queue answers for tests; counts are in
``stats()["answers"]``.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import threading
from typing import Any, Iterable, Mapping

from guard.core.constants import (
    F_ADDITIONAL_AMOUNTS, F_AMOUNT, F_APPROVAL_CODE, F_CURRENCY, F_MERCHANT_ID, F_NET_MGMT_CODE, F_ORIGINAL_DATA,
    F_PAN, F_PRIVATE_DATA, F_RRN, F_STAN, F_TERMINAL_ID, F_TRANSMISSION_DT, NET_CHECKPOINT, NET_ECHO, NET_SIGN_ON,
    RC_APPROVED, RC_DUPLICATE, RC_INVALID_MERCHANT, RC_NOT_PERMITTED_TERMINAL, RC_ORIGINAL_NOT_FOUND,
    SETTLE_REFUND, SETTLE_SALE,
)
from guard.core.errors import ConfigError, HostProtocolError
from guard.hostlink.iso import is_request_mti, mti_class, parse_field90, response_mti, transmission_dt
from guard.core.model import mask_pan
from guard.journal.mac import hmac_sha256
from guard.simulation import hostledger
from guard.simulation.acquirer import (
    REVERSAL_0411, REVERSAL_REFUSE, AcquirerAnswers, AcquirerProfile, SaleAnswer, field54, moves_money,
)
from guard.simulation.hosttypes import (
    ACTION_CLOSE_MID_FRAME, ACTION_DROP, ACTION_GARBAGE, DEFAULT_FAULT_CLASSES, DEFAULT_LATE_DELAY_S,
    FAULT_CLOSE_MID_FRAME, FAULT_DEBIT_DROP_RESPONSE, FAULT_DELAY_RESPONSE, FAULT_DROP_REQUEST,
    FAULT_DUPLICATE_RESPONSE, FAULT_GARBAGE, FAULT_KINDS, RC_FORMAT_ERROR, RC_INVALID_TRANSACTION, RC_TOMBSTONED,
    ApproveRule, Debit, FaultRecord, LedgerKey, Reply, ReversalRecord, SaleRecord, alter_echo,
    default_approve_rule, garbage_bytes,
)

_SALE_MTIS = frozenset({"0200", "0201", "0220", "0221"})  # financial requests and advices book alike
_REVERSAL_MTIS = frozenset({"0400", "0401", "0420", "0421"})
_NET_CODES = frozenset({NET_SIGN_ON, "002", NET_ECHO, NET_CHECKPOINT})
_ECHOED = ("3", F_AMOUNT, F_STAN, F_TERMINAL_ID, F_MERCHANT_ID, "49")


CHIP_ENTRY_MODES = frozenset({"05", "07"})  # field 22: chip, contactless chip
F_POS_ENTRY_MODE, F_ICC = "22", "55"


def issuer_auth_data(arpc: bytes, rc: str) -> str:
    """Field 55 of a 0210 for a chip sale: tag 91, the ARPC and the 2-character response code, as hex."""
    value = arpc + rc.encode("ascii")[:2]
    return ("91" + f"{len(value):02X}" + value.hex()).upper()


def _fixed_digits(v: str | None, n: int) -> bool:
    return v is not None and len(v) == n and v.isascii() and v.isdigit()


class HostCore(hostledger.LedgerViews):
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
        profile: AcquirerProfile | None = None,
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
        self._answers = AcquirerAnswers(profile or AcquirerProfile(), seed)
        self._last_answer: str | None = None

    # --- acquirer answers ------------------------------------------------------------------------

    @property
    def profile(self) -> AcquirerProfile:
        """The acquirer answer profile; assign ``AcquirerProfile()`` to turn it off (forced answers stay)."""
        return self._answers.profile

    @profile.setter
    def profile(self, profile: AcquirerProfile) -> None:
        with self._lock:
            self._answers.set_profile(profile)

    def force_answer(self, rc: str, *, mti: str | None = None, approved_amount: int | None = None,
                     booked: bool | None = None, count: int = 1, amount_field: str | None = None) -> None:
        """Answer the next ``count`` new 0200/0201 sales with field 39 ``rc`` (FIFO, before the profile).

        Counts only sales the host processes as new (not format errors, terminal rejects, 94
        duplicates, 68 tombstones, requests a fault dropped unprocessed). ``mti``: answer with this
        MTI instead of 0210. ``approved_amount``: written into field 4 or 54 (``amount_field``,
        default the profile's ``partial_field``) and the amount debited; for 10 it defaults to a
        seeded 1..amount-1. ``booked``: whether the ledger debits; default from the code's
        documented class (approvals and 10 book, declines and 94 do not, system and unknown codes do).
        """
        with self._lock:
            self._answers.force_answer(rc, mti=mti, approved_amount=approved_amount, booked=booked, count=count,
                                       amount_field=amount_field)

    def force_reversal_answer(self, kind: str, count: int = 1) -> None:
        """Answer the next ``count`` reversals (0400/0401/0420/0421) with ``kind`` (FIFO):

        ``silence`` (dropped unprocessed at arrival), ``silence:SECONDS`` (dropped, and so is every
        reversal arriving within SECONDS after it), ``refuse:CODE`` (0410 with CODE, not 00/25/94:
        nothing reversed) or ``0411`` (processed, answered 0411, or 0431 to an 0420/0421).
        """
        with self._lock:
            self._answers.force_reversal_answer(kind, count)

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
            self._answers.note_request(now)
            if mti in _REVERSAL_MTIS and (why := self._answers.reversal_silenced(now)) is not None:
                self._counters["reversals_silenced"] += 1
                return [Reply(None, action=ACTION_DROP, answer=why)]
            fault, forced = self._pick_fault(mti)
            if fault == FAULT_DROP_REQUEST:
                self._record_fault(fault, fields, processed=False, forced=forced, now=now)
                return [Reply(None, action=ACTION_DROP, fault=fault)]
            if fault == FAULT_GARBAGE:
                processed = self._fault_rng.random() < 0.5
                self._last_answer = None
                if processed:
                    self._process(fields, now)
                self._record_fault(fault, fields, processed=processed, forced=forced, now=now)
                return [Reply(None, action=ACTION_GARBAGE, garbage=garbage_bytes(self._fault_rng), fault=fault,
                              answer=self._last_answer)]
            resp = self._process(fields, now)
            a = self._last_answer
            if fault is None:
                return [Reply(resp, answer=a)]
            self._record_fault(fault, fields, processed=True, forced=forced, now=now)
            if fault == FAULT_DEBIT_DROP_RESPONSE:
                return [Reply(resp, action=ACTION_DROP, fault=fault, answer=a)]
            if fault == FAULT_DELAY_RESPONSE:
                return [Reply(resp, delay=self.late_delay, fault=fault, answer=a)]
            if fault == FAULT_CLOSE_MID_FRAME:
                return [Reply(resp, action=ACTION_CLOSE_MID_FRAME, fault=fault, answer=a)]
            if fault == FAULT_DUPLICATE_RESPONSE:
                return [Reply(resp, fault=fault, answer=a), Reply(dict(resp), fault=fault, answer=a)]
            return [Reply(alter_echo(resp, self._fault_rng), fault=fault, answer=a)]

    def _record_fault(self, kind: str, fields: Mapping[str, str], *, processed: bool, forced: bool, now: float) -> None:
        self._fault_counts[kind] += 1
        self.fault_log.append(
            FaultRecord(kind, fields.get("t", ""), fields.get(F_STAN, ""), fields.get(F_TERMINAL_ID, ""),
                        processed, forced, now)
        )

    def _process(self, fields: Mapping[str, str], now: float) -> dict[str, str]:
        self._last_answer = None
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
        chip = fields.get(F_POS_ENTRY_MODE, "")[:2] in CHIP_ENTRY_MODES
        if chip and not fields.get(F_ICC):  # an acquirer declines a chip sale without its ICC data
            self._counters["chip_without_icc"] += 1
            return self._respond(fields, now, RC_FORMAT_ERROR)
        rrn = self._next_rrn()
        debit_id: int | None = None
        extra: dict[str, str] = {F_RRN: rrn}
        answer = None if key in self._tombstones else self._answers.sale_answer(mti, amount)
        if answer is not None:
            self._last_answer = answer.label
        elif key in self._tombstones:
            self._counters["tombstone_declines"] += 1
            answer = SaleAnswer(RC_TOMBSTONED, False, "tombstone")
        else:
            answer = self._answers.rule_answer(self.approve_rule(fields), amount)
        rc = answer.rc
        booked_amount = amount if answer.approved_amount is None else answer.approved_amount
        approval = ""
        if answer.booked or moves_money(rc):
            approval = f"{self._data_rng.randrange(1, 1_000_000):06d}"
            if moves_money(rc):
                extra[F_APPROVAL_CODE] = approval
        if answer.booked:
            pan = fields[F_PAN]
            d = Debit(
                id=len(self._debits) + 1, tid=tid, mid=mid, stan=stan, date=key[3], mti=mti,
                card=self._card_token(pan), masked_pan=mask_pan(pan), amount=booked_amount,
                currency=fields.get(F_CURRENCY, ""), rrn=rrn, approval_code=approval, at=now, type=kind,
                response=rc, requested_amount=None if booked_amount == amount else amount,
            )
            self._debits.append(d)
            self._by_key.setdefault(key, []).append(d)
            self._counters["debits"] += 1
            debit_id = d.id
        if answer.approved_amount is not None:
            if answer.amount_field == F_ADDITIONAL_AMOUNTS:
                extra[F_ADDITIONAL_AMOUNTS] = field54(booked_amount, fields.get(F_CURRENCY, ""))
            else:
                extra[F_AMOUNT] = f"{booked_amount:012d}"
        if chip and moves_money(rc):  # issuer authentication data (ARPC + response code) for the card
            self._counters["chip_sales"] += 1
            extra[F_ICC] = issuer_auth_data(self._data_rng.randbytes(8), rc)
        resp = self._respond(fields, now, rc, **extra)
        if answer.mti is not None:
            resp["t"] = answer.mti
        self._seen[key] = resp
        self._sales.append(SaleRecord(tid, mid, stan, key[3], mti, amount, rrn, rc, debit_id, now, kind,
                                      booked_amount if debit_id is not None and booked_amount != amount else None))
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
        special = self._answers.reversal_answer(mti)
        self._last_answer = special
        if special is not None and special.startswith(REVERSAL_REFUSE):
            return self._refuse_reversal(fields, now, key, special.partition(":")[2])
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
        resp = self._respond(fields, now, rc, **{F_RRN: rrn or self._next_rrn(), F_ORIGINAL_DATA: f90})
        if special == REVERSAL_0411:
            resp["t"] = f"{mti[:2]}{int(mti[2]) + 1}1"
        return resp

    def _refuse_reversal(self, fields: Mapping[str, str], now: float, key: LedgerKey, rc: str) -> dict[str, str]:
        """An explicit refusal: 0410 with ``rc``; nothing reversed, no tombstone, the next reversal is judged afresh."""
        live = next((d for d in self._by_key.get(key, []) if not d.reversed), None)
        self._counters["reversals_refused"] += 1
        self._reversals.append(ReversalRecord(
            id=len(self._reversals) + 1, mti=fields["t"], stan=fields[F_STAN], tid=key[0], mid=key[1],
            orig_mti=fields[F_ORIGINAL_DATA][:4], orig_stan=key[2], orig_date=key[3],
            amount=int(fields.get(F_AMOUNT, "0")), response=rc, effect="refused",
            debit_id=live.id if live else None, rrn=live.rrn if live else "", at=now,
        ))
        return self._respond(fields, now, rc, **{F_RRN: live.rrn if live else self._next_rrn(),
                                                 F_ORIGINAL_DATA: fields[F_ORIGINAL_DATA]})

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

    def _card_token(self, pan: str) -> str:
        return hmac_sha256(self._card_key, pan.encode()).hex()[:16]

    # --- queries (more in hostledger.LedgerViews) ---------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: requests (total, by MTI), responses by code, faults applied by kind, ledger events."""
        with self._lock:
            return {
                **dict(self._counters),
                "requests_by_mti": dict(self._by_mti),
                "responses_by_rc": dict(self._by_rc),
                "faults": dict(self._fault_counts),
                "faults_forced_pending": len(self._forced),
                "answers": dict(self._answers.counts),
                "answers_forced_pending": self._answers.pending,
            }


_atomic_write = hostledger.atomic_write  # the old name, still used by tests/integration/test_audit_leaks.py
