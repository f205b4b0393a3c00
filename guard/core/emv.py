"""Chip (EMV) data as the guard handles it: a strict BER-TLV parser, the rules ICC data from a
reader must keep, entry modes and card decisions, and the non-sensitive facts the journal keeps.

ICC data travels only in memory and the encrypted vault. The journal keeps what a dispute needs
(AID, application label, ATC, TVR, TSI, CVM results, cryptogram type) and never track data,
the PAN, the cardholder name or discretionary data (PCI DSS 3.3.1.1, 3.4.1): tags in
``FORBIDDEN_TAGS`` are refused inside ICC data, whatever their depth.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from guard.core.errors import RequestInvalid

ICC_MAX_LEN = 255  # field 55 as most acquirer specs size it (LLL, up to 255 bytes of BER-TLV)
MAX_DEPTH = 3  # template nesting a reader's field-55 data needs (70/77 -> 71/72 -> primitives)
# Track 2 eq (57), PAN (5A), cardholder name (5F20), track 1 / 2 discretionary data (9F1F, 9F20),
# track 1 eq (56), contactless track 2 (9F6B): never inside ICC data handed to the guard.
FORBIDDEN_TAGS = frozenset({0x57, 0x5A, 0x5F20, 0x9F1F, 0x9F20, 0x56, 0x9F6B})
# Tags whose value may be journaled (hex, or text for the label) and the name it is journaled under.
FACT_TAGS: Mapping[int, str] = {0x4F: "aid", 0x84: "aid", 0x50: "label", 0x9F36: "atc", 0x95: "tvr", 0x9B: "tsi",
                                0x9F34: "cvm"}
TAG_CID = 0x9F27  # cryptogram information data: bits 8-7 say AAC (00), TC (01), ARQC (10)
TAG_ISSUER_AUTH = 0x91  # issuer authentication data (0210 field 55)
CRYPTOGRAM_TYPES = {0x00: "AAC", 0x40: "TC", 0x80: "ARQC"}
# 13+ digits standing alone, as the journal's card-number guard reads them (Luhn or not)
_DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z.])\d(?:[ -]?\d){12,}(?![0-9A-Za-z])")
TRACK2_MAX = 37  # ISO/IEC 7813 track 2 (tag 57: n..37 with separator D)


class EntryMode(str, enum.Enum):
    """How the card was read (ISO 8583 field 22, first two digits, per host profile)."""

    MANUAL = "MANUAL"
    MAGSTRIPE = "MAGSTRIPE"
    CHIP = "CHIP"
    CONTACTLESS = "CONTACTLESS"
    FALLBACK = "FALLBACK"  # chip could not be read: magnetic stripe instead

    @property
    def awaits_card(self) -> bool:
        """A host approval is final only once the card accepts it (second GENERATE AC)."""
        return self in (EntryMode.CHIP, EntryMode.CONTACTLESS)

    @property
    def swiped(self) -> bool:
        """Magnetic stripe data: never approved offline (schemes and acquirers refuse it)."""
        return self in (EntryMode.MAGSTRIPE, EntryMode.FALLBACK)


class CardDecision(str, enum.Enum):
    """What a reader's COMPLETE reports about the card's final decision."""

    ACCEPTED = "ACCEPTED"  # TC from the second GENERATE AC
    CARD_DECLINED = "CARD_DECLINED"  # AAC after the host approved ("chip reject after approval")
    CARD_REMOVED = "CARD_REMOVED"
    TERMINAL_ERROR = "TERMINAL_ERROR"


@dataclass(frozen=True, repr=False)
class Tlv:
    tag: int
    value: bytes
    children: tuple[Tlv, ...] = ()

    def __repr__(self) -> str:  # never the value: it may be card data
        return f"Tlv({self.tag:X}, {len(self.value)} bytes)"


def _bad(why: str, code: str = "REQUEST_ICC_MALFORMED") -> RequestInvalid:
    return RequestInvalid(f"ICC data: {why}", code=code)


def parse_tlv(data: bytes, depth: int = 0) -> tuple[Tlv, ...]:
    """Strict BER-TLV (EMV Book 3 annex B): tags of 1-3 bytes, definite lengths of 1-3 bytes in
    minimal form, no padding, no repeated tag at one level, constructed values parsed down to
    MAX_DEPTH. Raises RequestInvalid (REQUEST_ICC_MALFORMED) on anything else."""
    out: list[Tlv] = []
    seen: set[int] = set()
    i, n = 0, len(data)
    while i < n:
        first = data[i]
        if first in (0x00, 0xFF):
            raise _bad("padding byte between objects")
        tag, i = first, i + 1
        if first & 0x1F == 0x1F:
            for k in range(2):
                if i >= n:
                    raise _bad("tag cut short")
                b = data[i]
                if k == 0 and b == 0x80:
                    raise _bad("tag not in minimal form")
                tag, i = (tag << 8) | b, i + 1
                if not b & 0x80:
                    break
            else:
                raise _bad("tag longer than 3 bytes")
        if i >= n:
            raise _bad("length missing")
        lb, i = data[i], i + 1
        if lb < 0x80:
            length = lb
        elif lb in (0x81, 0x82):
            m = lb & 0x7F
            if n - i < m:
                raise _bad("length cut short")
            length = int.from_bytes(data[i:i + m], "big")
            i += m
            if length < (0x80 if m == 1 else 0x100):
                raise _bad("length not in minimal form")
        else:
            raise _bad("indefinite or over-long length")
        if n - i < length:
            raise _bad("value runs past the end")
        value = data[i:i + length]
        i += length
        if tag in seen:
            raise _bad("tag repeated at one level")
        seen.add(tag)
        children: tuple[Tlv, ...] = ()
        if _constructed(tag):
            if depth + 1 >= MAX_DEPTH:
                raise _bad("templates nested too deep")
            children = parse_tlv(value, depth + 1)
        out.append(Tlv(tag, value, children))
    return tuple(out)


def _constructed(tag: int) -> bool:
    first = tag
    while first > 0xFF:
        first >>= 8
    return bool(first & 0x20)


def walk(objs: tuple[Tlv, ...]) -> list[Tlv]:
    """Every object, depth first (templates and the primitives inside them)."""
    out: list[Tlv] = []
    for o in objs:
        out.append(o)
        out += walk(o.children)
    return out


def check_icc(data: bytes) -> tuple[Tlv, ...]:
    """ICC data from a reader (AUTH, REFUND, COMPLETE): at most ICC_MAX_LEN bytes of strict
    BER-TLV holding no tag of FORBIDDEN_TAGS. Raises RequestInvalid with REQUEST_ICC_TOO_LONG,
    REQUEST_ICC_MALFORMED or REQUEST_ICC_FORBIDDEN_TAG; the message never quotes the data."""
    if len(data) > ICC_MAX_LEN:
        raise _bad(f"more than {ICC_MAX_LEN} bytes", "REQUEST_ICC_TOO_LONG")
    objs = parse_tlv(data)
    for o in walk(objs):
        if o.tag in FORBIDDEN_TAGS:
            raise _bad(f"tag {o.tag:X} must not be sent in ICC data", "REQUEST_ICC_FORBIDDEN_TAG")
    return objs


def facts(data: bytes) -> dict[str, str]:
    """The non-sensitive EMV facts of (already checked) ICC data, for the journal: AID, label,
    ATC, TVR, TSI, CVM results (hex, the label as printable text) and the cryptogram type. A value
    holding a run of 13 or more digits (a reader's garbage that could look like a card number, which the
    journal refuses) has its digits replaced by ``#``: a reader cannot stop the journal with it."""
    out: dict[str, str] = {}
    for o in walk(parse_tlv(data)):
        name = FACT_TAGS.get(o.tag)
        if name == "label":
            out[name] = _no_pan("".join(ch if 0x20 <= ord(ch) < 0x7F else "?" for ch in o.value.decode("latin-1"))[:16])
        elif name is not None:
            out[name] = _no_pan(o.value.hex().upper()[:32])
        elif o.tag == TAG_CID and len(o.value) == 1:
            out["cryptogram"] = CRYPTOGRAM_TYPES.get(o.value[0] & 0xC0, "RFU")
    return out


def _no_pan(v: str) -> str:
    return "".join("#" if ch.isdigit() else ch for ch in v) if _DIGIT_RUN.search(v) else v


def issuer_data(data: bytes) -> bytes:
    """Field 55 of a 0210 as the reader gets it: the data if it is strict BER-TLV within
    ICC_MAX_LEN and holds no forbidden tag, else nothing (the card then declines or the reader
    completes without issuer authentication; never a crash on a host's bytes)."""
    try:
        check_icc(data)
    except RequestInvalid:
        return b""
    return data


def check_track2(track2: str, pan: str) -> None:
    """Track 2 equivalent: the PAN, a separator D (or =), then digits; at most 37 characters."""
    head, sep, tail = track2.upper().replace("=", "D").partition("D")
    if not (sep and 0 < len(track2) <= TRACK2_MAX and head.isdigit() and (not tail or tail.isdigit())
            and track2.isascii()):
        raise RequestInvalid("track 2 equivalent data must be PAN, D, then digits (at most 37)",
                             code="REQUEST_BAD_EMV")
    if head != pan:
        raise RequestInvalid("track 2 equivalent data names another card than the PAN", code="REQUEST_BAD_EMV")
