"""PROTOCOL.md is the integrators' contract: its golden frames, tables and C reference code are
checked byte for byte against the implementation (and against each other)."""

from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from firmware_bridge import constants as K
from firmware_bridge.constants import FLAG_RETRANSMISSION, STATE_CODES, FrameType, MsgType, Tag
from firmware_bridge.frame import Frame, FrameError, FrameParser, crc16, encode_frame, stuff
from firmware_bridge.messages import MESSAGE_CLASSES, Auth, Complete, Message, Ping, ResultMessage, Status, decode_message, encode_message
from guard.core.model import TxnState
from tests.support import ROOT

DOC = ROOT / "firmware_bridge" / "PROTOCOL.md"
TEXT = DOC.read_text(encoding="utf-8")

EPOCH = 0x1B2C3D4E
NONCE = bytes.fromhex("10a5c3e1")
TXN = bytes.fromhex("00000000000000070000000000000001")
AUTH = Auth(TXN, 1250, "978", "4761739001010119", "2512")
RESULT = ResultMessage(
    TXN, TxnState.APPROVED, "APPROVED 123456", in_progress=False, amount=1250, currency="978", response_code="00",
    approval_code="123456", rrn="123456789012", masked_pan="476173******0119", stan=42,
)
PARTIAL = ResultMessage(
    TXN, TxnState.PARTIAL, "PARTIAL APPROVAL 8.00 OF 12.50 - CONFIRM OR CANCEL", in_progress=False, amount=1250,
    currency="978", response_code="10", approval_code="123456", rrn="123456789012", masked_pan="476173******0119",
    error_code="PARTIAL_APPROVAL", stan=42, approved_amount=800,
)
PING = Ping(bytes.fromhex("00000000000000070000000000000027"))


def _tlv(tag: int, v: bytes) -> bytes:
    return tag.to_bytes((tag.bit_length() + 7) // 8, "big") + bytes([len(v)]) + v


AUTH_CHIP = Auth(TXN, 1250, "978", "4761739001010119", "2512", entry_mode="CHIP", pan_seq="001",
                 track2="4761739001010119D2512201",
                 icc=_tlv(0x9F26, bytes.fromhex("1122334455667788")) + _tlv(0x9F27, b"\x80") + _tlv(0x9F36, b"\x00\x2a")
                 + _tlv(0x95, bytes(5)),
                 pin_block=bytes.fromhex("0123456789abcdef"), ksn=bytes.fromhex("ffff9876543210e00001"))
AWAITING = ResultMessage(
    TXN, TxnState.AWAITING_COMPLETION, "HOST APPROVED - COMPLETING ON CARD - DO NOT REMOVE CARD", in_progress=False,
    amount=1250, currency="978", response_code="00", approval_code="123456", rrn="123456789012",
    masked_pan="476173******0119", stan=42, issuer_icc=_tlv(0x91, bytes.fromhex("0102030405060708") + b"00"),
)
COMPLETE = Complete(TXN, "CARD_DECLINED", icc=_tlv(0x9F27, b"\x00") + _tlv(0x9F36, b"\x00\x2a"))

# name -> (frame, message carried or None); written here independently of the document
EXPECTED: dict[str, tuple[Frame, Message | None]] = {
    "sync": (Frame(FrameType.SYNC, 0, 0, NONCE), None),
    "sync_ack": (Frame(FrameType.SYNC_ACK, 0, EPOCH, NONCE), None),
    "auth": (Frame(FrameType.DATA, 0, EPOCH, encode_message(AUTH)), AUTH),
    "auth_retx": (Frame(FrameType.DATA, 0, EPOCH, encode_message(AUTH), FLAG_RETRANSMISSION), AUTH),
    "ack": (Frame(FrameType.ACK, 0, EPOCH), None),
    "nak": (Frame(FrameType.NAK, 1, EPOCH), None),
    "result": (Frame(FrameType.DATA, 0, EPOCH, encode_message(RESULT)), RESULT),
    "result_partial": (Frame(FrameType.DATA, 1, EPOCH, encode_message(PARTIAL)), PARTIAL),
    "status_last": (Frame(FrameType.DATA, 1, EPOCH, encode_message(Status(last=True))), Status(last=True)),
    "ping": (Frame(FrameType.DATA, 2, EPOCH, encode_message(PING)), PING),
    "auth_chip": (Frame(FrameType.DATA, 3, EPOCH, encode_message(AUTH_CHIP)), AUTH_CHIP),
    "result_awaiting_completion": (Frame(FrameType.DATA, 2, EPOCH, encode_message(AWAITING)), AWAITING),
    "complete_declined": (Frame(FrameType.DATA, 4, EPOCH, encode_message(COMPLETE)), COMPLETE),
}


def goldens() -> dict[str, bytes]:
    found = re.findall(r"^golden: (\S+)\n```hex\n(.*?)\n```", TEXT, flags=re.M | re.S)
    names = [n for n, _ in found]
    assert len(names) == len(set(names)), "duplicate golden names"
    return {n: bytes.fromhex(block) for n, block in found}


def reference_unframe(wire: bytes) -> tuple[tuple[int, ...], bytes]:
    """A second, deliberately naive reading of section 2: unstuff, split, check CRC."""
    assert wire[:2] == b"\x10\x02"
    out, i, end = bytearray(), 2, None
    while i < len(wire):
        if wire[i] == 0x10:
            nxt = wire[i + 1]
            if nxt == 0x03 and end is None:
                end = len(out)
                i += 2
                continue
            assert nxt == 0x10, "unpaired DLE"
            i += 2
            out.append(0x10)
        else:
            out.append(wire[i])
            i += 1
    assert end is not None and len(out) == end + 2
    body, crc = bytes(out[:end]), int.from_bytes(out[end:], "big")
    assert crc16(body) == crc
    header = struct.unpack(">BBBBIH", body[:10])
    assert header[0] == 1 and header[5] == len(body) - 10
    return header, body[10:]


def test_golden_frames_are_present() -> None:
    g = goldens()
    assert set(g) == set(EXPECTED)
    assert {"sync", "auth", "ack", "nak", "result"} <= set(g)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_frame_byte_for_byte(name: str) -> None:
    wire = goldens()[name]
    frame, msg = EXPECTED[name]
    assert encode_frame(frame) == wire
    assert FrameParser().feed(wire, 0.0) == [frame]
    header, payload = reference_unframe(wire)
    assert header == (1, frame.kind, frame.flags, frame.seq, frame.epoch, len(frame.payload))
    assert payload == frame.payload
    if msg is not None:
        assert decode_message(payload) == msg
        assert encode_message(msg) == payload


def test_golden_stream_with_noise_parses_to_all_frames() -> None:
    g = goldens()
    stream = b"".join(b"\x00\xff\x03" + g[n] for n in sorted(g))
    assert FrameParser().feed(stream, 0.0) == [EXPECTED[n][0] for n in sorted(g)]


def test_test_pan_appears_only_in_the_auth_examples() -> None:
    pan_hex = b"4761739001010119".hex()
    for name, wire in goldens().items():
        assert (pan_hex in wire.replace(b"\x10\x10", b"\x10").hex()) == (name in ("auth", "auth_retx", "auth_chip")), name


def test_golden_ping_has_a_stuffed_crc() -> None:
    frame, _ = EXPECTED["ping"]
    assert 0x10 in crc16(frame.header() + frame.payload).to_bytes(2, "big")
    assert goldens()["ping"].endswith(b"\x10\x03\x10\x10\x49")


# ---------------------------------------------------------------------------- tables


def table(name: str) -> list[list[str]]:
    m = re.search(rf"<!-- table: {name} -->\n((?:\|.*\n)+)", TEXT)
    assert m, f"table {name} missing"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in m.group(1).splitlines()]
    return [r for r in rows[2:]]  # drop header and separator


def test_frame_type_table() -> None:
    assert {int(r[0], 16): r[1] for r in table("frame-types")} == {int(t): t.name for t in FrameType}


def test_message_type_table() -> None:
    assert {int(r[0], 16): r[1] for r in table("message-types")} == {int(t): t.name for t in MsgType}


def test_tag_table() -> None:
    rows = table("tags")
    assert {int(r[0], 16): r[1] for r in rows} == {int(t): t.name for t in Tag}


def test_state_table() -> None:
    rows = table("states")
    assert {int(r[0], 16): r[1] for r in rows} == {c: s.value for s, c in STATE_CODES.items()}
    assert {r[1] for r in rows if r[2] == "yes"} == {s.value for s in TxnState if s.final}


def test_message_field_table_matches_the_codec() -> None:
    doc: dict[str, dict[Tag, str]] = {}
    for name in ("message-fields", "message-fields-chip"):  # section 5.4, and section 12's chip tags
        header = [c.strip() for c in re.search(rf"<!-- table: {name} -->\n(\|.*)\n", TEXT).group(1).strip("|").split("|")]  # type: ignore[union-attr]
        tags = [Tag[h] for h in header[1:]]
        for r in table(name):
            doc.setdefault(r[0], {}).update(zip(tags, r[1:], strict=True))
    assert set(doc) == {t.name for t in MESSAGE_CLASSES}
    for mtype, cls in MESSAGE_CLASSES.items():
        spec = {tag: ("M" if mandatory else "O") for tag, _, mandatory in cls.FIELDS}
        for tag in Tag:
            want = doc[mtype.name][tag]
            got = spec.get(tag, "-")
            assert got == ("O" if want == "C" else want), (mtype.name, tag.name)


def test_timer_table_matches_constants() -> None:
    rows = {r[0]: r[1] for r in table("timers")}

    def ms(v: str) -> float:
        assert v.endswith(" ms")
        return int(v[:-3]) / 1000

    assert ms(rows["T1"]) == K.T1_S
    assert ms(rows["T2"]) == K.T2_S
    assert ms(rows["ACK deadline"]) == K.ACK_DEADLINE_S
    assert ms(rows["SYNC repeat"]) == K.SYNC_INTERVAL_S
    assert int(rows["retransmissions"]) == K.MAX_RETRANSMISSIONS
    assert int(rows["send queue"]) == K.MAX_SEND_QUEUE


def test_doc_states_the_constants() -> None:
    assert "0x29B1" in TEXT and f"0..{K.MAX_PAYLOAD}" in TEXT and str(K.MAX_WIRE_FRAME) in TEXT
    assert "115200" in TEXT and "8N1" in TEXT


# ---------------------------------------------------------------------------- C reference


def c_blocks() -> str:
    blocks = dict(re.findall(r"^c-reference: (\S+)\n```c\n(.*?)\n```", TEXT, flags=re.M | re.S))
    assert list(blocks) == ["crc16", "encode", "receive"]
    return "\n".join(blocks.values())


HARNESS = r"""
#include <stdio.h>
#include <string.h>

static int readrec(uint8_t *op, uint32_t *ms, uint8_t *b)
{
    uint8_t r[6];
    if (fread(r, 1, 6, stdin) != 6)
        return 0;
    *op = r[0];
    *ms = (uint32_t)r[1] | (uint32_t)r[2] << 8 | (uint32_t)r[3] << 16 | (uint32_t)r[4] << 24;
    *b = r[5];
    return 1;
}

static void report(struct pg_rx *rx, int r)
{
    if (r == PG_RX_ERROR)
        puts("E");
    if (r == PG_RX_FRAME) {
        printf("F ");
        for (uint16_t i = 0; i < rx->n; i++)
            printf("%02x", rx->body[i]);
        puts("");
    }
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "crc") == 0) {
        printf("%04X\n", pg_crc16((const uint8_t *)"123456789", 9));
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "encode") == 0) {
        /* lines: type flags seq epoch hexpayload */
        unsigned type, flags, seq;
        unsigned long epoch;
        char hex[2 * PG_MAX_PAYLOAD + 2];
        static uint8_t payload[PG_MAX_PAYLOAD], out[PG_MAX_WIRE];
        while (scanf("%u %u %u %lu %1025s", &type, &flags, &seq, &epoch, hex) == 5) {
            uint16_t len = 0;
            if (strcmp(hex, "-") != 0)
                for (; hex[2 * len]; len++)
                    sscanf(hex + 2 * len, "%2hhx", &payload[len]);
            size_t n = pg_encode_frame((uint8_t)type, (uint8_t)flags, (uint8_t)seq, (uint32_t)epoch, payload, len, out);
            for (size_t i = 0; i < n; i++)
                printf("%02x", out[i]);
            puts("");
        }
        return 0;
    }
    static struct pg_rx rx;
    uint8_t op, b;
    uint32_t ms;
    while (readrec(&op, &ms, &b)) {
        if (op == 2) {
            memset(&rx, 0, sizeof rx);
            puts("---");
            continue;
        }
        report(&rx, pg_rx_poll(&rx, ms));
        if (op == 0)
            report(&rx, pg_rx_byte(&rx, b, ms));
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("cref")
    src = d / "pg.c"
    src.write_text(c_blocks() + HARNESS)
    exe = d / "pg"
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O1", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    return exe


def test_c_reference_crc(c_program: Path) -> None:
    out = subprocess.run([str(c_program), "crc"], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "29B1"


def test_c_reference_encoder_reproduces_every_golden_frame(c_program: Path) -> None:
    names = sorted(EXPECTED)
    lines = "".join(
        f"{int(f.kind)} {f.flags} {f.seq} {f.epoch} {f.payload.hex() or '-'}\n" for f, _ in (EXPECTED[n] for n in names)
    )
    out = subprocess.run([str(c_program), "encode"], input=lines, check=True, capture_output=True, text=True).stdout.split()
    g = goldens()
    assert out == [g[n].hex() for n in names]


def test_c_reference_encoder_matches_python_on_random_frames(c_program: Path) -> None:
    rng = random.Random(5)
    fs: list[Frame] = []
    while len(fs) < 600 or not any(crc16(f.header() + f.payload) & 0xFF == 0x10 for f in fs):
        payload = bytes(rng.choice((0x10, 0x02, 0x03, rng.randrange(256))) for _ in range(rng.randrange(0, 40)))
        fs.append(Frame(FrameType(rng.randint(1, 5)), rng.randrange(256), rng.choice((0x10101010, rng.getrandbits(32))), payload, rng.choice((0, 1, 0x10))))
    lines = "".join(f"{int(f.kind)} {f.flags} {f.seq} {f.epoch} {f.payload.hex() or '-'}\n" for f in fs)
    out = subprocess.run([str(c_program), "encode"], input=lines, check=True, capture_output=True, text=True).stdout.split()
    assert out == [encode_frame(f).hex() for f in fs]


def crafted_bad_frames() -> list[bytes]:
    """CRC-valid frames that break the header rules (rarely produced by random mutation)."""

    def wire(body: bytes) -> bytes:
        return b"\x10\x02" + stuff(body) + b"\x10\x03" + stuff(crc16(body).to_bytes(2, "big"))

    ok = struct.pack(">BBBBIH", 1, 1, 0, 0, EPOCH, 3) + b"abc"
    return [
        wire(b"\x02" + ok[1:]),  # version
        wire(ok + b"d"),  # length
        wire(ok[:1] + b"\x06" + ok[2:]),  # type
        wire(ok[:1] + b"\x00" + ok[2:]),  # type 0
        wire(ok[:7]),  # too short
        wire(b""),  # empty
    ]


def python_events(records: list[tuple[int, int, int]]) -> list[str]:
    out: list[str] = []
    p = FrameParser()

    def report(items: list[Frame | FrameError]) -> None:
        for it in items:
            out.append("E" if isinstance(it, FrameError) else "F " + (it.header() + it.payload).hex())

    for op, ms, b in records:
        if op == 2:
            p = FrameParser()
            out.append("---")
        elif op == 1:
            report(p.poll(ms / 1000))
        else:
            report(p.feed(bytes([b]), ms / 1000))
    return out


def test_c_reference_receiver_agrees_with_the_python_parser(c_program: Path) -> None:
    rng = random.Random(99)
    wires = list(goldens().values()) + crafted_bad_frames()
    records: list[tuple[int, int, int]] = []
    for _ in range(3000):
        stream = b"".join(rng.choice(wires) for _ in range(rng.randint(1, 3)))
        b = bytearray(stream)
        for _ in range(rng.randint(0, 3)):
            op = rng.randrange(3)
            i = rng.randrange(len(b))
            if op == 0:
                b[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                b[i:i] = bytes([rng.choice((0x10, 0x02, 0x03, rng.randrange(256)))])
            else:
                del b[i : i + rng.randint(1, 5)]
        records.append((2, 0, 0))
        ms = 1000
        for byte in b:
            ms += 500 if rng.random() < 0.01 else 1  # far from the T1 boundary on purpose
            records.append((0, ms, byte))
        records.append((1, ms + 500, 0))
    raw = b"".join(struct.pack("<BIB", op, ms, b) for op, ms, b in records)
    c_out = subprocess.run([str(c_program)], input=raw, check=True, capture_output=True).stdout.decode().split("\n")[:-1]
    py_out = python_events(records)
    assert c_out == py_out
    assert sum(line.startswith("F") for line in py_out) > 1000 and py_out.count("E") > 500
