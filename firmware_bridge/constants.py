"""Reader link protocol facts: bytes, header layout, timers, limits, codes.

Everything a C integrator must match lives here, named, and is restated in
firmware_bridge/PROTOCOL.md (tests check that the two agree). Sources:
firmware_bridge/PROTOCOL.md, ZVT PA00P016_04 (DLE framing, T1),
Silicon Labs UG101 ASH (CRC'd ACK/NAK, RST/RSTACK resync), CRC RevEng catalogue
(CRC-16/CCITT-FALSE), ISO 8583:1987 (field formats), EMV Book 3 (tag 9F02, n12 BCD amount).
"""

from __future__ import annotations

import enum
from typing import Final

from guard.core.model import TxnState

# --- Line settings (PROTOCOL.md 4.1: 115200 8N1 default, configurable, no flow control) ---
DEFAULT_BAUDRATE: Final = 115200
DEFAULT_BYTESIZE: Final = 8
DEFAULT_PARITY: Final = "N"
DEFAULT_STOPBITS: Final = 1
BITS_PER_BYTE_8N1: Final = 10  # start + 8 data + stop: the cost of one byte on the wire

# --- Framing bytes (ASCII control characters, as in ZVT / ISO 1745 DLE framing) ---
DLE: Final = 0x10
STX: Final = 0x02
ETX: Final = 0x03

PROTOCOL_VERSION: Final = 1

# Header: version(1) type(1) flags(1) seq(1) epoch(4, BE) length(2, BE). Fixed size, no options.
HEADER_FORMAT: Final = ">BBBBIH"
HEADER_LEN: Final = 10
CRC_LEN: Final = 2  # big-endian, after DLE ETX, DLE-stuffed like the body
CRC_INIT: Final = 0xFFFF  # CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no xorout
CRC_CHECK_INPUT: Final = b"123456789"
CRC_CHECK_VALUE: Final = 0x29B1  # RevEng catalogue check value for CRC-16/CCITT-FALSE

# Largest payload (one TLV message). The biggest message defined today (RESULT) is ~220 bytes;
# 512 leaves room for new tags and keeps the reader's receive buffer small.
MAX_PAYLOAD: Final = 512
# Worst case on the wire: every body and CRC byte is DLE and gets doubled.
MAX_WIRE_FRAME: Final = 2 + 2 * (HEADER_LEN + MAX_PAYLOAD) + 2 + 2 * CRC_LEN

SEQ_MODULO: Final = 256  # 8-bit sequence numbers (PROTOCOL.md)
EPOCH_NONE: Final = 0  # carried by SYNC frames; never chosen as a link epoch
EPOCH_MAX: Final = 0xFFFF_FFFF
SYNC_NONCE_LEN: Final = 4


class FrameType(enum.IntEnum):
    """Header byte 1. Every frame, ACK and NAK included, is CRC-checked (ASH lesson)."""

    DATA = 0x01
    ACK = 0x02
    NAK = 0x03
    SYNC = 0x04
    SYNC_ACK = 0x05


FLAG_RETRANSMISSION: Final = 0x01  # header byte 2, bit 0; bits 1-7 sent as 0, ignored on receipt
FLAGS_KNOWN: Final = FLAG_RETRANSMISSION

# --- Timers and retry policy (PROTOCOL.md 4.1; ZVT uses the same T1) ---
T1_S: Final = 0.200  # a gap of T1 or more between two bytes of one frame drops the frame
T2_S: Final = 1.000  # no ACK within T2 after sending a DATA frame: retransmit
ACK_DEADLINE_S: Final = 0.100  # a receiver sends its ACK within this time, before processing
MAX_RETRANSMISSIONS: Final = 3  # after the 3rd unanswered retransmission the link is down
SYNC_INTERVAL_S: Final = T2_S  # SYNC is repeated every T2 until a SYNC_ACK arrives, forever
MAX_SEND_QUEUE: Final = 16  # messages waiting behind the outstanding DATA frame

# --- Reasons carried by LinkDown / SendFailed events (stable codes) ---
DOWN_RETX_EXHAUSTED: Final = "LINK_RETX_EXHAUSTED"
DOWN_PEER_RESYNC: Final = "LINK_PEER_RESYNC"
DOWN_LOCAL_RESYNC: Final = "LINK_LOCAL_RESYNC"

# --- Reader application timer (PROTOCOL.md 7.6: PROGRESS keeps it alive, 30 s, capped at 120 s) ---
READER_APP_TIMEOUT_S: Final = 30
READER_APP_TIMEOUT_CAP_S: Final = 120
# The guard's PROGRESS while a request waits: every 10 s, asking for 30 s more, so two PROGRESS in
# a row may be lost before the reader's 30 s timer runs out (PROTOCOL.md 7.6).
PROGRESS_INTERVAL_S: Final = 10.0
PROGRESS_WAIT_S: Final = 30


# --- Application messages: payload = type(1) then TLVs: tag(1) length(2, BE) value ---
TLV_HEADER_LEN: Final = 3


class MsgType(enum.IntEnum):
    """Payload byte 0. Reader to guard: 0x01-0x7F; guard to reader: 0x81-0xFF."""

    AUTH = 0x01
    VOID = 0x02
    REFUND = 0x03
    CONFIRM = 0x04
    STATUS = 0x05
    PING = 0x06
    CANCEL = 0x07
    SIGNED = 0x08
    COMPLETE = 0x09  # the card's final decision on a chip sale the host approved (PROTOCOL.md section 12)
    RESULT = 0x81
    PROGRESS = 0x82
    PONG = 0x83
    ERROR = 0x84


class Tag(enum.IntEnum):
    """TLV tags. 0x01-0x1F request data, 0x20-0x3F result data."""

    TXN_ID = 0x01  # 16 bytes, reader-generated
    AMOUNT = 0x02  # 6 bytes BCD, n12, minor units (same encoding as EMV tag 9F02)
    CURRENCY = 0x03  # 3 ASCII digits, ISO 4217 numeric
    PAN = 0x04  # 12-19 ASCII digits; only in AUTH and REFUND
    EXPIRY = 0x05  # 4 ASCII digits YYMM; only in AUTH and REFUND
    ORIGINAL_TXN_ID = 0x06  # 16 bytes
    READER_ID = 0x07  # 1-32 ASCII 0x21-0x7E except ':'
    LAST = 0x08  # 1 byte 0x01: STATUS of the reader's newest transaction
    # Chip cards (PROTOCOL.md section 12); TRACK2, PIN_BLOCK and KSN only in AUTH and REFUND
    ENTRY_MODE = 0x09  # 1 byte, ENTRY_MODE_CODES
    PAN_SEQ = 0x0A  # 3 ASCII digits: card sequence number (EMV 5F34)
    TRACK2 = 0x0B  # ASCII: track 2 equivalent (EMV 57), PAN 'D' digits, at most 37
    ICC_DATA = 0x0C  # BER-TLV, at most 255 bytes: the card's field-55 data (AUTH, REFUND, COMPLETE)
    PIN_BLOCK = 0x0D  # 8 bytes: online PIN block (ISO 9564), encrypted under the DUKPT key
    KSN = 0x0E  # 10 bytes: the PIN block's DUKPT key serial number
    CARD_DECISION = 0x0F  # 1 byte, DECISION_CODES
    STATE = 0x20  # 1 byte, STATE_CODES
    RESPONSE_CODE = 0x21  # 2 ASCII (ISO 8583 field 39, an2)
    APPROVAL_CODE = 0x22  # 1-6 ASCII (field 38, an6)
    RRN = 0x23  # 1-12 ASCII (field 37, an12)
    MASKED_PAN = 0x24  # 12-19 of digits and '*', at most first 6 and last 4 digits shown
    DISPLAY_TEXT = 0x25  # 1-64 bytes UTF-8, no control characters
    ERROR_CODE = 0x26  # 1-64 of A-Z 0-9 _ :  (stable PosguardError / Result.reason codes)
    IN_PROGRESS = 0x27  # 1 byte 0x00 / 0x01
    STAN = 0x28  # 4 bytes big-endian, 1..999999 (field 11)
    WAIT_S = 0x29  # 2 bytes big-endian, 1..120: seconds the reader should keep waiting
    APPROVED_AMOUNT = 0x2A  # 6 bytes BCD like AMOUNT: what a partial approval (PARTIAL) approved
    ISSUER_DATA = 0x2B  # BER-TLV, at most 255 bytes: the issuer's field 55 (91, 71, 72) for the card


# TxnState <-> 1-byte code on the wire. 0x00 is never used, so a zeroed buffer is not a state.
STATE_CODES: Final[dict[TxnState, int]] = {
    TxnState.JOURNALED: 0x01,
    TxnState.SENT: 0x02,
    TxnState.APPROVED: 0x03,
    TxnState.DECLINED: 0x04,
    TxnState.UNKNOWN: 0x05,
    TxnState.REVERSAL_PENDING: 0x06,
    TxnState.REVERSED: 0x07,
    TxnState.NEEDS_MANUAL: 0x08,
    TxnState.HELD: 0x09,
    TxnState.DEFERRED: 0x0A,
    TxnState.PARTIAL: 0x0B,
    TxnState.AWAITING_COMPLETION: 0x0C,
}
STATE_BY_CODE: Final[dict[int, TxnState]] = {v: k for k, v in STATE_CODES.items()}

# emv.EntryMode <-> 1 byte (the ISO 8583 field 22 entry digits); emv.CardDecision <-> 1 byte.
ENTRY_MODE_CODES: Final[dict[str, int]] = {"MANUAL": 0x01, "MAGSTRIPE": 0x02, "CHIP": 0x05, "CONTACTLESS": 0x07,
                                           "FALLBACK": 0x80}
DECISION_CODES: Final[dict[str, int]] = {"ACCEPTED": 0x01, "CARD_DECLINED": 0x02, "CARD_REMOVED": 0x03,
                                         "TERMINAL_ERROR": 0x04}

TXN_ID_LEN: Final = 16
AMOUNT_BCD_LEN: Final = 6
AMOUNT_MAX: Final = 999_999_999_999  # n12, matches guard.core.model.Request
DISPLAY_TEXT_MAX: Final = 64  # bytes of UTF-8
ERROR_CODE_MAX: Final = 64
READER_ID_MAX: Final = 32
STAN_MAX: Final = 999_999

# ERROR_CODE sent when STATUS names a transaction the guard does not know (or LAST finds none).
ERR_TXN_UNKNOWN: Final = "TXN_UNKNOWN"
