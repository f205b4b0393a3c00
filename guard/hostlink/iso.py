"""ISO 8583 codec and stream framing for the host link (sans-I/O).

``HostCodec`` turns a field dict into framed wire bytes (length header, optional 5-byte TPDU,
message) and hands out ``FrameDecoder`` objects that turn a byte stream back into
``HostMessage`` / ``HostGarbage`` items. Nothing here touches sockets, files or clocks.

Framing rules (docs/HOST.md "Transport and framing"; jPOS channel conventions):

- ``binary2``: 2-byte big-endian length; ``ascii4``: 4 ASCII decimal digits.
- The length counts TPDU + message. A TPDU is ``0x60 + dest(2) + source(2)``; a response swaps
  dest and source.

Stream health: after ``HOST_BAD_LENGTH`` the decoder cannot know where the next frame starts, so
it marks itself ``broken`` and ignores further input. The adapter must drop the connection and
reconnect (``guard.hostlink.uplink.Uplink.poll`` does this). Every other garbage code skips exactly one
frame and the stream stays usable.

Card data: ``HostGarbage`` never carries raw bytes (they could hold a PAN); it carries a
sha256 digest prefix and lengths. ``HostMessage.__repr__`` masks card fields.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import iso8583
import iso8583.specs

from guard.core.constants import (
    ECHO_FIELDS,
    F_ORIGINAL_DATA,
    F_PAN,
    HOST_HEADER_BINARY2,
    HOST_HEADERS,
    HOST_MAX_MESSAGE,
    TPDU_ID,
    TPDU_LEN,
)
from guard.core.errors import CodecError, ConfigError, HostProtocolError
from guard.core.fields import echo_mismatches, field90, transmission_dt
from guard.core.model import mask_pan

# Stable garbage codes (documented on guard.core.errors.HostProtocolError).
HOST_FRAME_TRUNCATED = "HOST_FRAME_TRUNCATED"
HOST_BAD_LENGTH = "HOST_BAD_LENGTH"
HOST_BAD_TPDU = "HOST_BAD_TPDU"
HOST_UNDECODABLE = "HOST_UNDECODABLE"
HOST_BAD_MTI = "HOST_BAD_MTI"
# Raised (as CodecError) when *we* cannot build a message; never produced by the decoder.
HOST_ENCODE_INVALID = "HOST_ENCODE_INVALID"

# MTI classes (version + class digit, see ``mti_class``) that posguard routes.
KNOWN_MTI_CLASSES: frozenset[str] = frozenset({"02", "04", "08"})

DIGEST_HEX_CHARS = 16

# ISO 8583:1987 numeric (n) fields: a non-digit value is a format error whatever the encoding.
NUMERIC_FIELDS: frozenset[str] = frozenset(
    {"2", "3", "4", "5", "6", "7", "11", "12", "13", "14", "15", "18", "19", "22", "23", "25",
     "32", "33", "49", "70", "90"}
)
# Fields whose value must never appear in a repr or a log line.
_SECRET_FIELDS: frozenset[str] = frozenset({"35", "36", "45", "52", "55"})

_SAFE_MSG = re.compile(r"^[A-Za-z0-9 ,.\-]*$")
_F7_OK = re.compile(r"(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])(?:[01][0-9]|2[0-3])[0-5][0-9][0-5][0-9]")
_DROP_KEYS = ("p", "1", "h")


def redact(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` safe to log: PAN masked, track/PIN/ICC data and expiry hidden."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if k == F_PAN and isinstance(v, str):
            out[k] = mask_pan(v)
        elif k in _SECRET_FIELDS or k == "14":
            out[k] = "<redacted>"
        else:
            out[k] = v
    return out


def digest(data: bytes | bytearray | memoryview) -> str:
    """Short sha256 fingerprint used instead of raw bytes in diagnostics."""
    return hashlib.sha256(data).hexdigest()[:DIGEST_HEX_CHARS]


@dataclass(frozen=True)
class HostMessage:
    """One decoded ISO 8583 message. ``fields`` has ``t`` (MTI) and data fields, no bitmaps.

    ``raw_len`` is the frame size on the wire (header + TPDU + message); ``tpdu`` is the TPDU
    as received (None when the link has none).
    """

    fields: dict[str, str]
    raw_len: int
    tpdu: bytes | None = None

    @property
    def mti(self) -> str:
        return self.fields.get("t", "")

    def __repr__(self) -> str:
        return f"HostMessage(fields={redact(self.fields)!r}, raw_len={self.raw_len})"


@dataclass(frozen=True)
class HostGarbage:
    """Bytes that could not be used. ``code`` is stable; ``detail`` never holds raw bytes."""

    code: str
    detail: str
    raw_len: int
    digest: str

    def error(self) -> HostProtocolError:
        """The equivalent exception, for callers that prefer raising."""
        return HostProtocolError(self.detail, code=self.code)


# --- MTI and field helpers --------------------------------------------------------------------


def mti_class(mti: str) -> str:
    """Version + class digits: "02" for 0200/0201/0210/0230, "04" for 04xx, "08" for 08xx.

    Matching uses class + 41 + 11 so a 0410 (class 04) can never match a 0210 (class 02) even
    when a reversal reuses the original STAN.
    """
    return mti[:2]


def is_known_mti(mti: str) -> bool:
    """Four digits and a class posguard routes."""
    return len(mti) == 4 and mti.isascii() and mti.isdigit() and mti_class(mti) in KNOWN_MTI_CLASSES


def is_request_mti(mti: str) -> bool:
    """Request or advice (function digit 0 or 2), including repeats (origin digit 1/3)."""
    return is_known_mti(mti) and mti[2] in "02"


def response_mti(request_mti: str) -> str:
    """0200/0201 -> 0210, 0400/0401 -> 0410, 0420/0421 -> 0430, 0800 -> 0810.

    Raises ``HostProtocolError`` (``HOST_BAD_MTI``) for anything that is not a request.
    """
    if not is_request_mti(request_mti):
        raise HostProtocolError("not a request MTI we know", code=HOST_BAD_MTI)
    return f"{request_mti[:2]}{int(request_mti[2]) + 1}0"


def parse_field90(s: str) -> tuple[str, str, str, str, str]:
    """Inverse of ``field90``: (mti, stan, f7, acq, fwd) as fixed-width digit strings.

    Raises ``HostProtocolError`` (``HOST_UNDECODABLE``) when ``s`` is not 42 digits.
    """
    if len(s) != 42 or not (s.isascii() and s.isdigit()):
        raise HostProtocolError(f"field {F_ORIGINAL_DATA} must be 42 digits", code=HOST_UNDECODABLE)
    return s[0:4], s[4:10], s[10:20], s[20:31], s[31:42]


def local_time_date(now: float, tz: _dt.tzinfo | None = None) -> tuple[str, str]:
    """Fields 12 and 13 (hhmmss, MMDD) in ``tz`` (the process's local zone by default)."""
    d = _dt.datetime.fromtimestamp(now, tz) if tz is not None else _dt.datetime.fromtimestamp(now)
    return d.strftime("%H%M%S"), d.strftime("%m%d")


def swap_tpdu(tpdu: bytes) -> bytes:
    """The TPDU of a response: same id, dest and source swapped."""
    return tpdu[:1] + tpdu[3:5] + tpdu[1:3]


def _safe_msg(msg: str) -> str:
    """pyiso8583's message if it cannot contain data; its fixed prefix otherwise."""
    if _SAFE_MSG.match(msg):
        return msg
    return msg.split(",", 1)[0].split(":", 1)[0][:80]


def _valid_mmdd(s: str) -> bool:
    return 1 <= int(s[0:2]) <= 12 and 1 <= int(s[2:4]) <= 31


def _valid_hhmmss(s: str) -> bool:
    return int(s[0:2]) < 24 and int(s[2:4]) < 60 and int(s[4:6]) < 60


def _binary_fields(spec: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(k for k, v in spec.items() if isinstance(v, Mapping) and v.get("data_enc") == "b")


def _format_problem(fields: Mapping[str, str], binary: frozenset[str]) -> str | None:
    """First field that a well-behaved host could not have sent, as "field N: reason"."""
    text = "".join([v for k, v in fields.items() if k not in binary and k != "t"])
    nums = [v for k, v in fields.items() if k in NUMERIC_FIELDS and k not in binary]
    if not (text.isascii() and text.isprintable()) or (nums and not (all(nums) and "".join(nums).isdigit())):
        problem = _field_problem(fields, binary)
        if problem is not None:
            return problem
    return _date_problem(fields)


def _field_problem(fields: Mapping[str, str], binary: frozenset[str]) -> str | None:
    """The first non-printable or non-numeric field, in message order."""
    for k, v in fields.items():
        if k == "t" or k in binary:
            continue
        if not (v.isascii() and v.isprintable()):
            return f"field {k}: non-printable characters"
        if k in NUMERIC_FIELDS and not v.isdigit():
            return f"field {k}: not numeric"
    return None


def _date_problem(fields: Mapping[str, str]) -> str | None:
    """Fields 7, 12 and 13 (digits by then) that are not valid dates or times."""
    f7 = fields.get("7")
    if f7 is not None and not _F7_OK.fullmatch(f7):
        return "field 7: not a valid MMDDhhmmss"
    f12 = fields.get("12")
    if f12 is not None and not (len(f12) == 6 and _valid_hhmmss(f12)):
        return "field 12: not a valid hhmmss"
    f13 = fields.get("13")
    if f13 is not None and not (len(f13) == 4 and _valid_mmdd(f13)):
        return "field 13: not a valid MMDD"
    return None


# --- Codec and decoder ------------------------------------------------------------------------


BUILTIN_SPECS: dict[str, Mapping[str, Any]] = {"default": iso8583.specs.default,
                                               "default_ascii": iso8583.specs.default_ascii}
# What posguard sends and reads: a spec must carry every one of these (checked by a trial round trip).
_SPEC_SAMPLES: tuple[dict[str, str], ...] = (
    {"t": "0200", "2": "4000000000000002",  # a public test card number, only ever in memory "3": "000000", "4": "000000001000", "7": "1130120000", "11": "000001",
     "14": "2912", "41": "TERM0001", "42": "MERCHANT0000001", "49": "978"},
    {"t": "0210", "3": "000000", "4": "000000001000", "7": "1130120000", "11": "000001", "37": "000000000001",
     "38": "123456", "39": "00", "41": "TERM0001", "42": "MERCHANT0000001", "49": "978"},
    {"t": "0401", "3": "200000", "4": "000000001000", "7": "1130120000", "11": "000001", "41": "TERM0001",
     "42": "MERCHANT0000001", "49": "978", "90": field90("0200", 1, "1130120000")},
    {"t": "0800", "7": "1130120000", "11": "000002", "41": "TERM0001", "42": "MERCHANT0000001", "48": '{"k":"v"}',
     "70": "880"},
)


def load_spec(value: str) -> Mapping[str, Any]:
    """The pyiso8583 spec named by config key ``host.spec``: ``default`` (binary bitmap),
    ``default_ascii`` (hex bitmap), or a JSON file holding a pyiso8583 spec dict. A spec that
    cannot carry what posguard sends and reads is refused here, at start, naming the field."""
    if value in BUILTIN_SPECS:
        return BUILTIN_SPECS[value]
    path = Path(value)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError("host.spec", f"not a built-in spec ({', '.join(BUILTIN_SPECS)}) and cannot read "
                          f"{path}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ConfigError("host.spec", f"{path} is not a JSON pyiso8583 spec") from None
    if not isinstance(spec, dict) or not all(isinstance(v, dict) for v in spec.values()):
        raise ConfigError("host.spec", f"{path}: must be a JSON object of field specs, as iso8583.specs.default")
    for sample in _SPEC_SAMPLES:
        try:
            raw, _ = iso8583.encode(dict(sample), spec)
            back, _ = iso8583.decode(raw, spec)
        except (iso8583.EncodeError, iso8583.DecodeError) as e:
            raise ConfigError("host.spec", f"{path}: cannot carry field {e.field} of an {sample['t']}: "
                              f"{_safe_msg(e.msg)}") from None
        except (TypeError, ValueError, AttributeError, KeyError, LookupError) as e:
            raise ConfigError("host.spec", f"{path}: malformed spec ({type(e).__name__})") from None
        lost = [k for k, v in sample.items() if back.get(k) != v]
        if lost:
            raise ConfigError("host.spec", f"{path}: field {lost[0]} of an {sample['t']} does not survive a round trip")
    return spec


class HostCodec:
    """Encoder/framer for one host link configuration.

    ``tpdu`` is the TPDU the terminal sends (``0x60 + dest + source``). A terminal-side decoder
    expects responses to carry it swapped; a host-side decoder (``side="host"``) accepts any
    source and checks the destination, and the host replies with ``swap_tpdu`` of what it got.
    """

    def __init__(
        self,
        spec: Mapping[str, Any] = iso8583.specs.default,
        header: str = HOST_HEADER_BINARY2,
        tpdu: bytes | None = None,
    ) -> None:
        if header not in HOST_HEADERS:
            raise ConfigError("host.header", f"must be one of {', '.join(HOST_HEADERS)}")
        if tpdu is not None and (len(tpdu) != TPDU_LEN or tpdu[0] != TPDU_ID):
            raise ConfigError("host.tpdu", f"must be {TPDU_LEN} bytes starting with 0x{TPDU_ID:02X}")
        self.spec = spec
        self.header = header
        self.tpdu = bytes(tpdu) if tpdu is not None else None

    @property
    def header_len(self) -> int:
        return 2 if self.header == HOST_HEADER_BINARY2 else 4

    def frame(self, payload: bytes | bytearray, *, tpdu: bytes | None = None) -> bytes:
        """Length header + TPDU (``tpdu`` or the codec's) + ``payload``; no ISO validation."""
        t = tpdu if tpdu is not None else self.tpdu
        if self.tpdu is None and tpdu is not None:
            raise CodecError("this link has no TPDU")
        body_len = len(payload) + (len(t) if t is not None else 0)
        if not 0 < body_len <= HOST_MAX_MESSAGE:
            raise CodecError(f"message length {body_len} outside 1..{HOST_MAX_MESSAGE}")
        head = struct.pack(">H", body_len) if self.header == HOST_HEADER_BINARY2 else b"%04d" % body_len
        return b"".join((head, t or b"", payload))

    def encode(self, fields: Mapping[str, str], *, tpdu: bytes | None = None) -> bytes:
        """Framed wire bytes for ``fields`` (``t`` = MTI plus data fields as strings).

        Raises ``CodecError`` naming the field (never its value) when the spec rejects it.
        """
        mti = fields.get("t", "")
        if not is_known_mti(mti):
            raise CodecError("field t: not a known 4-digit MTI")
        doc = dict(fields)  # the library pops "1"/"65" and rewrites "p" in the dict it is given
        problem = "fields cannot be encoded with this spec"
        try:
            raw, _ = iso8583.encode(doc, self.spec)
        except iso8583.EncodeError as e:
            problem = f"field {e.field}: {_safe_msg(e.msg)}"
        except (TypeError, ValueError, AttributeError, KeyError, LookupError):
            pass
        else:
            return self.frame(raw, tpdu=tpdu)
        # Raised outside the except block: the library's error keeps the whole message (field 2
        # included) in doc_dec, and `from None` would still leave it reachable as __context__.
        raise CodecError(problem)

    def decoder(self, side: str = "terminal") -> FrameDecoder:
        """A fresh stream decoder. ``side="terminal"`` decodes host responses, ``"host"`` requests."""
        if side not in ("terminal", "host"):
            raise ConfigError("decoder.side", "must be 'terminal' or 'host'")
        if self.tpdu is None:
            return FrameDecoder(self.spec, self.header)
        if side == "terminal":
            return FrameDecoder(self.spec, self.header, tpdu=True, tpdu_exact=swap_tpdu(self.tpdu))
        return FrameDecoder(self.spec, self.header, tpdu=True, tpdu_dest=self.tpdu[1:3])


class FrameDecoder:
    """Incremental frame splitter + ISO decoder. ``feed`` never raises on any input.

    Memory is bounded: at most one incomplete frame (header + HOST_MAX_MESSAGE) is kept between
    calls. Once ``broken`` (after HOST_BAD_LENGTH) all input is discarded: reconnect.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        header: str,
        *,
        tpdu: bool = False,
        tpdu_exact: bytes | None = None,
        tpdu_dest: bytes | None = None,
    ) -> None:
        self._spec = spec
        self._binary = _binary_fields(spec)
        self._binary_header = header == HOST_HEADER_BINARY2
        self._hlen = 2 if self._binary_header else 4
        self._tpdu = tpdu
        self._tpdu_exact = tpdu_exact
        self._tpdu_dest = tpdu_dest
        self._buf = bytearray()
        self.broken = False

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[HostMessage | HostGarbage]:
        """Consume ``data``; return every complete frame, decoded or as garbage, in order."""
        if self.broken:
            return []
        buf = self._buf
        hlen = self._hlen
        if not buf and type(data) is bytes and len(data) > hlen:
            length = self._parse_length(data[:hlen])
            if length is not None and hlen + length == len(data):
                return [self._decode_frame(memoryview(data)[hlen:], len(data))]
        buf += data
        out: list[HostMessage | HostGarbage] = []
        pos = 0
        while len(buf) - pos >= hlen:
            head = bytes(buf[pos : pos + hlen])
            length = self._parse_length(head)
            if length is None:
                rest = buf[pos:]
                out.append(
                    HostGarbage(
                        HOST_BAD_LENGTH,
                        f"unusable {hlen}-byte length header; stream lost, reconnect "
                        f"({len(rest)} bytes discarded)",
                        len(rest),
                        digest(rest),
                    )
                )
                self.broken = True
                buf.clear()
                return out
            end = pos + hlen + length
            if end > len(buf):
                break
            out.append(self._decode_frame(memoryview(buf)[pos + hlen : end], hlen + length))
            pos = end
        if pos:
            del buf[:pos]
        return out

    def eof(self) -> HostGarbage | None:
        """Call at connection close: a partial frame left over is HOST_FRAME_TRUNCATED."""
        if self.broken or not self._buf:
            self._buf.clear()
            return None
        have = len(self._buf)
        want = self._parse_length(bytes(self._buf[: self._hlen])) if have >= self._hlen else None
        detail = (
            f"connection closed after {have} of {self._hlen + want} frame bytes"
            if want is not None
            else f"connection closed inside a length header ({have} bytes)"
        )
        g = HostGarbage(HOST_FRAME_TRUNCATED, detail, have, digest(self._buf))
        self._buf.clear()
        return g

    def _parse_length(self, head: bytes) -> int | None:
        if self._binary_header:
            length = int.from_bytes(head, "big")
        elif head.isdigit():
            length = int(head)
        else:
            return None
        if length == 0 or length > HOST_MAX_MESSAGE:
            return None
        if self._tpdu and length < TPDU_LEN:
            return None
        return length

    def _decode_frame(self, body: memoryview, raw_len: int) -> HostMessage | HostGarbage:
        tpdu: bytes | None = None
        if self._tpdu:
            tpdu = bytes(body[:TPDU_LEN])
            body = body[TPDU_LEN:]
            if tpdu[0] != TPDU_ID:
                return HostGarbage(HOST_BAD_TPDU, f"TPDU id byte is not 0x{TPDU_ID:02X}", raw_len, digest(tpdu))
            if self._tpdu_exact is not None and tpdu != self._tpdu_exact:
                return HostGarbage(HOST_BAD_TPDU, "TPDU is not our TPDU swapped", raw_len, digest(tpdu))
            if self._tpdu_dest is not None and tpdu[1:3] != self._tpdu_dest:
                return HostGarbage(HOST_BAD_TPDU, "TPDU destination is not this host", raw_len, digest(tpdu))
        raw = bytes(body)
        try:
            doc, _ = iso8583.decode(raw, self._spec)
        except iso8583.DecodeError as e:
            return HostGarbage(
                HOST_UNDECODABLE,
                f"field {e.field} at offset {e.pos}: {_safe_msg(e.msg)} ({len(raw)}-byte message)",
                raw_len,
                digest(raw),
            )
        except Exception:  # noqa: BLE001 - any decoder failure is garbage, never an exception out
            return HostGarbage(HOST_UNDECODABLE, f"decoder failure ({len(raw)}-byte message)", raw_len, digest(raw))
        mti = doc.get("t", "")
        if not is_known_mti(mti):
            return HostGarbage(HOST_BAD_MTI, "MTI is not 4 digits of a known class", raw_len, digest(raw))
        for k in _DROP_KEYS:
            doc.pop(k, None)
        fields = doc
        problem = _format_problem(fields, self._binary)
        if problem is not None:
            return HostGarbage(HOST_UNDECODABLE, f"{problem} ({mti})", raw_len, digest(raw))
        return HostMessage(fields, raw_len, tpdu)


__all__ = [
    "CodecError",
    "FrameDecoder",
    "HOST_BAD_LENGTH",
    "HOST_BAD_MTI",
    "HOST_BAD_TPDU",
    "HOST_ENCODE_INVALID",
    "HOST_FRAME_TRUNCATED",
    "HOST_UNDECODABLE",
    "HostCodec",
    "HostGarbage",
    "HostMessage",
    "KNOWN_MTI_CLASSES",
    "digest",
    "echo_mismatches",
    "field90",
    "is_known_mti",
    "is_request_mti",
    "local_time_date",
    "mti_class",
    "parse_field90",
    "redact",
    "response_mti",
    "swap_tpdu",
    "transmission_dt",
]
