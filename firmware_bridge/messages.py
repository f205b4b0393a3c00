"""Application messages carried in DATA frames: type byte + TLVs (PROTOCOL.md section 5).

Payload = msg_type(1) then any number of TLVs: tag(1) length(2, big-endian) value(length).
Decoders accept tags in any order, skip unknown tags (and known tags the message type does not
use) for forward compatibility, and reject a repeated tag, a missing mandatory tag, clear card
data outside AUTH/REFUND, and malformed values, each with a stable MessageError code.
Encoders emit tags in the order of the message tables (ascending tag numbers).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from guard.core.constants import MASK_KEEP_FIRST, MASK_KEEP_LAST
from guard.core.errors import LinkError, PosguardError
from guard.core.model import CardData, Request, Result, TxnKind, TxnState, mask_pan

from firmware_bridge.constants import (
    AMOUNT_BCD_LEN,
    AMOUNT_MAX,
    DISPLAY_TEXT_MAX,
    ERROR_CODE_MAX,
    MAX_PAYLOAD,
    READER_APP_TIMEOUT_CAP_S,
    READER_ID_MAX,
    STAN_MAX,
    STATE_BY_CODE,
    STATE_CODES,
    TLV_HEADER_LEN,
    TXN_ID_LEN,
    MsgType,
    Tag,
)


class MessageError(LinkError):
    """A message payload cannot be encoded or decoded. ``tag`` names the offending TLV, if any.

    Codes: MSG_TRUNCATED, MSG_UNKNOWN_TYPE, MSG_MISSING_TAG, MSG_DUPLICATE_TAG, MSG_BAD_VALUE,
    MSG_CONFLICTING_TAGS, MSG_CLEAR_PAN, MSG_TOO_LONG, MSG_NOT_A_REQUEST, MSG_READER_MISMATCH.
    """

    code = "MSG_INVALID"

    def __init__(self, message: str, *, code: str, tag: int | None = None) -> None:
        super().__init__(message, code=code)
        self.tag = tag


def _bad(tag: Tag, why: str) -> MessageError:
    return MessageError(f"{tag.name}: {why}", code="MSG_BAD_VALUE", tag=int(tag))


# ---------------------------------------------------------------------------- value checks
# Each check validates a Python value (used by constructors, hence by the decoder too) and never
# puts the value itself in the error message: it may be card data.

_PRINTABLE = frozenset(range(0x20, 0x7F))
_ID_CHARS = frozenset(range(0x21, 0x7F)) - {ord(":")}
_CODE_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:")


def _is_ascii_in(s: object, allowed: frozenset[int], lo: int, hi: int) -> bool:
    if not isinstance(s, str) or not lo <= len(s) <= hi:
        return False
    return all(ord(c) in allowed for c in s)


def _is_digits(s: object, lo: int, hi: int) -> bool:
    return isinstance(s, str) and lo <= len(s) <= hi and s.isascii() and s.isdigit()


def _is_int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_txn_id(tag: Tag, v: object) -> None:
    if not isinstance(v, bytes) or len(v) != TXN_ID_LEN:
        raise _bad(tag, f"must be {TXN_ID_LEN} bytes")


def _check_amount(tag: Tag, v: object) -> None:
    if not _is_int(v, 1, AMOUNT_MAX):
        raise _bad(tag, f"must be 1..{AMOUNT_MAX} minor units")


def _check_currency(tag: Tag, v: object) -> None:
    if not _is_digits(v, 3, 3):
        raise _bad(tag, "must be 3 ASCII digits (ISO 4217 numeric)")


def _check_pan(tag: Tag, v: object) -> None:
    if not _is_digits(v, 12, 19):
        raise _bad(tag, "must be 12-19 ASCII digits")


def _check_expiry(tag: Tag, v: object) -> None:
    if not _is_digits(v, 4, 4) or not 1 <= int(str(v)[2:]) <= 12:
        raise _bad(tag, "must be YYMM with MM 01-12")


def _check_reader_id(tag: Tag, v: object) -> None:
    if not _is_ascii_in(v, _ID_CHARS, 1, READER_ID_MAX):
        raise _bad(tag, f"must be 1-{READER_ID_MAX} printable ASCII characters without ':' or space")


def _check_flag(tag: Tag, v: object) -> None:
    if not isinstance(v, bool):
        raise _bad(tag, "must be a boolean")


def _check_state(tag: Tag, v: object) -> None:
    if not isinstance(v, TxnState):
        raise _bad(tag, "must be a TxnState")


def _printable_check(lo: int, hi: int) -> Callable[[Tag, object], None]:
    def check(tag: Tag, v: object) -> None:
        if not _is_ascii_in(v, _PRINTABLE, lo, hi):
            raise _bad(tag, f"must be {lo}-{hi} printable ASCII characters")

    return check


def _check_masked_pan(tag: Tag, v: object) -> None:
    ok = _is_ascii_in(v, frozenset(b"0123456789*"), 12, 19)
    if ok:
        s = str(v)
        ok = set(s[MASK_KEEP_FIRST : len(s) - MASK_KEEP_LAST]) == {"*"}
    if not ok:
        shown = f"at most the first {MASK_KEEP_FIRST} and last {MASK_KEEP_LAST} digits shown"
        raise _bad(tag, f"must be 12-19 of digits and '*', {shown}")


def _check_display(tag: Tag, v: object) -> None:
    if not isinstance(v, str) or not 1 <= len(v.encode("utf-8", "surrogatepass")) <= DISPLAY_TEXT_MAX:
        raise _bad(tag, f"must be 1-{DISPLAY_TEXT_MAX} bytes of UTF-8")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in v):
        raise _bad(tag, "must not contain control characters")


def _check_error_code(tag: Tag, v: object) -> None:
    if not _is_ascii_in(v, _CODE_CHARS, 1, ERROR_CODE_MAX):
        raise _bad(tag, f"must be 1-{ERROR_CODE_MAX} of A-Z 0-9 _ :")


def _check_stan(tag: Tag, v: object) -> None:
    if not _is_int(v, 1, STAN_MAX):
        raise _bad(tag, f"must be 1..{STAN_MAX}")


def _check_wait(tag: Tag, v: object) -> None:
    if not _is_int(v, 1, READER_APP_TIMEOUT_CAP_S):
        raise _bad(tag, f"must be 1..{READER_APP_TIMEOUT_CAP_S} seconds")


# ---------------------------------------------------------------------------- wire codecs


def _enc_bcd(v: int) -> bytes:
    return bytes.fromhex(f"{v:0{2 * AMOUNT_BCD_LEN}d}")


def _dec_bcd(tag: Tag, raw: bytes) -> int:
    if len(raw) != AMOUNT_BCD_LEN:
        raise _bad(tag, f"must be {AMOUNT_BCD_LEN} bytes of BCD")
    digits = raw.hex()
    if not digits.isdigit():
        raise _bad(tag, "BCD nibble above 9")
    return int(digits)


def _dec_ascii(tag: Tag, raw: bytes) -> str:
    if not raw.isascii():
        raise _bad(tag, "must be ASCII")
    return raw.decode("ascii")


def _dec_utf8(tag: Tag, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(tag, "must be valid UTF-8") from None


def _dec_fixed(n: int) -> Callable[[Tag, bytes], bytes]:
    def dec(tag: Tag, raw: bytes) -> bytes:
        if len(raw) != n:
            raise _bad(tag, f"must be {n} bytes")
        return raw

    return dec


def _dec_uint(n: int) -> Callable[[Tag, bytes], int]:
    def dec(tag: Tag, raw: bytes) -> int:
        if len(raw) != n:
            raise _bad(tag, f"must be {n} bytes")
        return int.from_bytes(raw, "big")

    return dec


def _dec_bool(tag: Tag, raw: bytes) -> bool:
    if raw not in (b"\x00", b"\x01"):
        raise _bad(tag, "must be one byte 0x00 or 0x01")
    return raw == b"\x01"


def _dec_true(tag: Tag, raw: bytes) -> bool:
    if raw != b"\x01":
        raise _bad(tag, "must be one byte 0x01")
    return True


def _dec_state(tag: Tag, raw: bytes) -> TxnState:
    if len(raw) != 1 or raw[0] not in STATE_BY_CODE:
        raise _bad(tag, "unknown state code")
    return STATE_BY_CODE[raw[0]]


def _ascii(v: Any) -> bytes:
    return str(v).encode("ascii")


@dataclass(frozen=True)
class _TagCodec:
    check: Callable[[Tag, object], None]
    encode: Callable[[Any], bytes]
    decode: Callable[[Tag, bytes], Any]


TAG_CODECS: dict[Tag, _TagCodec] = {
    Tag.TXN_ID: _TagCodec(_check_txn_id, bytes, _dec_fixed(TXN_ID_LEN)),
    Tag.AMOUNT: _TagCodec(_check_amount, _enc_bcd, _dec_bcd),
    Tag.APPROVED_AMOUNT: _TagCodec(_check_amount, _enc_bcd, _dec_bcd),
    Tag.CURRENCY: _TagCodec(_check_currency, _ascii, _dec_ascii),
    Tag.PAN: _TagCodec(_check_pan, _ascii, _dec_ascii),
    Tag.EXPIRY: _TagCodec(_check_expiry, _ascii, _dec_ascii),
    Tag.ORIGINAL_TXN_ID: _TagCodec(_check_txn_id, bytes, _dec_fixed(TXN_ID_LEN)),
    Tag.READER_ID: _TagCodec(_check_reader_id, _ascii, _dec_ascii),
    Tag.LAST: _TagCodec(_check_flag, lambda v: b"\x01", _dec_true),
    Tag.STATE: _TagCodec(_check_state, lambda v: bytes([STATE_CODES[v]]), _dec_state),
    Tag.RESPONSE_CODE: _TagCodec(_printable_check(2, 2), _ascii, _dec_ascii),
    Tag.APPROVAL_CODE: _TagCodec(_printable_check(1, 6), _ascii, _dec_ascii),
    Tag.RRN: _TagCodec(_printable_check(1, 12), _ascii, _dec_ascii),
    Tag.MASKED_PAN: _TagCodec(_check_masked_pan, _ascii, _dec_ascii),
    Tag.DISPLAY_TEXT: _TagCodec(_check_display, lambda v: v.encode("utf-8"), _dec_utf8),
    Tag.ERROR_CODE: _TagCodec(_check_error_code, _ascii, _dec_ascii),
    Tag.IN_PROGRESS: _TagCodec(_check_flag, lambda v: b"\x01" if v else b"\x00", _dec_bool),
    Tag.STAN: _TagCodec(_check_stan, lambda v: v.to_bytes(4, "big"), _dec_uint(4)),
    Tag.WAIT_S: _TagCodec(_check_wait, lambda v: v.to_bytes(2, "big"), _dec_uint(2)),
}

CARD_DATA_TAGS = frozenset({Tag.PAN, Tag.EXPIRY})

# ---------------------------------------------------------------------------- messages
# (tag, field name, mandatory). "Conditional" tags (STATUS) are optional here and checked by the
# message itself.
FieldSpec = tuple[Tag, str, bool]


class _Message:
    """Shared behaviour: table-driven validation and a repr that never shows card data."""

    MSG_TYPE: ClassVar[MsgType]
    FIELDS: ClassVar[tuple[FieldSpec, ...]]

    def __post_init__(self) -> None:
        for tag, name, mandatory in self.FIELDS:
            v = getattr(self, name)
            if v is None or (tag is Tag.LAST and v is False):
                if mandatory:
                    raise MessageError(f"{self.MSG_TYPE.name} needs {tag.name}", code="MSG_MISSING_TAG", tag=int(tag))
                continue
            TAG_CODECS[tag].check(tag, v)

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "pan":
                v = mask_pan(str(v))
            elif f.name == "expiry":
                v = "****"
            elif isinstance(v, bytes):
                v = v.hex()
            elif isinstance(v, TxnState):
                v = v.value
            parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class Auth(_Message):
    """Reader -> guard: a sale."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.AUTH
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", True),
        (Tag.AMOUNT, "amount", True),
        (Tag.CURRENCY, "currency", True),
        (Tag.PAN, "pan", True),
        (Tag.EXPIRY, "expiry", False),
        (Tag.READER_ID, "reader_id", False),
    )
    txn_id: bytes
    amount: int
    currency: str
    pan: str
    expiry: str | None = None
    reader_id: str | None = None


@dataclass(frozen=True, repr=False)
class Void(_Message):
    """Reader -> guard: cancel an earlier transaction of this reader (no card data)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.VOID
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", True),
        (Tag.AMOUNT, "amount", True),
        (Tag.CURRENCY, "currency", True),
        (Tag.ORIGINAL_TXN_ID, "original_txn_id", True),
        (Tag.READER_ID, "reader_id", False),
    )
    txn_id: bytes
    amount: int
    currency: str
    original_txn_id: bytes
    reader_id: str | None = None


@dataclass(frozen=True, repr=False)
class Refund(_Message):
    """Reader -> guard: money back to a card, optionally referencing the original sale."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.REFUND
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", True),
        (Tag.AMOUNT, "amount", True),
        (Tag.CURRENCY, "currency", True),
        (Tag.PAN, "pan", True),
        (Tag.EXPIRY, "expiry", False),
        (Tag.ORIGINAL_TXN_ID, "original_txn_id", False),
        (Tag.READER_ID, "reader_id", False),
    )
    txn_id: bytes
    amount: int
    currency: str
    pan: str
    expiry: str | None = None
    original_txn_id: bytes | None = None
    reader_id: str | None = None


@dataclass(frozen=True, repr=False)
class _OperatorAction(_Message):
    """An operator's decision about the request ``txn_id``: TXN_ID and READER_ID only."""

    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", True),
        (Tag.READER_ID, "reader_id", False),
    )
    txn_id: bytes
    reader_id: str | None = None


@dataclass(frozen=True, repr=False)
class Confirm(_OperatorAction):
    """Reader -> guard: the operator overrides a hold on the request ``txn_id``."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.CONFIRM


@dataclass(frozen=True, repr=False)
class Cancel(_OperatorAction):
    """Reader -> guard: the operator drops a held request (wrong amount, wrong card): DECLINED."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.CANCEL


@dataclass(frozen=True, repr=False)
class Signed(_OperatorAction):
    """Reader -> guard: the customer signed the receipt of ``txn_id`` (RESULT said SIGNATURE REQUIRED)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.SIGNED


@dataclass(frozen=True, repr=False)
class Status(_Message):
    """Reader -> guard: the outcome of ``txn_id``, or (``last``) of this reader's newest one.
    Exactly one of TXN_ID and LAST is present."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.STATUS
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", False),
        (Tag.READER_ID, "reader_id", False),
        (Tag.LAST, "last", False),
    )
    txn_id: bytes | None = None
    reader_id: str | None = None
    last: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.txn_id is None and not self.last:
            raise MessageError("STATUS needs TXN_ID or LAST", code="MSG_MISSING_TAG", tag=int(Tag.TXN_ID))
        if self.txn_id is not None and self.last:
            raise MessageError("STATUS takes TXN_ID or LAST, not both", code="MSG_CONFLICTING_TAGS", tag=int(Tag.LAST))


@dataclass(frozen=True, repr=False)
class Ping(_Message):
    """Reader -> guard: liveness of the application (the link has its own ACKs)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.PING
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", True),
        (Tag.READER_ID, "reader_id", False),
    )
    txn_id: bytes
    reader_id: str | None = None


@dataclass(frozen=True, repr=False)
class ResultMessage(_Message):
    """Guard -> reader: the state of a transaction. Success only if APPROVED and not in progress."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.RESULT
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", True),
        (Tag.AMOUNT, "amount", False),
        (Tag.CURRENCY, "currency", False),
        (Tag.STATE, "state", True),
        (Tag.RESPONSE_CODE, "response_code", False),
        (Tag.APPROVAL_CODE, "approval_code", False),
        (Tag.RRN, "rrn", False),
        (Tag.MASKED_PAN, "masked_pan", False),
        (Tag.DISPLAY_TEXT, "display_text", True),
        (Tag.ERROR_CODE, "error_code", False),
        (Tag.IN_PROGRESS, "in_progress", True),
        (Tag.STAN, "stan", False),
        (Tag.APPROVED_AMOUNT, "approved_amount", False),
    )
    txn_id: bytes
    state: TxnState
    display_text: str
    in_progress: bool = False
    amount: int | None = None
    currency: str | None = None
    response_code: str | None = None
    approval_code: str | None = None
    rrn: str | None = None
    masked_pan: str | None = None
    error_code: str | None = None
    stan: int | None = None
    approved_amount: int | None = None


@dataclass(frozen=True, repr=False)
class Progress(_Message):
    """Guard -> reader: still working on ``txn_id``; restart the application timer."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.PROGRESS
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", True),
        (Tag.DISPLAY_TEXT, "display_text", False),
        (Tag.WAIT_S, "wait_s", False),
    )
    txn_id: bytes
    display_text: str | None = None
    wait_s: int | None = None


@dataclass(frozen=True, repr=False)
class Pong(_Message):
    """Guard -> reader: answer to PING, echoing its TXN_ID."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.PONG
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = ((Tag.TXN_ID, "txn_id", True),)
    txn_id: bytes


@dataclass(frozen=True, repr=False)
class ErrorMessage(_Message):
    """Guard -> reader: a request was refused before it became a transaction."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ERROR
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", False),
        (Tag.DISPLAY_TEXT, "display_text", False),
        (Tag.ERROR_CODE, "error_code", True),
    )
    error_code: str
    txn_id: bytes | None = None
    display_text: str | None = None


Message = Auth | Void | Refund | Confirm | Cancel | Signed | Status | Ping | ResultMessage | Progress | Pong | ErrorMessage

MESSAGE_CLASSES: dict[MsgType, type[_Message]] = {
    cls.MSG_TYPE: cls
    for cls in (Auth, Void, Refund, Confirm, Cancel, Signed, Status, Ping, ResultMessage, Progress, Pong, ErrorMessage)
}


def encode_message(msg: Message) -> bytes:
    """Payload bytes of ``msg`` (already validated by its constructor)."""
    out = bytearray([msg.MSG_TYPE])
    for tag, name, _ in msg.FIELDS:
        v = getattr(msg, name)
        if v is None or (tag is Tag.LAST and v is False):
            continue
        value = TAG_CODECS[tag].encode(v)
        out += bytes([tag]) + len(value).to_bytes(2, "big") + value
    if len(out) > MAX_PAYLOAD:
        raise MessageError(f"message of {len(out)} bytes exceeds {MAX_PAYLOAD}", code="MSG_TOO_LONG")
    return bytes(out)


def decode_message(payload: bytes) -> Message:
    """Parse one payload. Raises MessageError; never anything else."""
    if not payload:
        raise MessageError("empty payload", code="MSG_TRUNCATED")
    try:
        cls = MESSAGE_CLASSES[MsgType(payload[0])]
    except ValueError:
        raise MessageError(f"unknown message type 0x{payload[0]:02x}", code="MSG_UNKNOWN_TYPE") from None
    tlvs: dict[int, bytes] = {}
    i, n = 1, len(payload)
    while i < n:
        if n - i < TLV_HEADER_LEN:
            raise MessageError("TLV header cut short", code="MSG_TRUNCATED")
        tag = payload[i]
        length = int.from_bytes(payload[i + 1 : i + 3], "big")
        i += TLV_HEADER_LEN
        if n - i < length:
            raise MessageError(f"TLV 0x{tag:02x} value cut short", code="MSG_TRUNCATED", tag=tag)
        if tag in tlvs:
            raise MessageError(f"TLV 0x{tag:02x} repeated", code="MSG_DUPLICATE_TAG", tag=tag)
        tlvs[tag] = payload[i : i + length]
        i += length
    used = {tag for tag, _, _ in cls.FIELDS}
    for tag in CARD_DATA_TAGS - used:
        if tag in tlvs:
            raise MessageError(f"{cls.MSG_TYPE.name} must not carry {tag.name}", code="MSG_CLEAR_PAN", tag=int(tag))
    kwargs: dict[str, Any] = {}
    for tag, name, _ in cls.FIELDS:
        raw = tlvs.get(tag)
        if raw is not None:
            kwargs[name] = TAG_CODECS[tag].decode(tag, raw)
    missing = [tag for tag, name, mandatory in cls.FIELDS if mandatory and name not in kwargs]
    if missing:
        raise MessageError(f"{cls.MSG_TYPE.name} needs {missing[0].name}", code="MSG_MISSING_TAG", tag=int(missing[0]))
    return cls(**kwargs)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- converters


def to_request(msg: Message, reader_id: str) -> Request:
    """An AUTH, VOID or REFUND as the engine's Request. ``reader_id`` is the port's configured
    reader; a READER_ID tag, if sent, must match it. RequestInvalid propagates with its code."""
    if not isinstance(msg, (Auth, Void, Refund)):
        raise MessageError(f"{msg.MSG_TYPE.name} is not a transaction request", code="MSG_NOT_A_REQUEST")
    if msg.reader_id is not None and msg.reader_id != reader_id:
        raise MessageError(
            "READER_ID does not match the reader configured on this port", code="MSG_READER_MISMATCH", tag=int(Tag.READER_ID)
        )
    if isinstance(msg, Void):
        # A VOID names the original transaction; the engine takes the card from it.
        return Request(reader_id, msg.txn_id, TxnKind.VOID, msg.amount, msg.currency, None, msg.original_txn_id)  # type: ignore[arg-type]
    card = CardData(msg.pan, msg.expiry or "")
    if isinstance(msg, Refund):
        return Request(reader_id, msg.txn_id, TxnKind.REFUND, msg.amount, msg.currency, card, msg.original_txn_id)
    return Request(reader_id, msg.txn_id, TxnKind.SALE, msg.amount, msg.currency, card)


def fit_display_text(text: str) -> str:
    """Control characters to spaces, cut to DISPLAY_TEXT_MAX bytes of UTF-8 on a character
    boundary; an empty text becomes "-" (the tag needs at least one byte)."""
    clean = "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in text)
    raw = clean.encode("utf-8")[:DISPLAY_TEXT_MAX]
    return raw.decode("utf-8", "ignore") or "-"


def _txn_id_from_key(key: str) -> bytes:
    _, _, hexid = key.rpartition(":")
    try:
        txn_id = bytes.fromhex(hexid)
    except ValueError:
        txn_id = b""
    if len(txn_id) != TXN_ID_LEN:
        raise MessageError("result key does not end in a 16-byte transaction id", code="MSG_BAD_VALUE", tag=int(Tag.TXN_ID))
    return txn_id


def result_message(result: Result) -> ResultMessage:
    """The RESULT telling the reader about ``result``. ``Result.reason`` travels as ERROR_CODE;
    amount and currency are taken from ``result.extra`` when the engine put them there."""
    amount = result.extra.get("amount")
    currency = result.extra.get("currency")
    approved = result.extra.get("approved_amount")
    return ResultMessage(
        txn_id=_txn_id_from_key(result.key),
        state=result.state,
        display_text=fit_display_text(result.display_text),
        in_progress=result.in_progress,
        amount=amount if isinstance(amount, int) and amount > 0 else None,
        currency=currency if isinstance(currency, str) else None,
        response_code=result.response_code or None,
        approval_code=result.approval_code or None,
        rrn=result.rrn or None,
        masked_pan=result.masked_pan or None,
        error_code=result.reason or None,
        stan=result.stan or None,
        approved_amount=approved if isinstance(approved, int) and approved > 0 else None,
    )


def error_message(exc: PosguardError, txn_id: bytes | None = None) -> ErrorMessage:
    """The ERROR telling the reader why a request was refused (e.g. IDEMPOTENCY_MISMATCH)."""
    code = exc.code if _is_ascii_in(exc.code, _CODE_CHARS, 1, ERROR_CODE_MAX) else "POSGUARD_ERROR"
    return ErrorMessage(error_code=code, txn_id=txn_id)
