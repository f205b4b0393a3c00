"""Link state machine: two endpoints, a fake channel and a fake clock; plus a pty smoke test."""

from __future__ import annotations

import os
import pty
import random
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from firmware_bridge.constants import (
    DOWN_PEER_RESYNC,
    DOWN_RETX_EXHAUSTED,
    FLAG_RETRANSMISSION,
    MAX_RETRANSMISSIONS,
    T1_S,
    T2_S,
    FrameType,
)
from firmware_bridge.frame import Frame, FrameParser, encode_frame
from firmware_bridge.link import Acked, Delivered, LinkDown, LinkEndpoint, LinkEvent, LinkState, LinkUp, SendFailed
from firmware_bridge.messages import Auth, decode_message, encode_message
from firmware_bridge.serial_port import SerialLink, open_port
from guard.core.errors import LinkError

AUTH = encode_message(Auth(bytes(range(16)), 1250, "978", "4761739001010119"))


def frames(data: bytes) -> list[Frame]:
    got = FrameParser().feed(data, 0.0)
    assert all(isinstance(f, Frame) for f in got), got
    return got  # type: ignore[return-value]


@dataclass
class Sent:
    at: float
    src: str
    frame: Frame
    dropped: bool


@dataclass
class Wire:
    """Two endpoints joined by a channel that can drop or mangle whole frames; fake clock."""

    guard: LinkEndpoint = field(default_factory=lambda: LinkEndpoint("guard", rng=random.Random(1)))
    reader: LinkEndpoint = field(default_factory=lambda: LinkEndpoint("reader", rng=random.Random(2)))
    now: float = 0.0
    drop: Callable[[str, Frame], bool] = lambda src, f: False
    mangle: Callable[[str, bytes], bytes] = lambda src, b: b
    log: list[Sent] = field(default_factory=list)
    events: dict[str, list[LinkEvent]] = field(default_factory=lambda: {"guard": [], "reader": []})

    def ep(self, name: str) -> LinkEndpoint:
        return self.guard if name == "guard" else self.reader

    def pump(self) -> None:
        """Move bytes both ways at the current time until neither side has anything to send."""
        for _ in range(1000):
            moved = False
            for src, dst in (("guard", "reader"), ("reader", "guard")):
                data = self.ep(src).bytes_to_send()
                if not data:
                    continue
                moved = True
                fs = frames(data)
                assert b"".join(encode_frame(f) for f in fs) == data
                for f in fs:
                    dropped = self.drop(src, f)
                    self.log.append(Sent(self.now, src, f, dropped))
                    if not dropped:
                        self.events[dst] += self.ep(dst).receive_bytes(self.mangle(src, encode_frame(f)), self.now)
            if not moved:
                return
        raise AssertionError("channel never went quiet")

    def run_until(self, t_end: float) -> None:
        """Advance the fake clock from deadline to deadline."""
        for _ in range(100_000):
            self.pump()
            ds = [d for d in (self.guard.next_deadline(), self.reader.next_deadline()) if d is not None]
            if not ds or min(ds) > t_end:
                self.now = t_end
                return
            self.now = max(self.now, min(ds))
            for name in ("guard", "reader"):
                self.events[name] += self.ep(name).tick(self.now)
        raise AssertionError("timers never settled")

    def up(self) -> int:
        self.events["reader"] += self.reader.start(self.now)
        self.run_until(self.now + 0.01)
        assert self.guard.state is LinkState.UP and self.reader.state is LinkState.UP
        assert self.guard.epoch == self.reader.epoch != 0
        self.events = {"guard": [], "reader": []}
        self.log.clear()
        return self.guard.epoch

    def sent(self, src: str, kind: FrameType) -> list[Sent]:
        return [s for s in self.log if s.src == src and s.frame.kind is kind]


def of_type(events: list[LinkEvent], cls: type) -> list[LinkEvent]:
    return [e for e in events if isinstance(e, cls)]


def test_handshake_establishes_one_epoch() -> None:
    w = Wire()
    w.reader.start(0.0)
    w.run_until(0.01)
    assert [s.frame.kind for s in w.log] == [FrameType.SYNC, FrameType.SYNC_ACK]
    sync, ack = w.log[0].frame, w.log[1].frame
    assert ack.payload == sync.payload and len(sync.payload) == 4 and sync.epoch == 0
    assert w.events["guard"] == [LinkUp(ack.epoch)] and w.events["reader"] == [LinkUp(ack.epoch)]
    assert w.guard.next_deadline() is None and w.reader.next_deadline() is None


def test_delivery_is_acked_before_the_event_is_returned() -> None:
    w = Wire()
    epoch = w.up()
    w.reader.send_message(AUTH, w.now)
    data = w.reader.bytes_to_send()
    events = w.guard.receive_bytes(data, w.now)
    assert events == [Delivered(AUTH)]
    (ack,) = frames(w.guard.bytes_to_send())
    assert (ack.kind, ack.seq, ack.epoch, ack.payload) == (FrameType.ACK, 0, epoch, b"")
    assert w.reader.receive_bytes(encode_frame(ack), w.now) == [Acked(AUTH)]
    assert decode_message(events[0].payload) == decode_message(AUTH)  # type: ignore[union-attr]


def test_stop_and_wait_one_outstanding_frame_and_sequence() -> None:
    w = Wire()
    w.up()
    msgs = [i.to_bytes(2, "big") for i in range(300)]
    for m in msgs[:16]:
        w.reader.send_message(m, w.now)
    assert len(frames(w.reader.bytes_to_send())) == 1 and w.reader.pending == 16
    w = Wire()
    w.up()
    for i in range(0, 300, 15):
        for m in msgs[i : i + 15]:
            w.reader.send_message(m, w.now)
        w.run_until(w.now + 0.01)
    assert [e.payload for e in w.events["guard"]] == msgs  # type: ignore[union-attr]
    assert [e.payload for e in w.events["reader"]] == msgs  # type: ignore[union-attr]
    seqs = [s.frame.seq for s in w.sent("reader", FrameType.DATA)]
    assert seqs == [i % 256 for i in range(300)]
    assert all(s.frame.flags == 0 for s in w.sent("reader", FrameType.DATA))


def test_lost_ack_retransmits_with_flag_and_is_delivered_once() -> None:
    w = Wire()
    w.up()
    acks_seen = []

    def drop_first_ack(src: str, f: Frame) -> bool:
        if src == "guard" and f.kind is FrameType.ACK:
            acks_seen.append(f)
            return len(acks_seen) == 1
        return False

    w.drop = drop_first_ack
    t0 = w.now
    w.reader.send_message(AUTH, t0)
    w.run_until(t0 + 10)
    data = w.sent("reader", FrameType.DATA)
    assert [(s.frame.seq, s.frame.flags, s.frame.payload) for s in data] == [(0, 0, AUTH), (0, FLAG_RETRANSMISSION, AUTH)]
    assert data[1].at == pytest.approx(t0 + T2_S)
    assert [s.frame.seq for s in w.sent("guard", FrameType.ACK)] == [0, 0]
    assert w.events["guard"] == [Delivered(AUTH)]
    assert w.events["reader"] == [Acked(AUTH)]
    assert w.guard.stats.duplicates == 1


def test_three_retransmissions_then_link_down_and_sync() -> None:
    w = Wire()
    epoch = w.up()
    w.drop = lambda src, f: src == "reader" and f.kind is FrameType.DATA
    t0 = w.now
    w.reader.send_message(AUTH, t0)
    w.run_until(t0 + 3.5 * T2_S)
    data = w.sent("reader", FrameType.DATA)
    assert len(data) == 1 + MAX_RETRANSMISSIONS
    assert [s.frame.retransmission for s in data] == [False, True, True, True]
    assert [s.at for s in data] == pytest.approx([t0 + i * T2_S for i in range(4)])
    assert w.events["reader"] == []
    w.run_until(t0 + 4 * T2_S + 0.01)
    assert w.events["reader"][:2] == [LinkDown(DOWN_RETX_EXHAUSTED), SendFailed(AUTH, DOWN_RETX_EXHAUSTED)]
    syncs = w.sent("reader", FrameType.SYNC)
    assert len(syncs) == 1 and syncs[0].at == pytest.approx(t0 + 4 * T2_S)
    # the guard answers: both ends are up again in a new epoch, the guard saw the resync
    new = w.reader.epoch
    assert w.events["reader"][2:] == [LinkUp(new)] and new not in (0, epoch) and w.guard.epoch == new
    assert w.events["guard"] == [LinkDown(DOWN_PEER_RESYNC), LinkUp(new)]


def test_every_queued_message_is_reported_failed_in_order() -> None:
    w = Wire()
    w.up()
    w.drop = lambda src, f: src == "reader" and f.kind is FrameType.DATA
    msgs = [b"one", b"two", b"three"]
    for m in msgs:
        w.reader.send_message(m, w.now)
    w.run_until(w.now + 4 * T2_S + 0.01)
    assert [e.payload for e in w.events["reader"] if isinstance(e, SendFailed)] == msgs
    assert w.reader.pending == 0


def test_messages_submitted_while_down_go_out_after_link_up() -> None:
    w = Wire()
    w.reader.send_message(b"early", 0.0)
    assert w.reader.bytes_to_send() == b"" and w.reader.pending == 1
    w.reader.start(0.0)
    w.run_until(0.01)
    assert w.events["guard"][1:] == [Delivered(b"early")]


def test_peer_resync_fails_the_outstanding_message() -> None:
    w = Wire()
    w.up()
    w.drop = lambda src, f: src == "guard" and f.kind is FrameType.DATA
    w.guard.send_message(b"result", w.now)
    w.pump()
    w.drop = lambda src, f: False
    w.reader.start(w.now)
    w.pump()
    assert w.events["guard"][:2] == [LinkDown(DOWN_PEER_RESYNC), SendFailed(b"result", DOWN_PEER_RESYNC)]
    assert isinstance(w.events["guard"][2], LinkUp)


def test_reboot_new_epoch_seq_restarts_and_old_frames_ignored() -> None:
    w = Wire()
    e1 = w.up()
    w.reader.send_message(b"before reboot", w.now)
    w.run_until(w.now + 0.01)
    old_data = encode_frame(w.sent("reader", FrameType.DATA)[0].frame)
    old_ack = encode_frame(w.sent("guard", FrameType.ACK)[0].frame)
    # the reader reboots: a fresh endpoint, fresh nonce
    w.reader = LinkEndpoint("reader", rng=random.Random(77))
    w.events = {"guard": [], "reader": []}
    w.log.clear()
    w.reader.start(w.now)
    w.run_until(w.now + 0.01)
    e2 = w.guard.epoch
    assert e2 == w.reader.epoch and e2 not in (0, e1)
    assert w.events["guard"] == [LinkDown(DOWN_PEER_RESYNC), LinkUp(e2)]
    # seq restarts at 0 in the new epoch and is delivered although seq 0 was the last accepted
    w.reader.send_message(b"after reboot", w.now)
    w.run_until(w.now + 0.01)
    assert w.sent("reader", FrameType.DATA)[0].frame.seq == 0
    assert w.events["guard"][-1] == Delivered(b"after reboot")
    # frames from the old epoch: no delivery, no ACK, no NAK
    stale = w.guard.stats.stale_epoch
    assert w.guard.receive_bytes(old_data, w.now) == []
    assert w.guard.bytes_to_send() == b""
    assert w.guard.stats.stale_epoch == stale + 1
    assert w.reader.receive_bytes(old_ack, w.now) == [] and w.reader.bytes_to_send() == b""


def test_frames_before_link_up_are_ignored() -> None:
    g = LinkEndpoint("guard", rng=random.Random(1))
    stray = encode_frame(Frame(FrameType.DATA, 0, 5, b"x"))
    assert g.receive_bytes(stray, 0.0) == [] and g.bytes_to_send() == b""
    assert g.receive_bytes(stray[:6] + b"\x00" + stray[7:], 0.0) == [] and g.bytes_to_send() == b""


def test_t1_gap_drops_partial_frame_naks_and_sender_retransmits() -> None:
    w = Wire()
    epoch = w.up()
    t0 = w.now
    w.reader.send_message(b"payload without delimiter bytes", t0)
    data = w.reader.bytes_to_send()
    half = len(data) // 2
    assert w.guard.receive_bytes(data[:half], t0) == []
    assert w.guard.next_deadline() == pytest.approx(t0 + T1_S)
    assert w.guard.tick(t0 + T1_S * 0.9) == [] and w.guard.bytes_to_send() == b""
    assert w.guard.tick(t0 + T1_S) == []
    (nak,) = frames(w.guard.bytes_to_send())
    assert (nak.kind, nak.seq, nak.epoch) == (FrameType.NAK, 0, epoch)
    assert w.guard.stats.frame_errors == {"FRAME_GAP": 1}
    # the rest of the frame arrives late: dropped, and no second NAK for the same burst
    assert w.guard.receive_bytes(data[half:], t0 + 0.3) == []
    assert w.guard.bytes_to_send() == b""
    # the NAK makes the sender retransmit at once, flagged; delivered once
    assert w.reader.receive_bytes(encode_frame(nak), t0 + 0.3) == []
    (retx,) = frames(w.reader.bytes_to_send())
    assert retx.retransmission and retx.seq == 0
    assert w.guard.receive_bytes(encode_frame(retx), t0 + 0.3) == [Delivered(b"payload without delimiter bytes")]


def test_crc_error_naks_once_per_burst() -> None:
    w = Wire()
    epoch = w.up()
    bad = bytearray(encode_frame(Frame(FrameType.DATA, 0, epoch, b"abc")))
    bad[-1] ^= 0x01
    w.guard.receive_bytes(bytes(bad) * 3, w.now)
    naks = frames(w.guard.bytes_to_send())
    assert [(f.kind, f.seq) for f in naks] == [(FrameType.NAK, 0)]
    assert w.guard.stats.frame_errors == {"FRAME_BAD_CRC": 3}
    # a valid frame re-arms the NAK
    w.guard.receive_bytes(encode_frame(Frame(FrameType.DATA, 0, epoch, b"ok")), w.now)
    w.guard.receive_bytes(bytes(bad), w.now)
    assert [(f.kind, f.seq) for f in frames(w.guard.bytes_to_send())] == [(FrameType.ACK, 0), (FrameType.NAK, 1)]


def test_nak_for_another_seq_or_epoch_is_ignored() -> None:
    w = Wire()
    epoch = w.up()
    w.reader.send_message(b"x", w.now)
    w.reader.bytes_to_send()
    for nak in (Frame(FrameType.NAK, 1, epoch), Frame(FrameType.NAK, 0, epoch ^ 1)):
        assert w.reader.receive_bytes(encode_frame(nak), w.now) == []
        assert w.reader.bytes_to_send() == b""
    assert w.reader.receive_bytes(encode_frame(Frame(FrameType.NAK, 0, epoch)), w.now) == []
    assert frames(w.reader.bytes_to_send())[0].retransmission


def test_nak_storm_cannot_exceed_the_retransmission_limit() -> None:
    w = Wire()
    epoch = w.up()
    w.reader.send_message(b"x", w.now)
    w.reader.bytes_to_send()
    nak = encode_frame(Frame(FrameType.NAK, 0, epoch))
    events = []
    for _ in range(10):
        events += w.reader.receive_bytes(nak, w.now)
    out = frames(w.reader.bytes_to_send())
    assert sum(f.kind is FrameType.DATA for f in out) == MAX_RETRANSMISSIONS
    assert events[:2] == [LinkDown(DOWN_RETX_EXHAUSTED), SendFailed(b"x", DOWN_RETX_EXHAUSTED)]
    assert out[-1].kind is FrameType.SYNC


def test_lost_sync_ack_is_answered_again_without_a_new_epoch() -> None:
    w = Wire()
    n = [0]

    def drop_first_sync_ack(src: str, f: Frame) -> bool:
        if f.kind is FrameType.SYNC_ACK:
            n[0] += 1
            return n[0] == 1
        return False

    w.drop = drop_first_sync_ack
    w.reader.start(0.0)
    w.run_until(3.0)
    syncs = w.sent("reader", FrameType.SYNC)
    acks = w.sent("guard", FrameType.SYNC_ACK)
    assert len(syncs) == 2 and syncs[1].frame.retransmission and syncs[0].frame.payload == syncs[1].frame.payload
    assert syncs[1].at == pytest.approx(T2_S)
    assert len(acks) == 2 and acks[0].frame == acks[1].frame
    assert w.events["guard"] == [LinkUp(acks[0].frame.epoch)]
    assert w.events["reader"] == [LinkUp(acks[0].frame.epoch)]


def test_sync_repeats_forever_until_answered() -> None:
    w = Wire()
    w.drop = lambda src, f: f.kind is FrameType.SYNC
    w.reader.start(0.0)
    w.run_until(20 * T2_S + 0.01)
    syncs = w.sent("reader", FrameType.SYNC)
    assert len(syncs) == 21 and len({s.frame.payload for s in syncs}) == 1
    w.drop = lambda src, f: False
    w.run_until(22 * T2_S)
    assert w.reader.state is LinkState.UP


def test_simultaneous_start_converges_on_one_epoch() -> None:
    for seed in range(50):
        w = Wire(guard=LinkEndpoint("guard", rng=random.Random(seed)), reader=LinkEndpoint("reader", rng=random.Random(seed + 1000)))
        w.guard.start(0.0)
        w.reader.start(0.0)
        w.run_until(5.0)
        assert w.guard.state is LinkState.UP and w.reader.state is LinkState.UP
        assert w.guard.epoch == w.reader.epoch
        w.reader.send_message(b"hi", w.now)
        w.guard.send_message(b"ho", w.now)
        w.run_until(w.now + 0.01)
        assert w.events["guard"][-1] == Delivered(b"hi") or Delivered(b"hi") in w.events["guard"]
        assert Delivered(b"ho") in w.events["reader"]


def test_next_deadline() -> None:
    w = Wire()
    assert w.reader.next_deadline() is None
    w.reader.start(5.0)
    assert w.reader.next_deadline() == pytest.approx(5.0 + T2_S)
    w.now = 5.0
    w.run_until(5.01)
    assert w.reader.next_deadline() is None
    w.reader.send_message(b"x", 6.0)
    assert w.reader.next_deadline() == pytest.approx(6.0 + T2_S)
    data = w.reader.bytes_to_send()
    w.guard.receive_bytes(data[:4], 6.1)
    assert w.guard.next_deadline() == pytest.approx(6.1 + T1_S)


def test_send_limits() -> None:
    ep = LinkEndpoint("reader", rng=random.Random(1), max_queue=2)
    with pytest.raises(LinkError) as e:
        ep.send_message(b"x" * 513, 0.0)
    assert e.value.code == "LINK_PAYLOAD_TOO_LONG"
    ep.send_message(b"a", 0.0)
    ep.send_message(b"b", 0.0)
    with pytest.raises(LinkError) as e:
        ep.send_message(b"c", 0.0)
    assert e.value.code == "LINK_QUEUE_FULL"
    with pytest.raises(ValueError):
        LinkEndpoint("host", rng=random.Random(1))  # type: ignore[arg-type]


def test_event_reprs_hide_payloads() -> None:
    for ev in (Delivered(AUTH), Acked(AUTH), SendFailed(AUTH, "X")):
        assert "4761739001010119" not in repr(ev)


def test_lossy_noisy_channel_at_most_once_in_order() -> None:
    """Random drops and bit flips both ways: every message is Acked or SendFailed; the peer
    sees each at most once, in order; an Acked message was delivered exactly once."""
    for seed in range(60):
        rng = random.Random(seed)
        w = Wire(guard=LinkEndpoint("guard", rng=random.Random(seed)), reader=LinkEndpoint("reader", rng=random.Random(~seed)))
        p_drop, p_flip = rng.uniform(0, 0.3), rng.uniform(0, 0.3)
        w.drop = lambda src, f: rng.random() < p_drop

        def mangle(src: str, b: bytes) -> bytes:
            if rng.random() < p_flip:
                x = bytearray(b)
                i = rng.randrange(len(x) * 8)
                x[i // 8] ^= 1 << (i % 8)
                return bytes(x)
            return b

        w.mangle = mangle
        w.reader.start(0.0)
        sent = {"guard": [f"g{i}".encode() for i in range(40)], "reader": [f"r{i}".encode() for i in range(40)]}
        for i in range(40):
            for name in ("guard", "reader"):
                try:
                    w.ep(name).send_message(sent[name][i], w.now)
                except LinkError:
                    sent[name][i] = b""
            w.run_until(w.now + rng.uniform(0, 2))
        w.drop = lambda src, f: False
        w.mangle = lambda src, b: b
        w.run_until(w.now + 60)
        for src, dst in (("guard", "reader"), ("reader", "guard")):
            msgs = [m for m in sent[src] if m]
            acked = [e.payload for e in w.events[src] if isinstance(e, Acked)]
            failed = [e.payload for e in w.events[src] if isinstance(e, SendFailed)]
            delivered = [e.payload for e in w.events[dst] if isinstance(e, Delivered)]
            assert sorted(acked + failed) == sorted(msgs), seed
            assert len(delivered) == len(set(delivered)), seed
            idx = [msgs.index(m) for m in delivered]
            assert idx == sorted(idx), seed
            assert set(acked) <= set(delivered), seed


# ---------------------------------------------------------------------------- serial adapter


def test_open_port_loop_url_is_non_blocking() -> None:
    port = open_port("loop://", baudrate=9600)
    try:
        assert (port.baudrate, port.bytesize, port.parity, port.stopbits, port.timeout) == (9600, 8, "N", 1, 0)
        t = time.monotonic()
        assert port.read(10) == b""
        assert time.monotonic() - t < 0.5
        link = SerialLink(port, LinkEndpoint("guard", rng=random.Random(1)))
        with pytest.raises(OSError):
            link.fileno()
    finally:
        port.close()


def test_pty_pair_sync_and_one_data_frame() -> None:
    """pyserial opens the pty slave; a reader endpoint drives the master fd."""
    master, slave = pty.openpty()
    port = open_port(os.ttyname(slave))
    try:
        os.set_blocking(master, False)
        guard = SerialLink(port, LinkEndpoint("guard", rng=random.Random(1)))
        reader = LinkEndpoint("reader", rng=random.Random(2))
        assert guard.fileno() >= 0
        guard_events: list[LinkEvent] = []
        reader_events: list[LinkEvent] = []
        reader_seen: list[Frame] = []
        spy = FrameParser()
        reader.start(time.monotonic())
        os.write(master, reader.bytes_to_send())
        sent_auth = False
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            select.select([guard.fileno(), master], [], [], 0.02)
            guard_events += guard.pump()
            now = time.monotonic()
            try:
                data = os.read(master, 4096)
            except BlockingIOError:
                data = b""
            if data:
                reader_seen += [f for f in spy.feed(data, now) if isinstance(f, Frame)]
                reader_events += reader.receive_bytes(data, now)
            reader_events += reader.tick(now)
            if not sent_auth and any(isinstance(e, LinkUp) for e in reader_events):
                reader.send_message(AUTH, now)
                sent_auth = True
            out = reader.bytes_to_send()
            if out:
                os.write(master, out)
            if Acked(AUTH) in reader_events and Delivered(AUTH) in guard_events:
                break
        assert [type(e) for e in guard_events] == [LinkUp, Delivered], guard_events
        assert reader_events == [LinkUp(guard.endpoint.epoch), Acked(AUTH)]
        assert [f.kind for f in reader_seen] == [FrameType.SYNC_ACK, FrameType.ACK]
        assert decode_message(guard_events[1].payload) == decode_message(AUTH)  # type: ignore[union-attr]
    finally:
        port.close()
        os.close(slave)
        os.close(master)
