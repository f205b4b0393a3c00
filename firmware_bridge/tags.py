"""Per-tag rules of the application messages (PROTOCOL.md section 5): the value check each
constructor runs and the wire encoding/decoding of each TLV value, in one table (``TAG_CODECS``).
Checks never put the value itself in an error message: it may be card data."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guard.core import emv
from guard.core.constants import MASK_KEEP_FIRST, MASK_KEEP_LAST
from guard.core.errors import LinkError, RequestInvalid
from guard.core.model import TxnState

from firmware_bridge.constants import (
    AMOUNT_BCD_LEN,
    AMOUNT_MAX,
    DECISION_CODES,
    ENTRY_MODE_CODES,
    DISPLAY_TEXT_MAX,
    ERROR_CODE_MAX,
    READER_APP_TIMEOUT_CAP_S,
    READER_ID_MAX,
    STAN_MAX,
    STATE_BY_CODE,
    STATE_CODES,
    TXN_ID_LEN,
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


def is_error_code(v: object) -> bool:
    """1-ERROR_CODE_MAX characters of A-Z 0-9 _ : (what an ERROR_CODE tag may carry)."""
    return _is_ascii_in(v, _CODE_CHARS, 1, ERROR_CODE_MAX)


def _check_error_code(tag: Tag, v: object) -> None:
    if not is_error_code(v):
        raise _bad(tag, f"must be 1-{ERROR_CODE_MAX} of A-Z 0-9 _ :")


def _check_stan(tag: Tag, v: object) -> None:
    if not _is_int(v, 1, STAN_MAX):
        raise _bad(tag, f"must be 1..{STAN_MAX}")


def _check_wait(tag: Tag, v: object) -> None:
    if not _is_int(v, 1, READER_APP_TIMEOUT_CAP_S):
        raise _bad(tag, f"must be 1..{READER_APP_TIMEOUT_CAP_S} seconds")


def _check_icc(tag: Tag, v: object) -> None:
    """Strict BER-TLV without forbidden tags: the REQUEST_ICC_* code, as a MessageError."""
    if not isinstance(v, bytes) or not v:
        raise _bad(tag, "must be 1-255 bytes of BER-TLV")
    try:
        emv.check_icc(v)
    except RequestInvalid as e:
        raise MessageError(f"{tag.name}: {e}", code=e.code, tag=int(tag)) from None


def _check_track2(tag: Tag, v: object) -> None:
    if not _is_ascii_in(v, frozenset(b"0123456789D="), 3, emv.TRACK2_MAX):
        raise _bad(tag, f"must be digits with one separator D, at most {emv.TRACK2_MAX}")


def _bytes_check(n: int) -> Callable[[Tag, object], None]:
    def check(tag: Tag, v: object) -> None:
        if not isinstance(v, bytes) or len(v) != n:
            raise _bad(tag, f"must be {n} bytes")

    return check


def _code_codec(codes: dict[str, int]) -> _TagCodec:
    by_code = {c: name for name, c in codes.items()}

    def check(tag: Tag, v: object) -> None:
        if v not in codes:
            raise _bad(tag, "unknown code")

    def dec(tag: Tag, raw: bytes) -> str:
        if len(raw) != 1 or raw[0] not in by_code:
            raise _bad(tag, "unknown code")
        return by_code[raw[0]]

    return _TagCodec(check, lambda v: bytes([codes[v]]), dec)


def _dec_raw(tag: Tag, raw: bytes) -> bytes:
    return bytes(raw)


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
    Tag.ENTRY_MODE: _code_codec(ENTRY_MODE_CODES),
    Tag.PAN_SEQ: _TagCodec(lambda t, v: None if _is_digits(v, 3, 3) else _raise(_bad(t, "must be 3 ASCII digits")),
                           _ascii, _dec_ascii),
    Tag.TRACK2: _TagCodec(_check_track2, _ascii, _dec_ascii),
    Tag.ICC_DATA: _TagCodec(_check_icc, bytes, _dec_raw),
    Tag.PIN_BLOCK: _TagCodec(_bytes_check(8), bytes, _dec_fixed(8)),
    Tag.KSN: _TagCodec(_bytes_check(10), bytes, _dec_fixed(10)),
    Tag.CARD_DECISION: _code_codec(DECISION_CODES),
    Tag.ISSUER_DATA: _TagCodec(_check_icc, bytes, _dec_raw),
}

# Card data: refused (MSG_CLEAR_PAN) in any message other than those whose table lists them.
CARD_DATA_TAGS = frozenset({Tag.PAN, Tag.EXPIRY, Tag.TRACK2, Tag.PIN_BLOCK, Tag.KSN})
# Shown by repr as a length only: card data or secrets.
SECRET_FIELDS = frozenset({"track2", "icc", "pin_block", "ksn", "issuer_icc"})


def _raise(e: Exception) -> None:
    raise e
