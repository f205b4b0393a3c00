"""Framing and link edge cases PROTOCOL.md states explicitly (2.4, 4.2, 4.4): each statement is
checked against the Python parser / link endpoint and, for byte streams, the C reference receiver."""

from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from firmware_bridge import constants as K
from firmware_bridge.constants import FLAG_RETRANSMISSION, T1_S, FrameType
from firmware_bridge.frame import Frame, FrameError, FrameParser, encode_frame
from firmware_bridge.link import Acked, Delivered, LinkDown, LinkEndpoint, LinkState, LinkUp
from guard.core.model import TxnState
from guard.core.state import AWAITING
from tests.unit.test_link_state import Wire, frames
from tests.unit.test_protocol_golden import HARNESS, c_blocks, python_events

EPOCH = 0x1B2C3D4E
GOOD = encode_frame(Frame(FrameType.DATA, 1, EPOCH, b"\x01ok"))


def parse(*chunks: tuple[bytes, float]) -> list[str]:
    p = FrameParser()
    out: list[str] = []
    for data, now in chunks:
        out += [x.code if isinstance(x, FrameError) else x.kind.name for x in p.feed(data, now)]
    return out


# ---------------------------------------------------------------------------- framing (2.1, 2.4)


def test_hunting_takes_the_last_dle_before_stx_and_ignores_dle_etx() -> None:
    """Between frames stuffing does not apply: `10 10 02` starts a frame (the last 10 pairs with
    02), a stray `10 03` is noise, and neither costs a rejection."""
    assert parse((b"\x10\x10" + GOOD, 0.0)) == ["DATA"]
    assert parse((b"\x10\x03\xff\x10" + GOOD, 0.0)) == ["DATA"]


def test_dle_then_stx_after_a_gap_of_t1_starts_nothing() -> None:
    """`10`, then `02` T1 later: the `10` is forgotten (no frame, no error); the body that follows
    is noise until the next `10 02`."""
    assert parse((b"\x10", 0.0), (GOOD[1:], T1_S)) == []
    assert parse((b"\x10", 0.0), (GOOD[1:], T1_S * 0.5)) == ["DATA"]


def test_dle_etx_or_dle_stx_inside_the_crc_field() -> None:
    """The CRC is stuffed like the body: an unpaired `10 03` inside it is FRAME_BAD_ESCAPE; an
    unpaired `10 02` aborts the frame (FRAME_ABORTED) and starts the next one."""
    body_end = GOOD.index(b"\x10\x03") + 2
    assert parse((GOOD[:body_end] + b"\x10\x03", 0.0)) == ["FRAME_BAD_ESCAPE"]
    assert parse((GOOD[:body_end] + b"\x41\x10\x03", 0.0)) == ["FRAME_BAD_ESCAPE"]
    assert parse((GOOD[:body_end] + b"\x10" + GOOD[1:], 0.0)) == ["FRAME_ABORTED", "DATA"]


def test_a_frame_that_just_stops_is_rejected_t1_after_its_last_byte() -> None:
    p = FrameParser()
    assert p.feed(GOOD[:7], 5.0) == [] and p.deadline() == pytest.approx(5.0 + T1_S)
    assert p.poll(5.0 + T1_S * 0.99) == []
    (err,) = p.poll(5.0 + T1_S)
    assert isinstance(err, FrameError) and err.code == "FRAME_GAP"


@pytest.fixture(scope="module")
def c_receiver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("cref_edges")
    (d / "pg.c").write_text(c_blocks() + HARNESS)
    subprocess.run([cc, "-std=c99", "-O1", "-o", str(d / "pg"), str(d / "pg.c")], check=True, capture_output=True)
    return d / "pg"


def test_the_c_reference_receiver_treats_the_edge_cases_alike(c_receiver: Path) -> None:
    body_end = GOOD.index(b"\x10\x03") + 2
    streams: list[list[tuple[bytes, int]]] = [  # (bytes, gap in ms before them)
        [(b"\x10\x10" + GOOD, 1)],
        [(b"\x10\x03\xff\x10" + GOOD, 1)],
        [(b"\x10", 1), (GOOD[1:], 200)],
        [(b"\x10", 1), (GOOD[1:], 100)],
        [(GOOD[:body_end] + b"\x10\x03", 1)],
        [(GOOD[:body_end] + b"\x10" + GOOD[1:], 1)],
        [(GOOD[:7], 1), (b"", 200)],
    ]
    records: list[tuple[int, int, int]] = []
    for stream in streams:
        records.append((2, 0, 0))
        ms = 1000
        for data, gap in stream:
            ms += gap
            if not data:
                records.append((1, ms, 0))
            records += [(0, ms, b) for b in data]
        records.append((1, ms + 500, 0))
    raw = b"".join(struct.pack("<BIB", op, ms, b) for op, ms, b in records)
    c_out = subprocess.run([str(c_receiver)], input=raw, check=True, capture_output=True).stdout.decode().split("\n")[:-1]
    assert c_out == python_events(records)
    assert c_out.count("E") == 3 and sum(x.startswith("F") for x in c_out) == 4


# ---------------------------------------------------------------------------- link (4.2, 4.4)


def test_the_one_nak_limit_is_rearmed_by_any_valid_frame_even_of_another_epoch() -> None:
    w = Wire()
    epoch = w.up()
    bad = bytearray(encode_frame(Frame(FrameType.DATA, 0, epoch, b"abc")))
    bad[-1] ^= 1
    w.guard.receive_bytes(bytes(bad) * 2, w.now)
    assert [f.kind for f in frames(w.guard.bytes_to_send())] == [FrameType.NAK]
    w.guard.receive_bytes(encode_frame(Frame(FrameType.ACK, 9, epoch ^ 1)), w.now)  # valid, stale: ignored
    w.guard.receive_bytes(bytes(bad), w.now)
    assert [f.kind for f in frames(w.guard.bytes_to_send())] == [FrameType.NAK]


def test_ack_and_nak_with_a_payload_are_taken_and_the_payload_ignored() -> None:
    w = Wire()
    epoch = w.up()
    w.reader.send_message(b"x", w.now)
    w.reader.bytes_to_send()
    assert w.reader.receive_bytes(encode_frame(Frame(FrameType.NAK, 0, epoch, b"junk")), w.now) == []
    (retx,) = frames(w.reader.bytes_to_send())
    assert retx.retransmission
    assert w.reader.receive_bytes(encode_frame(Frame(FrameType.ACK, 0, epoch, b"junk")), w.now) == [Acked(b"x")]


def test_sync_with_nonzero_seq_epoch_or_flags_is_a_sync() -> None:
    g = LinkEndpoint("guard", rng=random.Random(1))
    events = g.receive_bytes(encode_frame(Frame(FrameType.SYNC, 7, 0x1234, b"abcd", FLAG_RETRANSMISSION)), 0.0)
    (ack,) = frames(g.bytes_to_send())
    assert ack.kind is FrameType.SYNC_ACK and ack.payload == b"abcd" and ack.flags == 0 and ack.seq == 0
    assert events == [LinkUp(ack.epoch)] and ack.epoch not in (0, 0x1234)


def test_sync_or_sync_ack_without_a_four_byte_nonce_is_ignored() -> None:
    g = LinkEndpoint("guard", rng=random.Random(1))
    assert g.receive_bytes(encode_frame(Frame(FrameType.SYNC, 0, 0, b"abc")), 0.0) == []
    assert g.bytes_to_send() == b"" and g.state is LinkState.IDLE
    r = LinkEndpoint("reader", rng=random.Random(2))
    r.start(0.0)
    nonce = frames(r.bytes_to_send())[0].payload
    assert r.receive_bytes(encode_frame(Frame(FrameType.SYNC_ACK, 0, 5, nonce + b"x")), 0.0) == []
    assert r.state is LinkState.SYNCING


def test_sync_ack_with_epoch_zero_is_ignored_and_flags_do_not_matter() -> None:
    r = LinkEndpoint("reader", rng=random.Random(2))
    r.start(0.0)
    nonce = frames(r.bytes_to_send())[0].payload
    assert r.receive_bytes(encode_frame(Frame(FrameType.SYNC_ACK, 0, 0, nonce)), 0.1) == []
    assert r.state is LinkState.SYNCING
    flagged = Frame(FrameType.SYNC_ACK, 3, 77, nonce, FLAG_RETRANSMISSION)
    assert r.receive_bytes(encode_frame(flagged), 0.2) == [LinkUp(77)]


def test_a_reused_nonce_after_traffic_starts_a_new_epoch() -> None:
    """4.4: a repeat of the answered SYNC can only precede the peer's first frame of the epoch
    (the line keeps order). Once a DATA/ACK/NAK of the epoch arrived, the same nonce is a new SYNC
    from a peer that restarted and reused it: a new epoch, not the old SYNC_ACK again."""
    g = LinkEndpoint("guard", rng=random.Random(1))
    sync = encode_frame(Frame(FrameType.SYNC, 0, 0, b"same"))
    g.receive_bytes(sync, 0.0)
    (first,) = frames(g.bytes_to_send())
    g.receive_bytes(sync, 0.1)  # a repeat before any traffic: the same SYNC_ACK, nothing changes
    assert frames(g.bytes_to_send()) == [first] and g.epoch == first.epoch
    assert g.receive_bytes(encode_frame(Frame(FrameType.DATA, 0, first.epoch, b"a")), 0.2) == [Delivered(b"a")]
    g.bytes_to_send()
    events = g.receive_bytes(sync, 0.3)  # the peer restarted with the same nonce
    (second,) = frames(g.bytes_to_send())
    assert second.kind is FrameType.SYNC_ACK and second.epoch not in (0, first.epoch)
    assert events[0] == LinkDown("LINK_PEER_RESYNC") and events[-1] == LinkUp(second.epoch)
    assert g.receive_bytes(encode_frame(Frame(FrameType.DATA, 0, second.epoch, b"b")), 0.4) == [Delivered(b"b")]


def test_our_own_unacknowledged_data_does_not_make_a_repeat_look_new() -> None:
    """The guard pushing a RESULT into the epoch before the reader adopted it (its SYNC_ACK was
    lost) proves nothing: the reader's repeated SYNC still gets the same SYNC_ACK."""
    g = LinkEndpoint("guard", rng=random.Random(1))
    sync = encode_frame(Frame(FrameType.SYNC, 0, 0, b"same"))
    g.receive_bytes(sync, 0.0)
    (first,) = frames(g.bytes_to_send())
    g.send_message(b"result", 0.0)
    g.bytes_to_send()
    assert g.receive_bytes(sync, 1.0) == []
    assert [f.kind for f in frames(g.bytes_to_send())][:1] == [FrameType.SYNC_ACK] and g.epoch == first.epoch


def test_a_retransmission_flag_on_a_frame_never_received_does_not_stop_delivery() -> None:
    w = Wire()
    epoch = w.up()
    flagged = Frame(FrameType.DATA, 0, epoch, b"first copy lost", FLAG_RETRANSMISSION)
    assert w.guard.receive_bytes(encode_frame(flagged), w.now) == [Delivered(b"first copy lost")]


# ---------------------------------------------------------------------------- the spec's tables


def _doc_table(name: str) -> list[list[str]]:
    text = (Path(__file__).parents[2] / "firmware_bridge" / "PROTOCOL.md").read_text()
    m = re.search(rf"<!-- table: {name} -->\n((?:\s*\|.*\n)+)", text)
    assert m, f"table {name} missing"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in m.group(1).splitlines()]
    return rows[2:]


def test_application_timer_table_states_the_constants() -> None:
    rows = {r[2]: int(r[1].removesuffix(" s")) for r in _doc_table("app-timers")}
    assert rows == {name: getattr(K, name) for name in
                    ("READER_APP_TIMEOUT_S", "READER_APP_TIMEOUT_CAP_S", "PROGRESS_INTERVAL_S", "PROGRESS_WAIT_S")}
    assert K.PROGRESS_INTERVAL_S * 3 <= K.READER_APP_TIMEOUT_S <= K.PROGRESS_WAIT_S, "two PROGRESS may be lost"


def test_in_progress_table_matches_what_the_engine_sends() -> None:
    """6.1: IN_PROGRESS 01 exactly for the states the engine reports as in progress (AWAITING)."""
    keep_waiting = set()
    for states, flag, _ in _doc_table("in-progress"):
        if flag == "`01`":
            keep_waiting |= {TxnState(s.strip()) for s in states.split(",")}
    assert keep_waiting == set(AWAITING)
    listed = {TxnState(s.strip()) for states, _, _ in _doc_table("in-progress") for s in states.split(",")}
    assert listed == set(TxnState)
