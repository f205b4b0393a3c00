"""Reconcile the journal with the acquirer's settlement report.

Settlement CSV (``guard.core.constants.SETTLEMENT_COLUMNS``; what ``HostCore.write_settlement_csv`` writes): a header line naming at least
``date,tid,mid,stan,rrn,amount,type,response`` (any order; other columns are ignored), then one
row per host event in arrival order:

  date      MMDD of the ORIGINAL sale's field 7 (the host's ledger date)
  tid, mid  ISO 8583 fields 41 and 42
  stan      6 digits: the ORIGINAL sale's STAN (REVERSAL rows too)
  rrn       field 37 (up to 12 alphanumerics); empty when the host had none (e.g. a 94 duplicate)
  amount    minor units, digits only
  type      SALE (every 0200/0201/0220/0221 the host processed, whatever the answer), REFUND (the
            same for processing code 20: a credit) or REVERSAL. A REFUND row books like a SALE row:
            each transaction has its own key, so "net" counts the refund's one credit
  response  field 39 the host answered (2 characters)

The host's view of one sale (key = tid, mid, stan, date): every SALE row answered with an
approval (``BOOKED_CODES``: 00, 08, 11, 16 and the partial approval 10, for the amount in the row)
is a debit; the FIRST REVERSAL row of the key decides: ``00`` means the earliest debit was reversed,
``25`` that the original was not found. Later reversal rows change nothing (reversals are
idempotent per key). Net debits = debits - (1 if that first reversal was ``00``).

Only rows of this journal's terminal (``tid``) are used, and only journal sales whose date
appears in those rows (or in ``dates``) are compared: a settlement file covers some days.

Discrepancies (category -> action):
  FAILED_BUT_DEBITED     the host holds a debit the terminal shows as not charged:
                           DECLINED / NEEDS_MANUAL -> QUEUE_REVERSAL (safe: undoes exactly that debit)
                           REVERSAL_PENDING / JOURNALED (in flight at a crash) -> NONE (replay reverses it)
                           DEFERRED (an offline sale whose 0220 may be booked) -> NONE (replay settles it)
                           AWAITING_COMPLETION (the card's decision pending) -> NONE (completed or reversed)
                           HELD, or no such sale in the journal -> FLAG_REFUND
  REVERSED_BUT_SETTLED   terminal REVERSED, debit still settled -> FLAG_REFUND (the host already
                         answered the reversal; sending it again changes nothing)
  APPROVED_MISSING_AT_HOST  terminal APPROVED, no net debit -> NONE (merchant not paid: investigate;
                         a sale is never re-sent)
  AMOUNT_MISMATCH        both hold one debit, amounts differ -> FLAG_REFUND if the host took more, else NONE
  DOUBLE_DEBIT           terminal APPROVED, host holds 2+ net debits -> FLAG_REFUND

``apply`` appends, for each QUEUE_REVERSAL item whose sale is still DECLINED or NEEDS_MANUAL,
a ``reversal_pending`` record (reason RECONCILE) through the Journal API in one commit; the
engine's restore queues it and the next ``posguard replay`` (or the daemon) sends the 0400/0401.
Nothing else is ever written.

Error codes: SETTLEMENT_INVALID (``SettlementError``, with ``line`` and ``column``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guard.core import constants as C
from guard.core.constants import SETTLE_REFUND, SETTLE_REVERSAL, SETTLE_SALE, SETTLEMENT_COLUMNS
from guard.core.errors import PosguardError
from guard.ops.export import JournalView, TxnView, build_view, is_void

# Header names a host report may use instead: the ISO 8583 field numbers (41, 42, 11, 37, 39, 4).
COLUMN_ALIASES = {"41": "tid", "42": "mid", "11": "stan", "37": "rrn", "39": "response", "4": "amount"}
from guard.journal.store import Journal
from guard.core.model import TxnState, mask_pan

QUEUE_REVERSAL = "QUEUE_REVERSAL"
FLAG_REFUND = "FLAG_REFUND"
NONE = "NONE"
FAILED_BUT_DEBITED = "FAILED_BUT_DEBITED"
REVERSED_BUT_SETTLED = "REVERSED_BUT_SETTLED"
APPROVED_MISSING = "APPROVED_MISSING_AT_HOST"
AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
DOUBLE_DEBIT = "DOUBLE_DEBIT"
CATEGORIES = (FAILED_BUT_DEBITED, REVERSED_BUT_SETTLED, APPROVED_MISSING, AMOUNT_MISMATCH, DOUBLE_DEBIT)
RECONCILE_REASON = "RECONCILE"
# Settlement rows that are debits: the approval classes of the default host profile (an acquirer
# books 08/11/16 like 00, and a 10 for its partial amount). The settlement file says what the host
# booked; the terminal's reading of the code does not matter here.
BOOKED_CODES = C.RC_APPROVED_CLASS | C.RC_PARTIAL_CLASS
QUEUEABLE = frozenset({TxnState.DECLINED.value, TxnState.NEEDS_MANUAL.value})
MAX_FIELD = 64
FIELD_41_LEN, FIELD_42_LEN = 8, 15
_DELIMITERS = (",", ";", "\t")
_DECIMAL = re.compile(r"\d{1,10}[.,]\d\d")  # 12.50 or 12,50: a major-unit amount
_CARD_LIKE = re.compile(r"\d(?:[ -]?\d){11,}")  # 12+ digits, maybe grouped: could be a card number

Key = tuple[str, str, str, str]  # tid, mid, stan (6 digits), date (MMDD)


class SettlementError(PosguardError):
    """The settlement file is unusable; ``line`` (1-based, 0 = the file) and ``column`` say where."""

    code = "SETTLEMENT_INVALID"

    def __init__(self, path: Path, line: int, column: str, reason: str) -> None:
        where = f"line {line}" + (f", column '{column}'" if column else "")
        super().__init__(f"{path}: {where}: {reason}")
        self.line, self.column, self.reason = line, column, reason


@dataclass(frozen=True, slots=True)
class SettlementRow:
    line: int
    date: str
    tid: str
    mid: str
    stan: str
    rrn: str
    amount: int
    type: str
    response: str

    @property
    def key(self) -> Key:
        return (self.tid, self.mid, self.stan, self.date)


@dataclass
class Discrepancy:
    category: str
    action: str
    txn: str | None
    tid: str
    mid: str
    stan: str
    date: str
    terminal_state: str  # "" when the journal has no such sale
    terminal_amount: int | None
    host_amount: int | None
    host_net_debits: int
    rrn: str
    masked_pan: str
    note: str
    currency: str = ""  # ISO 4217 numeric of the journal's sale ("" when the journal has none)


@dataclass
class ReconcileReport:
    terminal: str
    dates: list[str]
    rows_used: int
    rows_other_terminals: int
    sales_compared: int
    discrepancies: list[Discrepancy] = field(default_factory=list)
    applied: int = 0
    archives: list[str] = field(default_factory=list)  # archive files whose sales were compared too
    missing_archives: list[str] = field(default_factory=list)  # compaction wrote them; not readable here

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in CATEGORIES}
        for d in self.discrepancies:
            out[d.category] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"terminal": self.terminal, "dates": self.dates, "rows_used": self.rows_used,
                "rows_other_terminals": self.rows_other_terminals, "sales_compared": self.sales_compared,
                "counts": self.counts(), "applied": self.applied, "archives": self.archives,
                "missing_archives": self.missing_archives,
                "discrepancies": [asdict(d) for d in self.discrepancies]}


# --- the settlement file ---------------------------------------------------------------------


def read_settlement(path: Path) -> list[SettlementRow]:
    """Parse and validate every row first: any problem raises SettlementError naming line and column.

    Accepts what a spreadsheet writes when the file was opened and saved there: a UTF-8 byte-order
    mark, ``;`` (or tab) as the delimiter (taken from the header line), numbers that lost their
    leading zeros (STAN ``42`` for ``000042``, date ``315`` for ``0315``, response ``0`` for
    ``00``) and lower-case types."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            delim = max(_DELIMITERS, key=first.count)
            return _parse(path, csv.reader(f, delimiter=delim))
    except OSError as e:
        raise SettlementError(path, 0, "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SettlementError(path, 0, "", "not UTF-8 text") from None
    except csv.Error as e:
        raise SettlementError(path, 0, "", f"not valid CSV: {e}") from None


def _parse(path: Path, reader: Any) -> list[SettlementRow]:
    header = next(reader, None)
    if header is None:
        raise SettlementError(path, 1, "", f"empty file; expected the header {','.join(SETTLEMENT_COLUMNS)}")
    names = [COLUMN_ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header]
    dup = sorted({n for n in names if names.count(n) > 1 and n in SETTLEMENT_COLUMNS})
    if dup:
        raise SettlementError(path, 1, dup[0], "column appears more than once in the header")
    missing = [c for c in SETTLEMENT_COLUMNS if c not in names]
    if missing and len(names) == 1:
        raise SettlementError(path, 1, "", f"the header is one column ({_shown(header[0][:60])}): the delimiter "
                              f"must be ',', ';' or a tab (expected the columns {','.join(SETTLEMENT_COLUMNS)})")
    if missing:
        raise SettlementError(path, 1, missing[0], f"missing column(s) {', '.join(missing)} "
                              f"(expected {','.join(SETTLEMENT_COLUMNS)})")
    idx = {c: names.index(c) for c in SETTLEMENT_COLUMNS}
    rows: list[SettlementRow] = []
    for rec in reader:
        line = reader.line_num
        if not rec or (len(rec) == 1 and not rec[0].strip()):
            continue
        if len(rec) != len(names):
            raise SettlementError(path, line, "", f"has {len(rec)} fields, the header has {len(names)}")
        v = {c: rec[i].strip() for c, i in idx.items()}
        v["type"] = v["type"].upper()
        for c, width in (("stan", 6), ("date", 4), ("response", 2)):  # leading zeros a spreadsheet dropped
            if v[c].isascii() and v[c].isdigit() and len(v[c]) < width:
                v[c] = v[c].zfill(width)
        for c, val in v.items():
            if len(val) > MAX_FIELD:
                raise SettlementError(path, line, c, f"value longer than {MAX_FIELD} characters")
        d = v["date"]
        if not (len(d) == 4 and d.isdigit() and 1 <= int(d[:2]) <= 12 and 1 <= int(d[2:]) <= 31):
            raise SettlementError(path, line, "date", f"{_shown(d)} is not a MMDD date")
        for c, most, field_no in (("tid", FIELD_41_LEN, 41), ("mid", FIELD_42_LEN, 42)):
            if not v[c] or not v[c].isprintable() or len(v[c]) > most:
                raise SettlementError(path, line, c, f"must be 1-{most} printable characters (ISO 8583 field {field_no})")
        if not (len(v["stan"]) == 6 and v["stan"].isdigit()):
            raise SettlementError(path, line, "stan", f"{_shown(v['stan'])} is not 6 digits")
        if len(v["rrn"]) > 12 or not (v["rrn"].isascii() and (v["rrn"].isalnum() or v["rrn"] == "")):
            raise SettlementError(path, line, "rrn", f"{_shown(v['rrn'])} is not empty or up to 12 letters/digits")
        if not (v["amount"].isascii() and v["amount"].isdigit() and len(v["amount"]) <= 12):
            hint = (f" (write {v['amount'].replace('.', '').replace(',', '')} for {v['amount']})"
                    if _DECIMAL.fullmatch(v["amount"]) else "")
            raise SettlementError(path, line, "amount", f"{_shown(v['amount'])} is not a whole number of minor "
                                  f"units{hint}")
        if v["type"] not in (SETTLE_SALE, SETTLE_REFUND, SETTLE_REVERSAL):
            raise SettlementError(path, line, "type", f"{_shown(v['type'])} is not SALE, REFUND or REVERSAL")
        r = v["response"]
        if not (len(r) == 2 and r.isascii() and r.isalnum()):
            raise SettlementError(path, line, "response", f"{_shown(r)} is not a 2-character response code")
        rows.append(SettlementRow(line, d, v["tid"], v["mid"], v["stan"], v["rrn"], int(v["amount"]), v["type"], r))
    return rows


def _shown(value: str) -> str:
    """A bad value for an error message, with any card-number-like digit run masked (BIN + last 4):
    a settlement export may carry card numbers, and a shifted column puts them where we look."""
    return repr(_CARD_LIKE.sub(lambda m: mask_pan(re.sub(r"[ -]", "", m.group())), value))


# --- comparing -------------------------------------------------------------------------------


@dataclass
class _Host:
    debits: list[SettlementRow] = field(default_factory=list)
    first_reversal: SettlementRow | None = None

    @property
    def reversed_one(self) -> bool:
        return self.first_reversal is not None and self.first_reversal.response == "00" and bool(self.debits)

    @property
    def net(self) -> int:
        return len(self.debits) - (1 if self.reversed_one else 0)

    def remaining(self) -> list[SettlementRow]:
        return self.debits[1:] if self.reversed_one else list(self.debits)


def reconcile(view: JournalView, rows: Iterable[SettlementRow], *, dates: Iterable[str] = (),
              archives: Iterable[tuple[str, JournalView]] = (), missing_archives: Iterable[str] = (),
              booked_codes: frozenset[str] = BOOKED_CODES) -> ReconcileReport:
    """Compare; pure (nothing is written). ``dates`` (MMDD) overrides the dates the file covers.

    ``archives`` are (path, view) of files `journal compact` moved older transactions to: their
    sales are compared as well (the live journal's copy wins for carried transactions). An
    archived sale is too old to reverse, so a debit it should not have is flagged for a refund.
    ``missing_archives`` (recorded by compaction, not readable here) make a host debit unknown to
    the journal a question, not a refund: the sale may be in one of them."""
    terminal = view.meta.get("terminal_id", "")
    host: dict[Key, _Host] = {}
    used = other = 0
    seen_dates: set[str] = set()
    for r in rows:
        if r.tid != terminal:
            other += 1
            continue
        used += 1
        seen_dates.add(r.date)
        h = host.setdefault(r.key, _Host())
        if r.type in (SETTLE_SALE, SETTLE_REFUND):
            if r.response in booked_codes:
                h.debits.append(r)
        elif h.first_reversal is None:
            h.first_reversal = r
    covered = set(dates) or seen_dates
    missing = sorted(missing_archives)
    rep = ReconcileReport(terminal, sorted(covered), used, other, 0, missing_archives=missing)
    by_key: dict[Key, TxnView] = {}
    archived: set[Key] = set()
    for path, av in archives:
        rep.archives.append(path)
        for t in av.txns.values():
            if not is_void(t) and t.date in covered:
                k = _sale_key(t, terminal)
                by_key[k] = t
                archived.add(k)
    for t in view.txns.values():
        if is_void(t) or t.date not in covered:
            continue
        k = _sale_key(t, terminal)
        by_key[k] = t
        archived.discard(k)
    rep.sales_compared = len(by_key)
    for key, t in by_key.items():
        d = _judge(t, key, host.get(key, _Host()))
        if d is not None:
            if key in archived and d.action == QUEUE_REVERSAL:
                d.action = FLAG_REFUND
                d.note += " (archived: too old to reverse, refund instead)"
            rep.discrepancies.append(d)
    for key, h in host.items():
        if key not in by_key and h.net > 0:
            last = h.remaining()[-1]
            if missing:
                action, note = NONE, (f"not in the journal{' or the archives given' if rep.archives else ''}; "
                                      f"it may be in an archive that is not here ({', '.join(missing)}): run again "
                                      "with --archive FILE before refunding")
            else:
                action, note = FLAG_REFUND, "the journal holds no such sale (another device?): refund if not legitimate"
            rep.discrepancies.append(Discrepancy(
                FAILED_BUT_DEBITED, action, None, *key, "", None, last.amount, h.net, last.rrn, "", note))
    rep.discrepancies.sort(key=lambda d: (d.date, d.stan, d.category))
    return rep


def _sale_key(t: TxnView, terminal: str) -> Key:
    """The host ledger's key of a journal sale: (41, 42, 11, date of field 7)."""
    return (t.tid or terminal, t.mid, f"{t.stan:06d}", t.date)


def _judge(t: TxnView, key: Key, h: _Host) -> Discrepancy | None:
    state, net = t.state, h.net
    rest = h.remaining()
    host_amount = sum(r.amount for r in rest) if rest else None
    rrn = rest[-1].rrn if rest else t.rrn

    def d(category: str, action: str, note: str) -> Discrepancy:
        return Discrepancy(category, action, t.key, *key, state, t.amount, host_amount, net, rrn, t.masked_pan, note,
                           t.currency)

    if state == TxnState.APPROVED.value:
        if net == 0:
            return d(APPROVED_MISSING, NONE, "approved at the terminal, no net debit at the host: merchant not "
                     "paid; investigate with the acquirer (sales are never re-sent)")
        if net > 1:
            return d(DOUBLE_DEBIT, FLAG_REFUND, f"{net} net debits for one approved sale: refund the extra")
        if rest[-1].amount != t.amount:
            more = rest[-1].amount > t.amount
            return d(AMOUNT_MISMATCH, FLAG_REFUND if more else NONE,
                     f"host settled {rest[-1].amount}, terminal approved {t.amount}"
                     + (": refund the difference" if more else ": merchant under-paid, investigate"))
        return None
    if net == 0:
        return None
    if state == TxnState.REVERSED.value:
        return d(REVERSED_BUT_SETTLED, FLAG_REFUND, "reversed at the terminal but the debit is settled: the host "
                 "already answered the reversal, so refund")
    if state in QUEUEABLE:
        return d(FAILED_BUT_DEBITED, QUEUE_REVERSAL, f"{state.lower()} at the terminal, debited at the host: "
                 "a reversal of this sale undoes exactly that debit")
    if state == TxnState.DEFERRED.value:
        return d(FAILED_BUT_DEBITED, NONE, "an offline sale still being forwarded (its 0220 may have been booked): "
                 "run posguard replay, which reverses an unanswered advice before sending a fresh one")
    if state == TxnState.AWAITING_COMPLETION.value:
        return d(FAILED_BUT_DEBITED, NONE, "the host approved a chip sale whose card has not decided yet: the "
                 "guard approves it on the card's COMPLETE or reverses it after reader.completion_timeout")
    if state in (TxnState.REVERSAL_PENDING.value, TxnState.JOURNALED.value, TxnState.SENT.value):
        return d(FAILED_BUT_DEBITED, NONE, "a reversal is already queued (or recovery queues one at the next "
                 "start): run posguard replay")
    return d(FAILED_BUT_DEBITED, FLAG_REFUND, f"{state.lower()} at the terminal (never sent) yet debited: investigate")


def reversal_records(view: JournalView, discrepancies: Iterable[Discrepancy]) -> list[tuple[str, str, dict[str, Any]]]:
    """The ``reversal_pending`` records ``apply`` would append (QUEUE_REVERSAL items still queueable)."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    done: set[str] = set()
    for d in discrepancies:
        if d.action != QUEUE_REVERSAL or d.txn is None or d.txn in done:
            continue
        t = view.txns.get(d.txn)
        if t is None or t.state not in QUEUEABLE:
            continue
        done.add(d.txn)
        out.append(("reversal_pending", d.txn, {"reason": RECONCILE_REASON, "stan": t.stan,
                                                 "category": d.category, "settlement_rrn": d.rrn}))
    return out


def apply(journal: Journal, discrepancies: Iterable[Discrepancy], *, now: float) -> int:
    """Queue the safe reversals in ONE durable commit; returns how many. States are re-read from
    ``journal`` itself (open it with ``Journal.open_exclusive`` so they cannot move meanwhile)."""
    view = build_view({"terminal_id": journal.terminal_id}, journal.entries())
    recs = reversal_records(view, discrepancies)
    if recs:
        journal.append(recs, now=now)
    return len(recs)
