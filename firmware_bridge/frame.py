"""Byte-level framing of the reader link: CRC, DLE stuffing, encoder and a sans-I/O parser.

Wire format (PROTOCOL.md section 2):
    DLE STX | stuffed(header + payload) | DLE ETX | stuffed(CRC-16 big-endian)
Header: version(1) type(1) flags(1) seq(1) epoch(4 BE) length(2 BE). The CRC is
CRC-16/CCITT-FALSE over the unstuffed header and payload. Every DLE (0x10) in the header,
payload or CRC is sent twice, so an unpaired DLE STX always starts a frame: after garbage or a
lost byte the parser resynchronises on the next one.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass, field

from guard.core.errors import LinkError

from firmware_bridge.constants import (
    CRC_INIT,
    DLE,
    EPOCH_MAX,
    ETX,
    FLAG_RETRANSMISSION,
    HEADER_FORMAT,
    HEADER_LEN,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    SEQ_MODULO,
    STX,
    T1_S,
    FrameType,
)

_DLE = bytes([DLE])
_DLE_DLE = bytes([DLE, DLE])
_START = bytes([DLE, STX])
_END = bytes([DLE, ETX])
_HEADER = struct.Struct(HEADER_FORMAT)
_FRAME_TYPES = frozenset(int(t) for t in FrameType)


class FrameError(LinkError):
    """A frame was rejected. Returned by FrameParser (not raised), raised by the encoder.

    Codes: FRAME_BAD_CRC, FRAME_BAD_VERSION, FRAME_BAD_LENGTH, FRAME_BAD_TYPE, FRAME_TOO_SHORT,
    FRAME_TOO_LONG, FRAME_GAP (T1 exceeded), FRAME_ABORTED (DLE STX inside a frame),
    FRAME_BAD_ESCAPE (DLE followed by a byte other than DLE, STX, ETX), FRAME_BAD_FIELD (encoder).
    """

    code = "FRAME_ERROR"


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF): b"123456789" -> 0x29B1."""
    return binascii.crc_hqx(data, CRC_INIT)


def stuff(data: bytes) -> bytes:
    """Double every DLE so that DLE STX / DLE ETX can only be frame delimiters."""
    return data.replace(_DLE, _DLE_DLE)


@dataclass(frozen=True, repr=False)
class Frame:
    """One link frame. ``crc`` is the CRC as received (parser only; not part of equality)."""

    kind: FrameType
    seq: int = 0
    epoch: int = 0
    payload: bytes = b""
    flags: int = 0
    crc: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if int(self.kind) not in _FRAME_TYPES:
            raise FrameError(f"unknown frame type {int(self.kind)}", code="FRAME_BAD_FIELD")
        object.__setattr__(self, "kind", FrameType(self.kind))
        if not 0 <= self.seq < SEQ_MODULO:
            raise FrameError("sequence number must be 0..255", code="FRAME_BAD_FIELD")
        if not 0 <= self.epoch <= EPOCH_MAX:
            raise FrameError("epoch must fit in 32 bits", code="FRAME_BAD_FIELD")
        if not 0 <= self.flags <= 0xFF:
            raise FrameError("flags must fit in one byte", code="FRAME_BAD_FIELD")
        if len(self.payload) > MAX_PAYLOAD:
            raise FrameError(f"payload exceeds {MAX_PAYLOAD} bytes", code="FRAME_TOO_LONG")

    @property
    def retransmission(self) -> bool:
        return bool(self.flags & FLAG_RETRANSMISSION)

    def header(self) -> bytes:
        """The 10 unstuffed header bytes."""
        return _HEADER.pack(PROTOCOL_VERSION, self.kind, self.flags, self.seq, self.epoch, len(self.payload))

    def __repr__(self) -> str:
        # The payload may hold a clear PAN (AUTH): show its size only.
        return (
            f"Frame({self.kind.name} seq={self.seq} epoch=0x{self.epoch:08x} "
            f"flags=0x{self.flags:02x} payload=<{len(self.payload)} bytes>)"
        )


def encode_frame(frame: Frame) -> bytes:
    """Wire bytes of ``frame``: delimiters, stuffed header+payload, stuffed big-endian CRC."""
    body = frame.header() + frame.payload
    return _START + stuff(body) + _END + stuff(crc16(body).to_bytes(2, "big"))


# Parser states
_HUNT, _HUNT_DLE, _BODY, _BODY_DLE, _CRC, _CRC_DLE = range(6)
_IN_FRAME = frozenset({_BODY, _BODY_DLE, _CRC, _CRC_DLE})


def _stray_escape(b: int, body: bytearray, out: list[Frame | FrameError]) -> int:
    """Inside a frame, DLE then ``b`` (not DLE, not ETX in the body): DLE STX aborts the frame and
    starts a new one; anything else is a bad escape. Returns the parser's next state."""
    if b == STX:
        out.append(FrameError("new frame started inside a frame", code="FRAME_ABORTED"))
        body.clear()
        return _BODY
    out.append(FrameError(f"DLE followed by 0x{b:02x}", code="FRAME_BAD_ESCAPE"))
    return _HUNT


class FrameParser:
    """Sans-I/O frame parser: bytes and their arrival time in, frames and rejections out.

    Memory is bounded by HEADER_LEN + max_payload. Bytes outside frames are counted in
    ``discarded`` and otherwise ignored. A gap of ``t1`` or more between two bytes of one frame
    drops it (FRAME_GAP); callers that see no new bytes call ``poll`` by ``deadline()``.
    """

    def __init__(self, *, t1: float = T1_S, max_payload: int = MAX_PAYLOAD) -> None:
        self._t1 = t1
        self._max_body = HEADER_LEN + max_payload
        self._state = _HUNT
        self._body = bytearray()
        self._crc = bytearray()
        self._last: float | None = None
        self.discarded = 0

    @property
    def in_frame(self) -> bool:
        return self._state in _IN_FRAME

    def deadline(self) -> float | None:
        """When the partial frame being received expires (None when between frames)."""
        if self._state in _IN_FRAME and self._last is not None:
            return self._last + self._t1
        return None

    def poll(self, now: float) -> list[Frame | FrameError]:
        """Apply the T1 timer without new bytes."""
        out: list[Frame | FrameError] = []
        self._expire(now, out)
        return out

    def feed(self, data: bytes, now: float) -> list[Frame | FrameError]:
        """Consume ``data`` (all of it received at ``now``); return completed frames and errors."""
        out: list[Frame | FrameError] = []
        self._expire(now, out)
        if not data:
            return out
        self._last = now
        st = self._state
        body = self._body
        crc = self._crc
        i = 0
        n = len(data)
        while i < n:
            if st == _HUNT:
                j = data.find(_DLE, i)
                if j < 0:
                    self.discarded += n - i
                    break
                self.discarded += j - i
                i = j + 1
                st = _HUNT_DLE
            elif st == _HUNT_DLE:
                b = data[i]
                i += 1
                if b == STX:
                    body.clear()
                    st = _BODY
                elif b != DLE:
                    self.discarded += 2
                    st = _HUNT
                else:
                    self.discarded += 1
            elif st == _BODY:
                j = data.find(_DLE, i)
                end = n if j < 0 else j
                if end - i > self._max_body - len(body):
                    out.append(FrameError("frame longer than the maximum payload", code="FRAME_TOO_LONG"))
                    st = _HUNT
                    i = end
                    continue
                body += data[i:end]
                i = end
                if j >= 0:
                    i = j + 1
                    st = _BODY_DLE
            elif st == _BODY_DLE:
                b = data[i]
                i += 1
                if b == DLE:
                    if len(body) >= self._max_body:
                        out.append(FrameError("frame longer than the maximum payload", code="FRAME_TOO_LONG"))
                        st = _HUNT
                    else:
                        body.append(DLE)
                        st = _BODY
                elif b == ETX:
                    crc.clear()
                    st = _CRC
                else:
                    st = _stray_escape(b, body, out)
            elif st == _CRC:
                b = data[i]
                i += 1
                if b == DLE:
                    st = _CRC_DLE
                else:
                    crc.append(b)
                    if len(crc) == 2:
                        out.append(self._finish())
                        st = _HUNT
            else:  # _CRC_DLE
                b = data[i]
                i += 1
                if b == DLE:
                    crc.append(DLE)
                    if len(crc) == 2:
                        out.append(self._finish())
                        st = _HUNT
                    else:
                        st = _CRC
                else:
                    st = _stray_escape(b, body, out)
        self._state = st
        return out

    def _expire(self, now: float, out: list[Frame | FrameError]) -> None:
        if self._last is None or now < self._last + self._t1:  # same expression as deadline()
            return
        if self._state in _IN_FRAME:
            out.append(FrameError(f"gap of {now - self._last:.3f} s inside a frame", code="FRAME_GAP"))
            self._state = _HUNT
        elif self._state == _HUNT_DLE:
            self._state = _HUNT

    def _finish(self) -> Frame | FrameError:
        body = bytes(self._body)
        received = (self._crc[0] << 8) | self._crc[1]
        if len(body) < HEADER_LEN:
            return FrameError(f"frame body of {len(body)} bytes is shorter than the header", code="FRAME_TOO_SHORT")
        if crc16(body) != received:
            return FrameError("CRC mismatch", code="FRAME_BAD_CRC")
        version, kind, flags, seq, epoch, length = _HEADER.unpack_from(body)
        if version != PROTOCOL_VERSION:
            return FrameError(f"protocol version {version} (expected {PROTOCOL_VERSION})", code="FRAME_BAD_VERSION")
        if length != len(body) - HEADER_LEN:
            return FrameError(f"length field {length}, payload {len(body) - HEADER_LEN} bytes", code="FRAME_BAD_LENGTH")
        if kind not in _FRAME_TYPES:
            return FrameError(f"unknown frame type 0x{kind:02x}", code="FRAME_BAD_TYPE")
        return Frame(FrameType(kind), seq, epoch, body[HEADER_LEN:], flags, crc=received)
