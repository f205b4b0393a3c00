"""Value types shared by the engine, the journal, the uplink and the reader side."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

from guard.core import emv
from guard.core.errors import RequestInvalid


class TxnKind(str, enum.Enum):
    SALE = "SALE"
    REFUND = "REFUND"
    VOID = "VOID"


class TxnState(str, enum.Enum):
    """Terminal-side states; the legal moves between them are ``guard.core.txn.TRANSITIONS``."""

    JOURNALED = "JOURNALED"  # intent durable, nothing sent yet
    SENT = "SENT"  # request handed to the uplink (in memory only: recovery treats as maybe-sent)
    APPROVED = "APPROVED"
    DECLINED = "DECLINED"  # host declined, or failed locally before anything was sent
    UNKNOWN = "UNKNOWN"  # transient: no/invalid answer; becomes REVERSAL_PENDING in the same commit
    REVERSAL_PENDING = "REVERSAL_PENDING"
    REVERSED = "REVERSED"
    NEEDS_MANUAL = "NEEDS_MANUAL"
    HELD = "HELD"  # journaled, not sent: a counter rule wants the operator's CONFIRM first
    DEFERRED = "DEFERRED"  # approved offline within the configured limits; 0220 advice still owed
    # Chip / contactless sale the host approved: final only when the reader's COMPLETE says the card
    # accepted; a card decline, removal, terminal error or no COMPLETE in time reverses it.
    AWAITING_COMPLETION = "AWAITING_COMPLETION"
    PARTIAL = "PARTIAL"  # the host approved less than asked (code 10): the operator accepts or cancels

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def shown_as_success(self) -> bool:
        return self is TxnState.APPROVED


# ISO 4217 (list one, 2024): numeric code -> (alphabetic code, minor-unit exponent), for the
# currencies a terminal is likely to meet. The one table every amount shown to a person uses.
CURRENCIES: dict[str, tuple[str, int]] = {
    "036": ("AUD", 2), "048": ("BHD", 3), "124": ("CAD", 2), "156": ("CNY", 2), "203": ("CZK", 2),
    "208": ("DKK", 2), "344": ("HKD", 2), "348": ("HUF", 2), "352": ("ISK", 0), "356": ("INR", 2),
    "368": ("IQD", 3), "376": ("ILS", 2), "392": ("JPY", 0), "400": ("JOD", 3), "410": ("KRW", 0),
    "414": ("KWD", 3), "434": ("LYD", 3), "484": ("MXN", 2), "512": ("OMR", 3), "554": ("NZD", 2),
    "578": ("NOK", 2), "643": ("RUB", 2), "682": ("SAR", 2), "702": ("SGD", 2), "704": ("VND", 0),
    "710": ("ZAR", 2), "752": ("SEK", 2), "756": ("CHF", 2), "784": ("AED", 2), "788": ("TND", 3),
    "826": ("GBP", 2), "840": ("USD", 2), "946": ("RON", 2), "949": ("TRY", 2), "978": ("EUR", 2),
    "985": ("PLN", 2), "986": ("BRL", 2),
}
CURRENCY_EXPONENT = {num: exp for num, (_, exp) in CURRENCIES.items()}


def format_amount(minor: int, currency: str) -> str:
    """12345 in 978 -> '123.45'; in 392 (JPY) -> '12345'. Unknown currencies: 2 decimals."""
    exp = CURRENCY_EXPONENT.get(currency, 2)
    if exp == 0:
        return str(minor)
    sign, minor = ("-", -minor) if minor < 0 else ("", minor)
    return f"{sign}{minor // 10**exp}.{minor % 10**exp:0{exp}d}"


def format_money(minor: int, currency: str) -> str:
    """For people: 2000 in 978 -> '20.00 EUR'; an unknown numeric code stays as given ('20.00 999')."""
    return f"{format_amount(minor, currency)} {CURRENCIES.get(currency, (currency, 2))[0]}"


FINAL_STATES = frozenset({TxnState.APPROVED, TxnState.DECLINED, TxnState.REVERSED, TxnState.NEEDS_MANUAL})


def txn_key(reader_id: str, txn_id: bytes) -> str:
    """Idempotency key: the reader's id and its 16-byte transaction id."""
    return f"{reader_id}:{txn_id.hex()}"


@dataclass(frozen=True, repr=False)
class CardData:
    """Clear card data. Lives in memory only until encrypted into the vault; never logged.
    ``track2`` and ``icc`` go to the vault with the PAN; ``pin_block`` and ``ksn`` never do (memory
    only: a sale interrupted by a crash is reversed, never resent, so nothing needs them later)."""

    pan: str
    expiry: str = ""  # YYMM
    entry_mode: str = ""  # an emv.EntryMode value; "" (not told) behaves as MANUAL
    pan_seq: str = ""  # card sequence number (tag 5F34), 3 digits
    track2: str = ""  # track 2 equivalent data (tag 57)
    icc: bytes = b""  # field-55 data (BER-TLV), checked by emv.check_icc
    pin_block: bytes = b""  # online PIN block (ISO 9564, 8 bytes), encrypted under the DUKPT key
    ksn: bytes = b""  # the PIN block's DUKPT key serial number (10 bytes)

    def __post_init__(self) -> None:
        if not (12 <= len(self.pan) <= 19 and self.pan.isdigit()):
            raise RequestInvalid("card number must be 12-19 digits", code="REQUEST_BAD_PAN")
        if self.expiry and not (len(self.expiry) == 4 and self.expiry.isdigit()):
            raise RequestInvalid("expiry must be YYMM", code="REQUEST_BAD_EXPIRY")
        if self.entry_mode and self.entry_mode not in emv.EntryMode.__members__:
            raise RequestInvalid("unknown POS entry mode", code="REQUEST_BAD_EMV")
        if self.pan_seq and not (len(self.pan_seq) == 3 and self.pan_seq.isdigit()):
            raise RequestInvalid("card sequence number must be 3 digits", code="REQUEST_BAD_EMV")
        if self.track2:
            emv.check_track2(self.track2, self.pan)
        if self.icc:
            emv.check_icc(self.icc)
        if len(self.pin_block) not in (0, 8) or len(self.ksn) not in (0, 10) or bool(self.pin_block) != bool(self.ksn):
            raise RequestInvalid("a PIN block is 8 bytes and comes with its 10-byte KSN", code="REQUEST_BAD_EMV")

    def __repr__(self) -> str:
        return f"CardData(pan={mask_pan(self.pan)!r})"


@dataclass(frozen=True, repr=False)
class Request:
    """A reader request as the engine sees it. ``card`` is None for STATUS-like lookups."""

    reader_id: str
    txn_id: bytes
    kind: TxnKind
    amount: int  # minor units
    currency: str  # ISO 4217 numeric, e.g. "978"
    card: CardData
    original_txn_id: bytes | None = None  # for VOID / REFUND

    def __post_init__(self) -> None:
        if len(self.txn_id) != 16:
            raise RequestInvalid("transaction id must be 16 bytes", code="REQUEST_BAD_TXN_ID")
        if not (0 < self.amount <= 999_999_999_999):
            raise RequestInvalid("amount must be 1..999999999999 minor units", code="REQUEST_BAD_AMOUNT")
        if not (len(self.currency) == 3 and self.currency.isdigit()):
            raise RequestInvalid("currency must be a 3-digit ISO 4217 code", code="REQUEST_BAD_CURRENCY")
        if not self.reader_id or len(self.reader_id) > 32 or ":" in self.reader_id:
            raise RequestInvalid("reader id must be 1-32 characters without ':'", code="REQUEST_BAD_READER")

    @property
    def key(self) -> str:
        return txn_key(self.reader_id, self.txn_id)

    def __repr__(self) -> str:
        return f"Request({self.key}, {self.kind.value}, {self.amount} {self.currency}, {self.card!r})"


def txn_key_hash(key: str) -> int:
    """A stable signed 64-bit hash of a transaction key (archived-id index, evicted-key filter)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


def fingerprint(kind: TxnKind, amount: int, currency: str, card_token: str, original: bytes | None) -> str:
    """What makes two requests "the same": a hash over the request, never over the clear PAN."""
    canon = f"{kind.value}|{amount}|{currency}|{card_token}|{original.hex() if original else '-'}".encode()
    return hashlib.sha256(canon).hexdigest()[:32]


def luhn_ok(digits: str) -> bool:
    """ISO/IEC 7812-1 check digit (Luhn, mod 10) of a string of ASCII digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_complete(body: str) -> str:
    """``body`` with the Luhn check digit appended (test card numbers for simulators and benchmarks)."""
    return next(body + d for d in "0123456789" if luhn_ok(body + d))


def mask_pan(pan: str) -> str:
    """BIN (first 6) and last 4 only (PCI DSS 3.4.1)."""
    if len(pan) < 13:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


@dataclass(frozen=True)
class Result:
    """What the reader is told about a transaction. Safe to log: no clear card data."""

    key: str
    state: TxnState
    response_code: str = ""
    approval_code: str = ""
    rrn: str = ""
    masked_pan: str = ""
    stan: int = 0
    reason: str = ""  # stable code for why (e.g. HOST_TIMEOUT, ECHO_MISMATCH, NO_HOST)
    in_progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def display_text(self) -> str:
        return display_text(self)


# Reversal reasons of a chip sale the card did not complete, and what the cashier is shown.
CARD_REASONS = {"CARD_DECLINED": "DECLINED BY CARD", "CARD_REMOVED": "CARD REMOVED",
                "TERMINAL_ERROR": "TERMINAL ERROR", "COMPLETION_TIMEOUT": "CARD NOT COMPLETED"}


def display_text(r: Result) -> str:
    """Short text for the reader's display (a cashier acts on it)."""
    if r.in_progress:
        return "PROCESSING - PLEASE WAIT"
    s = r.state
    if s is TxnState.APPROVED:
        sig = " - SIGNATURE REQUIRED" if r.extra.get("signature") == "REQUIRED" else ""
        return f"APPROVED {r.approval_code}".strip() + sig
    if s is TxnState.HELD:
        if r.reason == "HOLD_DOUBLE_SWIPE":
            return "POSSIBLE DOUBLE SWIPE - CONFIRM TO CHARGE AGAIN"
        if r.reason == "HOLD_CONFIRM_AMOUNT":
            return f"CONFIRM AMOUNT {format_amount(r.extra.get('amount', 0), r.extra.get('currency', ''))}"
        return "REVERSAL PENDING ON CARD - WAIT OR CONFIRM"
    if s is TxnState.PARTIAL:
        cur = r.extra.get("currency", "")
        return (f"PARTIAL APPROVAL {format_amount(r.extra.get('approved_amount', 0), cur)} OF "
                f"{format_amount(r.extra.get('amount', 0), cur)} - CONFIRM OR CANCEL")
    if s is TxnState.AWAITING_COMPLETION:
        return "HOST APPROVED - COMPLETING ON CARD - DO NOT REMOVE CARD"
    if s is TxnState.DEFERRED:
        return "APPROVED OFFLINE" + (" - SIGNATURE REQUIRED" if r.extra.get("signature") == "REQUIRED" else "")
    if s is TxnState.DECLINED:
        if r.reason.startswith("VELOCITY_"):
            return "CARD USED TOO FREQUENTLY"
        if r.reason == "HOLD_EXPIRED":
            return "NOT CONFIRMED - NOT CHARGED"
        if r.reason == "NO_HOST":
            return "HOST UNAVAILABLE - NOT CHARGED"
        if r.reason.startswith("OFFLINE_"):
            return "HOST UNAVAILABLE - OFFLINE LIMIT - NOT CHARGED"
        if r.reason == "OPERATOR_CANCELLED":
            return "CANCELLED - NOT CHARGED"
        if r.reason == "STAN_COLLISION":
            return "HOST REJECTED AS DUPLICATE - NOT CHARGED - TRY AGAIN"
        if r.reason == "ADVICE_DECLINED":
            return "OFFLINE SALE DECLINED BY HOST - COLLECT PAYMENT"
        if r.response_code in ("03", "58"):
            return "TERMINAL CONFIG ERROR - CALL SUPPORT (NOT A CARD PROBLEM)"
        if r.response_code == "65":
            return "CARD USED TOO FREQUENTLY"
        return f"DECLINED {r.response_code}".strip()
    if r.reason in CARD_REASONS and s in (TxnState.REVERSAL_PENDING, TxnState.REVERSED):
        return f"{CARD_REASONS[r.reason]} - NOT CHARGED (" + ("REVERSED)" if s is TxnState.REVERSED else "REVERSAL QUEUED)")
    if s in (TxnState.REVERSAL_PENDING, TxnState.UNKNOWN):
        return "FAILED - NOT CHARGED (REVERSAL QUEUED)"
    if s is TxnState.REVERSED:
        return "FAILED - NOT CHARGED (REVERSED)"
    if s is TxnState.NEEDS_MANUAL:
        return "FAILED - CALL SUPPORT (REVERSAL NOT CONFIRMED)"
    return str(s.value)
