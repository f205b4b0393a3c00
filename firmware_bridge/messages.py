"""Application messages carried in DATA frames: type byte + TLVs (PROTOCOL.md section 5).

Payload = msg_type(1) then any number of TLVs: tag(1) length(2, big-endian) value(length).
Decoders accept tags in any order, skip unknown tags (and known tags the message type does not
use) for forward compatibility, and reject a repeated tag, a missing mandatory tag, clear card
data outside AUTH/REFUND, and malformed values, each with a stable MessageError code.
Encoders emit tags in the order of the message tables (ascending tag numbers). Per-tag value
checks and encodings: firmware_bridge.tags.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from guard.core.errors import PosguardError, RequestInvalid
from guard.core.model import CardData, Request, Result, TxnKind, TxnState, luhn_ok, mask_pan

from firmware_bridge.constants import DISPLAY_TEXT_MAX, MAX_PAYLOAD, TLV_HEADER_LEN, TXN_ID_LEN, MsgType, Tag
from firmware_bridge.tags import CARD_DATA_TAGS, SECRET_FIELDS, TAG_CODECS, MessageError, is_error_code

__all__ = [  # MessageError and TAG_CODECS (firmware_bridge.tags) belong to this module's API
    "CARD_DATA_TAGS", "MESSAGE_CLASSES", "TAG_CODECS", "Auth", "Cancel", "Complete", "Confirm", "ErrorMessage", "FieldSpec",
    "Message", "MessageError", "Ping", "Pong", "Progress", "Refund", "ResultMessage", "Signed", "Status", "Void",
    "decode_message", "encode_message", "error_message", "fit_display_text", "luhn_ok", "readable_txn_id",
    "result_message", "to_request",
]


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
            elif f.name in SECRET_FIELDS:
                v = f"<{len(v)} bytes>"
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
        (Tag.ENTRY_MODE, "entry_mode", False),
        (Tag.PAN_SEQ, "pan_seq", False),
        (Tag.TRACK2, "track2", False),
        (Tag.ICC_DATA, "icc", False),
        (Tag.PIN_BLOCK, "pin_block", False),
        (Tag.KSN, "ksn", False),
    )
    txn_id: bytes
    amount: int
    currency: str
    pan: str
    expiry: str | None = None
    reader_id: str | None = None
    entry_mode: str | None = None
    pan_seq: str | None = None
    track2: str | None = None
    icc: bytes | None = None
    pin_block: bytes | None = None
    ksn: bytes | None = None


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
        (Tag.ENTRY_MODE, "entry_mode", False),
        (Tag.PAN_SEQ, "pan_seq", False),
        (Tag.TRACK2, "track2", False),
        (Tag.ICC_DATA, "icc", False),
        (Tag.PIN_BLOCK, "pin_block", False),
        (Tag.KSN, "ksn", False),
    )
    txn_id: bytes
    amount: int
    currency: str
    pan: str
    expiry: str | None = None
    original_txn_id: bytes | None = None
    reader_id: str | None = None
    entry_mode: str | None = None
    pan_seq: str | None = None
    track2: str | None = None
    icc: bytes | None = None
    pin_block: bytes | None = None
    ksn: bytes | None = None


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
class Complete(_Message):
    """Reader -> guard: the card's final decision on a chip sale whose RESULT was
    AWAITING_COMPLETION, with the card's final ICC data (PROTOCOL.md section 12)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.COMPLETE
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        (Tag.TXN_ID, "txn_id", True),
        (Tag.READER_ID, "reader_id", False),
        (Tag.ICC_DATA, "icc", False),
        (Tag.CARD_DECISION, "decision", True),
    )
    txn_id: bytes
    decision: str
    icc: bytes | None = None
    reader_id: str | None = None


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
        (Tag.ISSUER_DATA, "issuer_icc", False),
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
    issuer_icc: bytes | None = None


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


Message = (Auth | Void | Refund | Confirm | Cancel | Signed | Complete | Status | Ping | ResultMessage | Progress | Pong
           | ErrorMessage)

MESSAGE_CLASSES: dict[MsgType, type[_Message]] = {
    cls.MSG_TYPE: cls
    for cls in (Auth, Void, Refund, Confirm, Cancel, Signed, Complete, Status, Ping, ResultMessage, Progress, Pong,
                ErrorMessage)
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
            TAG_CODECS[tag].check(tag, kwargs[name])  # every value before any missing tag (5.4, order of checks)
    missing = [tag for tag, name, mandatory in cls.FIELDS if mandatory and name not in kwargs]
    if missing:
        raise MessageError(f"{cls.MSG_TYPE.name} needs {missing[0].name}", code="MSG_MISSING_TAG", tag=int(missing[0]))
    return cls(**kwargs)  # type: ignore[return-value]


def readable_txn_id(payload: bytes) -> bytes | None:
    """The TXN_ID of a payload ``decode_message`` refused, when it can still be read: a TXN_ID TLV
    of 16 bytes, complete, found exactly once among the TLVs before any truncation. An ERROR then
    names the refused request (PROTOCOL.md 5.4: ERROR's TXN_ID)."""
    found: list[bytes] = []
    i, n = 1, len(payload)
    while n - i >= TLV_HEADER_LEN:
        tag, length = payload[i], int.from_bytes(payload[i + 1 : i + 3], "big")
        i += TLV_HEADER_LEN
        if n - i < length:
            break
        if tag == Tag.TXN_ID:
            found.append(payload[i : i + length])
        i += length
    return found[0] if len(found) == 1 and len(found[0]) == TXN_ID_LEN else None


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
    if not luhn_ok(msg.pan):  # a mistyped or misread card number never reaches the host
        raise RequestInvalid("card number fails the Luhn check", code="REQUEST_BAD_PAN")
    card = CardData(msg.pan, msg.expiry or "", entry_mode=msg.entry_mode or "", pan_seq=msg.pan_seq or "",
                    track2=msg.track2 or "", icc=msg.icc or b"", pin_block=msg.pin_block or b"", ksn=msg.ksn or b"")
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
    issuer = result.extra.get("issuer_icc")
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
        issuer_icc=issuer if isinstance(issuer, bytes) and issuer else None,
    )


def error_message(exc: PosguardError, txn_id: bytes | None = None) -> ErrorMessage:
    """The ERROR telling the reader why a request was refused (e.g. IDEMPOTENCY_MISMATCH)."""
    code = exc.code if is_error_code(exc.code) else "POSGUARD_ERROR"
    return ErrorMessage(error_code=code, txn_id=txn_id)
