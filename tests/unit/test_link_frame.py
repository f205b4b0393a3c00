"""Framing: CRC, DLE stuffing, header layout, and a parser that delivers exactly the valid frames."""

from __future__ import annotations

import random
import struct

import pytest

from firmware_bridge.constants import (
    CRC_CHECK_INPUT,
    CRC_CHECK_VALUE,
    DLE,
    HEADER_LEN,
    MAX_PAYLOAD,
    MAX_WIRE_FRAME,
    T1_S,
    FrameType,
)
from firmware_bridge.frame import Frame, FrameError, FrameParser, crc16, encode_frame, stuff


def bitwise_crc(data: bytes) -> int:
    """CRC-16/CCITT-FALSE written from its definition, independent of binascii."""
    crc = 0xFFFF
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def raw_frame(body: bytes, crc: int | None = None) -> bytes:
    """Wire bytes around an arbitrary body (lets tests build frames the encoder refuses)."""
    c = crc16(body) if crc is None else crc
    return b"\x10\x02" + stuff(body) + b"\x10\x03" + stuff(c.to_bytes(2, "big"))


def parse(data: bytes, now: float = 0.0) -> list[Frame | FrameError]:
    return FrameParser().feed(data, now)


def frames_of(items: list[Frame | FrameError]) -> list[Frame]:
    return [x for x in items if isinstance(x, Frame)]


def codes_of(items: list[Frame | FrameError]) -> list[str]:
    return [x.code for x in items if isinstance(x, FrameError)]


SAMPLES = [
    Frame(FrameType.SYNC, 0, 0, b"\x10\xa5\xc3\xe1"),
    Frame(FrameType.SYNC_ACK, 0, 0x10101010, b"\x10\xa5\xc3\xe1"),
    Frame(FrameType.DATA, 0x10, 0x1B2C3D4E, b"\x01hello\x10\x02\x10\x03world"),
    Frame(FrameType.ACK, 0x10, 0x1B2C3D4E),
    Frame(FrameType.NAK, 255, 0xFFFFFFFF),
    Frame(FrameType.DATA, 7, 1, bytes(range(256)) * 2, flags=1),
    Frame(FrameType.DATA, 2, 0x1B2C3D4E, bytes.fromhex("060100100000000000000007000000000000002" "7")),
]


def test_crc_check_value() -> None:
    assert crc16(CRC_CHECK_INPUT) == CRC_CHECK_VALUE == 0x29B1
    assert bitwise_crc(CRC_CHECK_INPUT) == 0x29B1


def test_crc_matches_definition_on_random_data() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = rng.randbytes(rng.randrange(0, 64))
        assert crc16(data) == bitwise_crc(data)


def test_header_layout_is_big_endian_and_ten_bytes() -> None:
    f = Frame(FrameType.DATA, seq=0xAB, epoch=0x01020304, payload=b"xyz", flags=1)
    wire = encode_frame(f)
    assert wire[:2] == b"\x10\x02"
    header = wire[2 : 2 + HEADER_LEN]
    assert header == bytes([1, 0x01, 0x01, 0xAB, 1, 2, 3, 4, 0, 3])
    assert struct.unpack(">BBBBIH", header) == (1, 1, 1, 0xAB, 0x01020304, 3)
    assert wire[12:15] == b"xyz"
    assert wire[15:17] == b"\x10\x03"
    assert wire[17:] == bitwise_crc(header + b"xyz").to_bytes(2, "big")


def test_payload_full_of_dle_is_stuffed_and_round_trips() -> None:
    f = Frame(FrameType.DATA, DLE, 0x10101010, bytes([DLE]) * MAX_PAYLOAD)
    wire = encode_frame(f)
    body = f.header() + f.payload
    assert wire == b"\x10\x02" + body.replace(b"\x10", b"\x10\x10") + b"\x10\x03" + stuff(bitwise_crc(body).to_bytes(2, "big"))
    # after the opening DLE STX, every DLE is paired except the one of DLE ETX
    stripped = wire[2:].replace(b"\x10\x10", b"")
    assert stripped.count(b"\x10") == 1 and b"\x10\x03" in stripped
    assert frames_of(parse(wire)) == [f]


def test_worst_case_wire_size() -> None:
    f = Frame(FrameType.DATA, DLE, 0x10101010, bytes([DLE]) * MAX_PAYLOAD, flags=DLE)
    wire = encode_frame(f)
    assert len(wire) <= MAX_WIRE_FRAME
    assert frames_of(parse(wire)) == [f]


def test_crc_bytes_are_stuffed() -> None:
    for seq in range(256):
        f = Frame(FrameType.ACK, seq, 0x1B2C3D4E)
        c = crc16(f.header()).to_bytes(2, "big")
        if DLE in c:
            wire = encode_frame(f)
            assert wire.endswith(stuff(c)) and len(wire) == 2 + HEADER_LEN + 2 + len(stuff(c))
            assert frames_of(parse(wire)) == [f]
            return
    pytest.fail("no ACK with a DLE in its CRC found")


def test_received_crc_is_recorded_and_excluded_from_equality() -> None:
    f = SAMPLES[2]
    (got,) = frames_of(parse(encode_frame(f)))
    assert got.crc == crc16(f.header() + f.payload)
    assert f.crc is None and got == f


def test_split_at_every_byte_boundary() -> None:
    stream = b"".join(encode_frame(f) for f in SAMPLES)
    for i in range(len(stream) + 1):
        p = FrameParser()
        got = p.feed(stream[:i], 0.0) + p.feed(stream[i:], 0.0)
        assert got == SAMPLES, i


def test_byte_at_a_time_and_three_way_splits() -> None:
    stream = b"".join(encode_frame(f) for f in SAMPLES[:4])
    p = FrameParser()
    got: list[Frame | FrameError] = []
    for b in stream:
        got += p.feed(bytes([b]), 0.0)
    assert got == SAMPLES[:4]
    rng = random.Random(3)
    for _ in range(300):
        i, j = sorted(rng.sample(range(len(stream) + 1), 2))
        p = FrameParser()
        assert p.feed(stream[:i], 0) + p.feed(stream[i:j], 0) + p.feed(stream[j:], 0) == SAMPLES[:4]


def test_concatenated_and_duplicated_frames_are_all_delivered() -> None:
    a, b = encode_frame(SAMPLES[2]), encode_frame(SAMPLES[3])
    assert parse(a + a + b + b + a) == [SAMPLES[2], SAMPLES[2], SAMPLES[3], SAMPLES[3], SAMPLES[2]]


@pytest.mark.parametrize("victim", range(len(SAMPLES)))
def test_truncated_frame_then_valid_frame(victim: int) -> None:
    cut_from = encode_frame(SAMPLES[victim])
    nxt = SAMPLES[(victim + 1) % len(SAMPLES)]
    good = encode_frame(nxt)
    for k in range(1, len(cut_from)):
        part = cut_from[:k]
        # with a T1 gap the partial frame is always dropped and the next one received
        p = FrameParser()
        got = p.feed(part, 0.0) + p.feed(good, T1_S)
        assert frames_of(got) == [nxt], k
        # back to back: never a wrong frame; the next one survives unless the cut leaves a
        # dangling DLE that pairs with the next DLE STX (the reason T1 exists)
        got = parse(part + good)
        assert frames_of(got) in ([nxt], []), k
        if not part.endswith(b"\x10"):
            assert frames_of(got) == [nxt], k


def test_garbage_between_frames() -> None:
    rng = random.Random(11)
    for _ in range(500):
        expected: list[Frame] = []
        stream = b""
        for _ in range(rng.randrange(1, 5)):
            stream += rng.randbytes(rng.randrange(0, 40)) + b"\x00"
            f = rng.choice(SAMPLES)
            expected.append(f)
            stream += encode_frame(f)
        stream += rng.randbytes(rng.randrange(0, 40))
        assert frames_of(parse(stream)) == expected


def test_every_single_bit_flip_is_rejected() -> None:
    for f in SAMPLES[:5] + SAMPLES[6:]:
        wire = encode_frame(f)
        follower = SAMPLES[3]
        for bit in range(len(wire) * 8):
            flipped = bytearray(wire)
            flipped[bit // 8] ^= 1 << (bit % 8)
            p = FrameParser()
            got = p.feed(bytes(flipped), 0.0) + p.feed(encode_frame(follower), 1.0)
            assert frames_of(got) == [follower], (f, bit)


def test_double_bit_flips_in_body_never_deliver() -> None:
    f = SAMPLES[2]
    wire = encode_frame(f)
    rng = random.Random(5)
    for _ in range(3000):
        flipped = bytearray(wire)
        for bit in rng.sample(range(16, len(wire) * 8), 2):
            flipped[bit // 8] ^= 1 << (bit % 8)
        assert frames_of(parse(bytes(flipped))) == []


def test_error_codes() -> None:
    header_ok = Frame(FrameType.DATA, 1, 2, b"abc").header()
    cases = {
        "FRAME_BAD_CRC": raw_frame(header_ok + b"abc", crc=crc16(header_ok + b"abc") ^ 1),
        "FRAME_BAD_VERSION": raw_frame(bytes([2]) + header_ok[1:] + b"abc"),
        "FRAME_BAD_LENGTH": raw_frame(header_ok + b"abcd"),
        "FRAME_BAD_TYPE": raw_frame(header_ok[:1] + b"\x09" + header_ok[2:] + b"abc"),
        "FRAME_TOO_SHORT": raw_frame(header_ok[:9]),
        "FRAME_BAD_ESCAPE": b"\x10\x02" + header_ok + b"\x10\x41",
        "FRAME_ABORTED": b"\x10\x02" + header_ok[:5] + b"\x10\x02",
    }
    for code, data in cases.items():
        assert codes_of(parse(data)) == [code], code


def test_aborted_frame_is_followed_by_the_new_one() -> None:
    good = encode_frame(SAMPLES[2])
    for cut in range(3, len(good)):
        if good[cut - 1] == DLE:
            continue
        got = parse(good[:cut] + good)
        assert frames_of(got) == [SAMPLES[2]]
        assert codes_of(got) == ["FRAME_ABORTED"], cut


def test_oversized_frame_is_bounded_then_recovers() -> None:
    p = FrameParser()
    got = p.feed(b"\x10\x02" + b"\x55" * 100_000, 0.0)
    assert codes_of(got) == ["FRAME_TOO_LONG"]
    assert len(p._body) <= HEADER_LEN + MAX_PAYLOAD
    got = p.feed(encode_frame(SAMPLES[3]), 0.0)
    assert frames_of(got) == [SAMPLES[3]]
    # DLE pairs one at a time: the buffer never exceeds the limit
    p = FrameParser()
    errors = []
    for _ in range(HEADER_LEN + MAX_PAYLOAD + 5):
        errors += p.feed(b"\x10\x10", 0.0) if p.in_frame else p.feed(b"\x10\x02", 0.0)
        assert len(p._body) <= HEADER_LEN + MAX_PAYLOAD
    assert "FRAME_TOO_LONG" in codes_of(errors)


def test_max_payload_is_accepted_and_one_more_is_not() -> None:
    f = Frame(FrameType.DATA, 1, 1, b"x" * MAX_PAYLOAD)
    assert parse(encode_frame(f)) == [f]
    body = struct.pack(">BBBBIH", 1, 1, 0, 1, 1, MAX_PAYLOAD + 1) + b"x" * (MAX_PAYLOAD + 1)
    assert codes_of(parse(raw_frame(body))) == ["FRAME_TOO_LONG"]


def test_t1_gap_drops_the_partial_frame() -> None:
    plain = Frame(FrameType.DATA, 1, 0x01020304, b"no delimiter bytes in here")
    wire = encode_frame(plain)
    half = len(wire) // 2
    p = FrameParser()
    assert p.feed(wire[:half], 10.0) == []
    assert p.deadline() == pytest.approx(10.0 + T1_S)
    got = p.feed(wire[half:], 10.0 + T1_S)
    assert codes_of(got) == ["FRAME_GAP"] and frames_of(got) == []
    # just under T1 the frame survives
    p = FrameParser()
    p.feed(wire[:half], 10.0)
    assert p.feed(wire[half:], 10.0 + T1_S * 0.99) == [plain]
    assert p.deadline() is None


def test_t1_gap_detected_by_poll_without_new_bytes() -> None:
    wire = encode_frame(SAMPLES[2])
    p = FrameParser()
    p.feed(wire[:5], 1.0)
    assert p.poll(1.0 + T1_S / 2) == []
    assert codes_of(p.poll(1.0 + T1_S)) == ["FRAME_GAP"]
    assert p.deadline() is None and p.poll(99.0) == []
    assert p.feed(wire, 100.0) == [SAMPLES[2]]


def test_gaps_between_frames_are_harmless() -> None:
    p = FrameParser()
    got = []
    for i, f in enumerate(SAMPLES):
        got += p.feed(encode_frame(f), float(i * 10))
    assert got == SAMPLES


def test_frame_field_validation() -> None:
    for kwargs, code in (
        ({"seq": 256}, "FRAME_BAD_FIELD"),
        ({"seq": -1}, "FRAME_BAD_FIELD"),
        ({"epoch": 1 << 32}, "FRAME_BAD_FIELD"),
        ({"flags": 256}, "FRAME_BAD_FIELD"),
        ({"payload": b"x" * (MAX_PAYLOAD + 1)}, "FRAME_TOO_LONG"),
    ):
        with pytest.raises(FrameError) as e:
            Frame(FrameType.DATA, **kwargs)
        assert e.value.code == code
    with pytest.raises(FrameError):
        Frame(9)  # type: ignore[arg-type]


def test_repr_hides_payload() -> None:
    f = Frame(FrameType.DATA, 1, 1, b"4761739001010119")
    assert "4761739001010119" not in repr(f) and "16 bytes" in repr(f)


def test_reserved_flag_bits_are_carried_not_rejected() -> None:
    f = Frame(FrameType.DATA, 1, 1, b"x", flags=0x81)
    (got,) = parse(encode_frame(f))
    assert isinstance(got, Frame) and got.retransmission and got.flags == 0x81
