"""How real acquirers answer, for the host simulator (guard.simulation.hostsim).

The tables below come from the acquirers' own documentation, never from posguard's engine, so the
simulator's ledger stays an independent oracle (a host that shared the engine's reading of field 39
could never show a silent debit):

- ISO 8583:1987 field 39 table: 00 approved, 08 honour with identification, 10 approved for
  partial amount, 11 approved (VIP), 16 approved, update track 3; 01/02 refer to issuer, 03
  invalid merchant, 04/07 pick up, 05 do not honour, 12 invalid transaction, 13 invalid amount,
  14 invalid card, 15 no such issuer, 30 format error, 41/43 lost/stolen, 51 insufficient funds,
  54 expired, 55 wrong PIN, 57/58 not permitted, 61/65 limits, 62 restricted, 75 PIN tries; 06
  error, 19 re-enter, 68 response too late, 90 cutoff, 91 issuer inoperative, 92 routing, 96
  system malfunction; 94 duplicate transmission; 25 (to a reversal) unable to locate original.
- Nexi GICC provider codes: 09 "request in progress" (a debit may still happen).
- SAP's ISO 8583-1993 action codes and PayEx IFSF: the approved amount of a partial approval in
  field 4, or in field 54 "additional amounts" on hosts that echo field 4.
- jPOS-EE SAF and field reports: hosts that answer a 0401 with 0411, refuse reversals explicitly
  (0410 with a code that is not "done"), stay connected and silent on reversals for minutes, or
  answer a 0200 with the wrong MTI (0230, 0810).

``AcquirerProfile`` sets seeded rates for each of those answer kinds; ``AcquirerAnswers`` is the
per-host state (seeded stream, forced answers, silence windows) that ``HostCore`` consults.
"""
from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass, field, replace
from typing import Mapping

from guard.core.errors import ConfigError

APPROVAL_CODES: Mapping[str, str] = {
    "00": "approved", "08": "honour with identification", "11": "approved (VIP)",
    "16": "approved, update track 3",
}
PARTIAL_CODES: Mapping[str, str] = {"10": "approved for partial amount"}
DECLINE_CODES: Mapping[str, str] = {
    "01": "refer to card issuer", "02": "refer, special condition", "03": "invalid merchant",
    "04": "pick up card", "05": "do not honour", "07": "pick up, special condition",
    "12": "invalid transaction", "13": "invalid amount", "14": "invalid card number",
    "15": "no such issuer", "30": "format error", "41": "lost card", "43": "stolen card",
    "51": "insufficient funds", "54": "expired card", "55": "incorrect PIN",
    "57": "not permitted to cardholder", "58": "not permitted to terminal", "61": "exceeds amount limit",
    "62": "restricted card", "65": "exceeds frequency limit", "75": "PIN tries exceeded",
}
SYSTEM_CODES: Mapping[str, str] = {
    "06": "error", "09": "request in progress (Nexi)", "19": "re-enter transaction",
    "68": "response received too late", "90": "cutoff in progress", "91": "issuer inoperative",
    "92": "routing impossible", "96": "system malfunction",
}
DUPLICATE_CODE = "94"
REVERSAL_DONE_CODES = frozenset({"00", "25", DUPLICATE_CODE})  # reversed / original not found / already reversed

CLASS_APPROVAL, CLASS_PARTIAL, CLASS_DECLINE = "approval", "partial", "decline"
CLASS_DUPLICATE, CLASS_SYSTEM, CLASS_UNKNOWN = "duplicate", "system", "unknown"

PARTIAL_FIELDS = ("4", "54")
REVERSAL_SILENCE, REVERSAL_0411, REVERSAL_REFUSE = "silence", "0411", "refuse"
_SALE_ANSWER_MTIS = frozenset({"0200", "0201"})


def answer_class(rc: str) -> str:
    """The documented class of a field-39 code: approval, partial, decline, duplicate, system or unknown."""
    if rc in APPROVAL_CODES:
        return CLASS_APPROVAL
    if rc in PARTIAL_CODES:
        return CLASS_PARTIAL
    if rc in DECLINE_CODES:
        return CLASS_DECLINE
    if rc == DUPLICATE_CODE:
        return CLASS_DUPLICATE
    return CLASS_SYSTEM if rc in SYSTEM_CODES else CLASS_UNKNOWN


def moves_money(rc: str) -> bool:
    """True for the codes the documentation calls an approval (full or partial)."""
    return answer_class(rc) in (CLASS_APPROVAL, CLASS_PARTIAL)


def books_by_default(rc: str) -> bool:
    """Whether an acquirer answering ``rc`` holds a debit, absent other knowledge: approvals do,
    explicit declines and 94 do not, system and unknown codes may have (assume the worst)."""
    return answer_class(rc) not in (CLASS_DECLINE, CLASS_DUPLICATE)


def field54(amount: int, currency: str) -> str:
    """One field-54 block: account type 00, amount type 02, currency, C (credit sign), 12-digit amount."""
    return f"0002{(currency or '000')[:3]:0>3}C{amount:012d}"


def _code_ok(rc: str) -> bool:
    return len(rc) == 2 and rc.isascii() and rc.isalnum()


def _mti_ok(mti: str) -> bool:
    return len(mti) == 4 and mti.isascii() and mti.isdigit()


def _rate(key: str, v: float) -> float:
    r = float(v)
    if math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ConfigError(key, "rate must be within 0..1")
    return r


@dataclass(frozen=True)
class AcquirerProfile:
    """Seeded rates of the answer kinds real acquirers give (defaults: today's plain host).

    0200/0201 answers (one seeded draw per new sale, instead of the approve rule's answer; the
    shares together at most 1):

    - ``answers``: field-39 code -> share of sales answered with it. Approval codes (00 08 11 16)
      debit the full amount, 10 debits a partial amount (1..amount-1, in ``partial_field`` 4 or
      54), declines and 94 debit nothing, system codes (09 91 96 ...) and codes no table lists
      (Q7, X1) debited in a seeded ``booked_share`` of cases (booked, then answered badly).
    - ``wrong_mti``: response MTI (0230, 0810, ...) -> share of sales the host approved and booked
      but answered with that MTI.

    Reversals (0400/0401/0420/0421):

    - ``reversal_silence``: share of reversals that start a silence of ``reversal_silence_s``
      simulated seconds: the host stays connected and drops every reversal until it ends.
    - ``silence_windows``: (start, end) seconds after the host's first request during which every
      reversal is dropped (``((0, 90),)``: silent on reversals for the first 90 s).
    - ``reversal_refusals``: field-39 code (not 00/25/94) -> share of reversals refused with it
      (0410 + that code; the debit stays).
    - ``reversal_0411``: share of repeat reversals (0401/0421) answered 0411/0431.
    """

    name: str = "default"
    answers: Mapping[str, float] = field(default_factory=dict)
    wrong_mti: Mapping[str, float] = field(default_factory=dict)
    booked_share: float = 0.5
    partial_field: str = "4"
    reversal_silence: float = 0.0
    reversal_silence_s: float = 300.0
    silence_windows: tuple[tuple[float, float], ...] = ()
    reversal_refusals: Mapping[str, float] = field(default_factory=dict)
    reversal_0411: float = 0.0

    def __post_init__(self) -> None:
        k = "hostsim.profile"
        for rc, r in self.answers.items():
            if not _code_ok(rc):
                raise ConfigError(f"{k}.answers", f"'{rc}' is not a 2-character response code")
            _rate(f"{k}.answers", r)
        for mti, r in self.wrong_mti.items():
            if not _mti_ok(mti) or mti == "0210":
                raise ConfigError(f"{k}.wrong_mti", f"'{mti}' is not a wrong MTI for a 0200 (4 digits, not 0210)")
            _rate(f"{k}.wrong_mti", r)
        if sum(self.answers.values()) + sum(self.wrong_mti.values()) > 1.0 + 1e-9:
            raise ConfigError(f"{k}.answers", "the answer and wrong-MTI shares add up to more than 1")
        for rc, r in self.reversal_refusals.items():
            if not _code_ok(rc) or rc in REVERSAL_DONE_CODES:
                raise ConfigError(f"{k}.reversal_refusals", f"'{rc}' is not a refusal (00, 25 and 94 end a reversal)")
            _rate(f"{k}.reversal_refusals", r)
        if sum(self.reversal_refusals.values()) > 1.0 + 1e-9:
            raise ConfigError(f"{k}.reversal_refusals", "the refusal shares add up to more than 1")
        for name in ("booked_share", "reversal_silence", "reversal_0411"):
            _rate(f"{k}.{name}", getattr(self, name))
        if self.partial_field not in PARTIAL_FIELDS:
            raise ConfigError(f"{k}.partial_field", "must be '4' or '54'")
        if not (self.reversal_silence_s >= 0 and math.isfinite(self.reversal_silence_s)):
            raise ConfigError(f"{k}.reversal_silence_s", "must be a finite number of seconds >= 0")
        for w in self.silence_windows:
            if len(w) != 2 or not (0 <= w[0] <= w[1] and math.isfinite(w[1])):
                raise ConfigError(f"{k}.silence_windows", f"{w!r} is not a (start, end) with 0 <= start <= end")

    @property
    def is_plain(self) -> bool:
        """True when the profile changes nothing (the simulator's behaviour before profiles)."""
        return not (any(self.answers.values()) or any(self.wrong_mti.values()) or self.reversal_silence
                    or self.silence_windows or any(self.reversal_refusals.values()) or self.reversal_0411)

    def with_answers(self, answers: Mapping[str, float]) -> AcquirerProfile:
        """A copy with ``answers`` added (2-character codes) or, for 4-digit MTIs, ``wrong_mti`` set."""
        codes = dict(self.answers)
        mtis = dict(self.wrong_mti)
        for key, rate in answers.items():
            (mtis if len(key) == 4 else codes)[key] = rate
        return replace(self, answers=codes, wrong_mti=mtis)

    @classmethod
    def real_world(cls) -> AcquirerProfile:
        """Every documented answer kind on. The rates are not measured: they are chosen so each
        path shows up every few hundred sales and a terminal configured with the defaults
        (6 refusals before manual action, a day's reversal horizon) still drains."""
        return cls(
            name="real-world",
            answers={"08": 0.01, "11": 0.01, "16": 0.005, "10": 0.02, "09": 0.01, "91": 0.01, "96": 0.01,
                     "Q7": 0.005, "X1": 0.005},
            wrong_mti={"0230": 0.005, "0810": 0.005},
            booked_share=0.5,
            reversal_silence=0.02,
            reversal_silence_s=300.0,
            reversal_refusals={"12": 0.02, "96": 0.03},
            reversal_0411=0.5,
        )

    @classmethod
    def for_seed(cls, seed: int, *, partial: bool = True) -> AcquirerProfile:
        """A seeded mix for the deterministic simulation: each kind on or off with its own rate,
        the same for the same seed. Rates are high (a seed has a dozen sales) but refusals stay
        low enough that 20 refusals in a row do not happen; silences last at most 120 s.
        ``partial=False`` leaves out code 10 (same draws otherwise), for a driver whose reader
        cannot answer PARTIAL yet."""
        rng = random.Random(f"posguard.hostsim.acquirer.for_seed.{seed}")
        answers = {rng.choice(("08", "11", "16")): rng.choice((0.0, 0.05, 0.1)),
                   "10": rng.choice((0.0, 0.05, 0.1))}
        for rc in rng.sample(("09", "91", "96"), rng.randrange(0, 3)):
            answers[rc] = rng.choice((0.03, 0.06))
        answers[rng.choice(("Q7", "X1"))] = rng.choice((0.0, 0.03))
        mti, mti_rate = rng.choice(("0230", "0810")), rng.choice((0.0, 0.03))
        first = rng.choice((0.0, 0.0, 30.0, 90.0))
        return cls(
            name=f"seed-{seed}" + ("" if partial else "-no-partial"),
            answers={k: v for k, v in answers.items() if v and (partial or k not in PARTIAL_CODES)},
            wrong_mti={mti: mti_rate} if mti_rate else {},
            booked_share=rng.choice((0.0, 0.5, 1.0)),
            partial_field=rng.choice(PARTIAL_FIELDS),
            reversal_silence=rng.choice((0.0, 0.05, 0.1)),
            reversal_silence_s=rng.choice((10.0, 60.0, 120.0)),
            silence_windows=((0.0, first),) if first else (),
            reversal_refusals={rc: r for rc, r in (("12", rng.choice((0.0, 0.1))), ("96", rng.choice((0.0, 0.1)))) if r},
            reversal_0411=rng.choice((0.0, 1.0)),
        )


@dataclass(frozen=True)
class SaleAnswer:
    """How the host answers one new sale instead of its approve rule.

    ``approved_amount`` None: the full amount (field 4 echoes). ``booked``: the ledger debits
    (``approved_amount`` or the full amount). ``mti``: the response MTI when not 0210.
    """

    rc: str
    booked: bool
    label: str
    mti: str | None = None
    approved_amount: int | None = None
    amount_field: str = "4"
    forced: bool = False


@dataclass(frozen=True)
class _Forced:
    rc: str
    mti: str | None
    approved_amount: int | None
    booked: bool | None
    amount_field: str | None


class AcquirerAnswers:
    """Per-host answer state: the profile, its seeded stream (separate from the fault stream, so a
    plain profile draws nothing and earlier seeds replay unchanged), forced answers, silences."""

    def __init__(self, profile: AcquirerProfile, seed: int) -> None:
        self.profile = profile
        self._rng = random.Random(f"posguard.hostsim.acquirer.{seed}")
        self._forced: collections.deque[_Forced] = collections.deque()
        self._forced_rev: collections.deque[str] = collections.deque()
        self._origin: float | None = None
        self._silent_until = -math.inf
        self.counts: collections.Counter[str] = collections.Counter()

    def set_profile(self, profile: AcquirerProfile) -> None:
        """Swap the profile (e.g. a drain: ``AcquirerProfile()``); ends a silence the old one started."""
        self.profile = profile
        self._silent_until = -math.inf

    @property
    def pending(self) -> int:
        return len(self._forced) + len(self._forced_rev)

    def force_answer(self, rc: str, *, mti: str | None, approved_amount: int | None, booked: bool | None,
                     count: int, amount_field: str | None) -> None:
        if not _code_ok(rc):
            raise ConfigError("hostsim.force_answer", f"'{rc}' is not a 2-character response code")
        if mti is not None and not _mti_ok(mti):
            raise ConfigError("hostsim.force_answer", f"'{mti}' is not a 4-digit MTI")
        if approved_amount is not None and not 0 <= approved_amount < 10**12:
            raise ConfigError("hostsim.force_answer", "approved_amount must be 0..999999999999")
        if amount_field is not None and amount_field not in PARTIAL_FIELDS:
            raise ConfigError("hostsim.force_answer", "amount_field must be '4' or '54'")
        if count < 1:
            raise ConfigError("hostsim.force_answer", "count must be >= 1")
        self._forced.extend([_Forced(rc, mti, approved_amount, booked, amount_field)] * count)

    def force_reversal_answer(self, kind: str, count: int) -> None:
        head, _, arg = kind.partition(":")
        ok = (kind in (REVERSAL_SILENCE, REVERSAL_0411)
              or (head == REVERSAL_REFUSE and _code_ok(arg) and arg not in REVERSAL_DONE_CODES)
              or (head == REVERSAL_SILENCE and _seconds(arg) is not None))
        if not ok:
            raise ConfigError("hostsim.force_reversal_answer",
                              f"'{kind}': expected silence, silence:SECONDS, refuse:CODE (not 00/25/94) or 0411")
        if count < 1:
            raise ConfigError("hostsim.force_reversal_answer", "count must be >= 1")
        self._forced_rev.extend([kind] * count)

    def note_request(self, now: float) -> None:
        if self._origin is None:
            self._origin = now

    def sale_answer(self, mti: str, amount: int) -> SaleAnswer | None:
        """The answer for a new sale (forced first, FIFO; then one seeded draw), or None (approve rule)."""
        if mti not in _SALE_ANSWER_MTIS:
            return None
        p = self.profile
        if self._forced:
            f = self._forced.popleft()
            cls = answer_class(f.rc)
            approved = f.approved_amount
            if approved is None and cls == CLASS_PARTIAL:
                approved = self._partial(amount)
            booked = books_by_default(f.rc) if f.booked is None else f.booked
            label = f"forced:{f.rc}" + (f"/{f.mti}" if f.mti else "")
            return self._count(SaleAnswer(f.rc, booked, label, f.mti, approved, f.amount_field or p.partial_field, True))
        if not (p.answers or p.wrong_mti):
            return None
        u = self._rng.random()
        for key, rate in [*p.answers.items(), *p.wrong_mti.items()]:
            if u >= rate:
                u -= rate
                continue
            if len(key) == 4:
                return self._count(SaleAnswer("00", True, f"wrong_mti:{key}", mti=key))
            cls = answer_class(key)
            if cls == CLASS_PARTIAL:
                return self._count(SaleAnswer(key, True, f"partial:{key}", approved_amount=self._partial(amount),
                                              amount_field=p.partial_field))
            booked = books_by_default(key) and (cls == CLASS_APPROVAL or self._rng.random() < p.booked_share)
            return self._count(SaleAnswer(key, booked, f"{cls}:{key}" + ("+booked" if booked and cls != CLASS_APPROVAL else "")))
        return None

    def rule_answer(self, rc: object, amount: int) -> SaleAnswer:
        """The approve rule's code as an answer: it books exactly when the documentation calls it an approval."""
        if not (isinstance(rc, str) and _code_ok(rc)):
            raise ConfigError("hostsim.approve_rule", "must return a 2-character response code")
        partial = self._partial(amount) if answer_class(rc) == CLASS_PARTIAL else None
        return SaleAnswer(rc, moves_money(rc), f"rule:{rc}", approved_amount=partial, amount_field=self.profile.partial_field)

    def _partial(self, amount: int) -> int:
        return self._rng.randint(1, amount - 1) if amount >= 2 else amount

    def _count(self, a: SaleAnswer) -> SaleAnswer:
        self.counts[a.label] += 1
        return a

    def reversal_silenced(self, now: float) -> str | None:
        """At a reversal's arrival: why the host drops it (``silence...``), or None to go on."""
        if self._forced_rev and self._forced_rev[0].startswith(REVERSAL_SILENCE):
            kind = self._forced_rev.popleft()
            secs = _seconds(kind.partition(":")[2]) or 0.0
            self._silent_until = max(self._silent_until, now + secs)
            label = f"forced:{kind}"
        elif now < self._silent_until:
            label = "silence"
        elif self._origin is not None and any(a <= now - self._origin < b for a, b in self.profile.silence_windows):
            label = "silence:window"
        elif self.profile.reversal_silence and self._rng.random() < self.profile.reversal_silence:
            self._silent_until = now + self.profile.reversal_silence_s
            label = "silence:start"
        else:
            return None
        self.counts[label] += 1
        return label

    def reversal_answer(self, mti: str) -> str | None:
        """For a processed reversal: ``refuse:CODE``, ``0411``, or None (answer normally)."""
        if self._forced_rev:
            kind = self._forced_rev.popleft()
            self.counts[f"forced:{kind}"] += 1
            return kind
        p = self.profile
        chosen: str | None = None
        if p.reversal_refusals:
            u = self._rng.random()
            for rc, rate in p.reversal_refusals.items():
                if u < rate:
                    chosen = f"{REVERSAL_REFUSE}:{rc}"
                    break
                u -= rate
        if chosen is None and p.reversal_0411 and mti[3] == "1" and self._rng.random() < p.reversal_0411:
            chosen = REVERSAL_0411
        if chosen is not None:
            self.counts[chosen] += 1
        return chosen


def _seconds(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) and v >= 0 else None
