"""Seeded fuzz campaign: 100,000+ random and mutated byte streams through FrameParser and
decode_message. No exception other than the documented ones; no delivered frame whose CRC
(recomputed here, independently) fails; bounded run time."""

from __future__ import annotations

import binascii
import random
import struct
import time
from collections import Counter

from firmware_bridge.constants import T1_S, FrameType, MsgType, Tag
from firmware_bridge.frame import Frame, FrameError, FrameParser, encode_frame
from firmware_bridge.messages import (
    Auth,
    Confirm,
    ErrorMessage,
    Message,
    MessageError,
    Ping,
    Pong,
    Progress,
    Refund,
    ResultMessage,
    Status,
    Void,
    decode_message,
    encode_message,
)
from guard.core.model import TxnState

STREAMS = 100_000
SEED = 0x5EED_F022
SPECIAL = bytes([0x10, 0x10, 0x10, 0x02, 0x03, 0x00, 0xFF])


def sample_messages(rng: random.Random) -> list[Message]:
    out: list[Message] = []
    for i in range(12):
        tid = rng.randbytes(16)
        out += [
            Auth(tid, rng.randint(1, 10**12 - 1), "978", "4761739001010119", "2512" if i % 2 else None, "lane-1" if i % 3 else None),
            Void(tid, rng.randint(1, 99999), "840", rng.randbytes(16)),
            Refund(tid, rng.randint(1, 99999), "826", "4761739001010119", None, rng.randbytes(16) if i % 2 else None),
            Confirm(tid),
            Status(tid) if i % 2 else Status(last=True, reader_id="R1"),
            Ping(tid),
            ResultMessage(tid, rng.choice(list(TxnState)), "APPROVED 123456", bool(i % 2), 1250, "978", "00", "123456", "123456789012", "476173******0119", "NO_HOST" if i % 2 else None, rng.randint(1, 999_999)),
            Progress(tid, "PLEASE WAIT", rng.randint(1, 120)),
            Pong(tid),
            ErrorMessage("IDEMPOTENCY_MISMATCH", tid, "ID REUSED"),
        ]
    return out


def sample_frames(rng: random.Random, payloads: list[bytes]) -> list[Frame]:
    fs: list[Frame] = []
    for p in payloads:
        fs.append(Frame(FrameType.DATA, rng.randrange(256), rng.choice([0x10101010, 0x1B2C3D4E, rng.getrandbits(32)]), p, rng.choice([0, 1])))
    for _ in range(40):
        e = rng.getrandbits(32)
        fs += [
            Frame(FrameType.ACK, rng.randrange(256), e),
            Frame(FrameType.NAK, rng.randrange(256), e),
            Frame(FrameType.SYNC, 0, 0, rng.randbytes(4)),
            Frame(FrameType.SYNC_ACK, 0, e, rng.randbytes(4)),
        ]
    return fs


def mutate(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:  # bit flips
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(b) * 8)
                b[i // 8] ^= 1 << (i % 8)
        elif op == 1:  # insertion (biased towards delimiter bytes)
            i = rng.randrange(len(b) + 1)
            ins = bytes(rng.choice(SPECIAL) if rng.random() < 0.5 else rng.randrange(256) for _ in range(rng.randint(1, 6)))
            b[i:i] = ins
        elif op == 2 and b:  # deletion
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 6)]
        elif op == 3:  # splice with another stream
            d = rng.choice(donors)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(d) + 1)
            b = b[:i] + bytearray(d[j:])
        elif op == 4 and b:  # duplicate a segment
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randint(1, 20))
            b[j:j] = b[i:j]
        elif op == 5 and b:  # overwrite one byte with a delimiter byte
            b[rng.randrange(len(b))] = rng.choice(SPECIAL)
    return bytes(b)


def random_tlvs(rng: random.Random) -> bytes:
    """Well-formed TLV structure, known type and tags, random values of plausible lengths."""
    out = bytearray([rng.choice([int(t) for t in MsgType])])
    for _ in range(rng.randint(0, 10)):
        tag = rng.choice([int(t) for t in Tag] + [0x7F])
        value = rng.randbytes(rng.choice((0, 1, 2, 3, 4, 6, 12, 16, rng.randrange(70))))
        if rng.random() < 0.5:
            value = bytes(48 + b % 10 for b in value)  # ASCII digits
        out += bytes([tag]) + len(value).to_bytes(2, "big") + value
    return bytes(out)


def crc_ok(f: Frame) -> bool:
    """Recompute the CRC from the frame's fields (independent header packing)."""
    header = struct.pack(">BBBBIH", 1, int(f.kind), f.flags, f.seq, f.epoch, len(f.payload))
    return f.crc is not None and binascii.crc_hqx(header + f.payload, 0xFFFF) == f.crc


def check_decode(payload: bytes, counts: Counter[str]) -> None:
    try:
        msg = decode_message(payload)
    except MessageError as e:
        counts["decode_error:" + e.code] += 1
        return
    counts["decoded"] += 1
    assert decode_message(encode_message(msg)) == msg
    repr(msg)


def test_fuzz_frame_parser_and_message_decoder() -> None:
    rng = random.Random(SEED)
    messages = sample_messages(rng)
    payloads = [encode_message(m) for m in messages]
    pool = sample_frames(rng, payloads)
    pool_set = {(f.kind, f.seq, f.epoch, f.payload, f.flags) for f in pool}
    wires = [encode_frame(f) for f in pool]
    counts: Counter[str] = Counter()
    start = time.monotonic()

    for n in range(STREAMS):
        kind = n % 4
        if kind == 0:  # pure noise, biased towards framing bytes
            stream = bytes(rng.choice(SPECIAL) if rng.random() < 0.2 else rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        elif kind == 1:  # noise that starts frames
            stream = b"\x10\x02" + rng.randbytes(rng.randrange(0, 80)) + b"\x10\x03" + rng.randbytes(2)
        else:  # valid frames, concatenated, then mutated
            stream = b"".join(rng.choice(wires) for _ in range(rng.randint(1, 3)))
            if kind == 2 or rng.random() < 0.9:
                stream = mutate(rng, stream, wires)
        counts["stream_bytes"] += len(stream)

        p = FrameParser()
        now = 0.0
        i = 0
        items: list[Frame | FrameError] = []
        while i < len(stream):
            j = min(len(stream), i + rng.randint(1, 64))
            items += p.feed(stream[i:j], now)
            now += T1_S * 2 if rng.random() < 0.02 else 0.001
            i = j
        items += p.poll(now + T1_S)
        assert not p.in_frame
        assert len(p._body) <= 10 + 512

        for it in items:
            if isinstance(it, FrameError):
                counts["frame_error:" + it.code] += 1
                continue
            counts["frames"] += 1
            assert crc_ok(it), it
            if (it.kind, it.seq, it.epoch, it.payload, it.flags) not in pool_set:
                counts["novel_frames"] += 1
            if it.kind is FrameType.DATA:
                check_decode(it.payload, counts)

        # the decoder alone, on mutated valid payloads and on random ones
        if n % 3 == 0:
            check_decode(mutate(rng, rng.choice(payloads), payloads), counts)
        elif n % 3 == 1:
            check_decode(random_tlvs(rng), counts)
        else:
            check_decode(bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 40)), counts)
        counts["streams"] += 1

    elapsed = time.monotonic() - start
    summary = {k: counts[k] for k in sorted(counts)}
    print(f"\nfuzz: {STREAMS} streams in {elapsed:.1f} s: {summary}")
    assert counts["streams"] == STREAMS
    decode_attempts = sum(v for k, v in counts.items() if k == "decoded" or k.startswith("decode_error:"))
    assert decode_attempts >= STREAMS
    assert counts["frames"] > STREAMS // 4  # the campaign really exercised delivery
    assert counts["frame_error:FRAME_BAD_CRC"] > 1000 and counts["decode_error:MSG_TRUNCATED"] > 100
    assert counts["novel_frames"] <= STREAMS // 10_000  # CRC-16 lets ~1/65536 random candidates through
