"""The reference reader alone: ReaderSim on a pty slave, a fake guard on the master.

The fake guard is a LinkEndpoint(role="guard") plus a tiny application (ACKs come from the link;
it answers AUTH with PROGRESS, an in-progress RESULT and a final RESULT, STATUS from its table,
PING with PONG) running in a thread. Both ends use T2 = 0.2 s so that retransmissions are cheap;
every loop here is bounded by a deadline.
"""

from __future__ import annotations

import logging
import os
import pty
import random
import re
import select
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from firmware_bridge.constants import T1_S, FrameType
from firmware_bridge.frame import Frame, FrameError, FrameParser, encode_frame
from firmware_bridge.link import Delivered, LinkEndpoint
from firmware_bridge.messages import (
    Auth,
    Confirm,
    ErrorMessage,
    Message,
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
from guard.simulation.linkfaults import LinkFaults, _AckDropper, split_frames
from guard.simulation.readercli import main
from guard.simulation.readersim import TEST_PAN, ReaderSim, ReaderTimeout
from firmware_bridge.serial_port import open_port
from guard.core.model import TxnState, mask_pan

T2 = 0.2
READER = "READER01"


class FakeGuard:
    """Guard end on the pty master. ``reply_delay`` postpones final RESULTs (a slow host);
    ``hold_repeats`` HOLDs a sale with the card and amount of an earlier one until CONFIRM."""

    def __init__(self, master: int, *, reply_delay: float = 0.0, hold_repeats: bool = False) -> None:
        self.master = master
        self.reply_delay = reply_delay
        self.hold_repeats = hold_repeats
        self.seen: set[tuple[str, int]] = set()
        self.ep = LinkEndpoint("guard", rng=random.Random(99), t2=T2)
        self.delivered: list[tuple[int, bytes]] = []  # (epoch, payload) as the guard's link delivered them
        self.created: Counter[bytes] = Counter()  # transactions started per TXN_ID
        self.finals: dict[bytes, ResultMessage] = {}
        self.requests: dict[bytes, bytes] = {}  # TXN_ID -> the request's payload (idempotency check)
        self.newest: bytes | None = None
        self.failures: list[BaseException] = []
        self._due: list[tuple[float, ResultMessage]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def auths(self) -> Counter[bytes]:
        """How often the link delivered an AUTH, per TXN_ID (all epochs)."""
        return Counter(txn_of(p) for _, p in self.delivered if p[0] == 0x01)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self.master], [], [], 0.005)
                now = time.monotonic()
                events = []
                if ready:
                    try:
                        data = os.read(self.master, 4096)
                    except OSError:
                        return  # slave side gone
                    events += self.ep.receive_bytes(data, now)
                events += self.ep.tick(now)
                for ev in events:
                    if isinstance(ev, Delivered):
                        self.delivered.append((self.ep.epoch, ev.payload))
                        for reply in self._answer(decode_message(ev.payload), ev.payload, now):
                            self.ep.send_message(encode_message(reply), now)
                for due in [d for d in self._due if d[0] <= now]:
                    self._due.remove(due)
                    self.finals[due[1].txn_id] = due[1]
                    self.ep.send_message(encode_message(due[1]), now)
                out = self.ep.bytes_to_send()
                while out:
                    out = out[os.write(self.master, out):]
        except Exception as e:  # noqa: BLE001 - the fixture fails the test with it
            self.failures.append(e)

    def _answer(self, msg: Message, payload: bytes, now: float) -> list[Message]:
        if isinstance(msg, (Auth, Refund, Void)):
            txn = msg.txn_id
            if txn in self.requests:
                if self.requests[txn] != payload:
                    return [ErrorMessage("IDEMPOTENCY_MISMATCH", txn)]
                if txn in self.finals:
                    return [self.finals[txn]]
                return [ResultMessage(txn, TxnState.SENT, "PROCESSING - PLEASE WAIT", in_progress=True)]
            self.requests[txn] = payload
            self.created[txn] += 1
            self.newest = txn
            masked = mask_pan(msg.pan) if isinstance(msg, (Auth, Refund)) else None
            if isinstance(msg, Auth) and self.hold_repeats:
                repeat = (msg.pan, msg.amount) in self.seen
                self.seen.add((msg.pan, msg.amount))
                if repeat:
                    held = ResultMessage(txn, TxnState.HELD, "POSSIBLE DOUBLE SWIPE", error_code="HOLD_DOUBLE_SWIPE")
                    self.finals[txn] = held
                    return [held]
            final = ResultMessage(txn, TxnState.APPROVED, "APPROVED 123456", response_code="00",
                                  approval_code="123456", masked_pan=masked)
            progress: list[Message] = [
                Progress(txn, "PROCESSING", 30),
                ResultMessage(txn, TxnState.SENT, "PROCESSING - PLEASE WAIT", in_progress=True),
            ]
            if self.reply_delay:
                self._due.append((now + self.reply_delay, final))
                return progress
            self.finals[txn] = final
            return [*progress, final]
        if isinstance(msg, Status):
            asked = self.newest if msg.last else msg.txn_id
            if asked is None or asked not in self.requests:
                return [ErrorMessage("TXN_UNKNOWN", msg.txn_id)]
            return [self.finals.get(asked) or ResultMessage(asked, TxnState.SENT, "PROCESSING", in_progress=True)]
        if isinstance(msg, Ping):
            return [Pong(msg.txn_id)]
        if isinstance(msg, Confirm):
            on_hold = self.finals.get(msg.txn_id)
            if on_hold is None or on_hold.state is not TxnState.HELD:
                return [ErrorMessage("NOTHING_HELD", msg.txn_id)]
            released = ResultMessage(msg.txn_id, TxnState.APPROVED, "APPROVED 654321", response_code="00")
            self.finals[msg.txn_id] = released
            return [on_hold, released]  # a late copy of the HELD answer may still precede the outcome
        return []


def txn_of(payload: bytes) -> bytes:
    msg = decode_message(payload)
    assert isinstance(msg, (Auth, Refund, Void))
    return msg.txn_id


Rig = tuple[FakeGuard, Callable[..., ReaderSim], str]


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """(fake guard, ReaderSim factory, slave path). The slave fd stays open so the master never
    sees EIO while a ReaderSim closes and another opens."""
    master, slave = pty.openpty()
    guard = FakeGuard(master, **getattr(request, "param", {}))
    guard.start()
    sims: list[ReaderSim] = []
    path = os.ttyname(slave)

    def make(**kw: Any) -> ReaderSim:
        kw.setdefault("t2", T2)
        sim = ReaderSim(open_port(path), reader_id=READER, rng=random.Random(5), **kw)
        sims.append(sim)
        return sim

    try:
        yield guard, make, path
    finally:
        for sim in sims:
            sim.close()
        guard.stop()
        os.close(slave)
        os.close(master)
    assert not guard.failures, guard.failures


def sale(sim: ReaderSim, amount: int = 1250, timeout: float = 8.0) -> ResultMessage | ErrorMessage:
    return sim.auth(sim.new_txn_id(), amount, "978", TEST_PAN, "2512", timeout)


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def assert_approved(r: ResultMessage | ErrorMessage) -> ResultMessage:
    assert isinstance(r, ResultMessage), r
    assert (r.state, r.in_progress) == (TxnState.APPROVED, False)
    return r


# ---------------------------------------------------------------------------- happy path


def test_sync_returns_the_epoch_the_guard_chose(rig: Rig) -> None:
    guard, make, _ = rig
    sim = make()
    epoch = sim.sync(2.0)
    assert epoch == sim.link.epoch == guard.ep.epoch != 0
    assert sim.epochs == [epoch]


def test_auth_waits_through_progress_and_in_progress_results(rig: Rig) -> None:
    guard, make, _ = rig
    sim = make()
    sim.sync(2.0)
    txn = sim.new_txn_id()
    r = assert_approved(sim.auth(txn, 1250, "978", TEST_PAN, "2512", 5.0))
    assert r.txn_id == txn and r.masked_pan == "476173******0119"
    assert [type(m) for m in sim.received] == [Progress, ResultMessage, ResultMessage]
    assert [m.in_progress for m in sim.received if isinstance(m, ResultMessage)] == [True, False]
    assert sim.results[txn] == r
    assert guard.auths() == {txn: 1}
    sent = decode_message(guard.delivered[0][1])
    assert isinstance(sent, Auth) and (sent.pan, sent.expiry, sent.reader_id) == (TEST_PAN, "2512", READER)
    assert txn[:8] == (1).to_bytes(8, "big") and txn[8:] == (1).to_bytes(8, "big")


def test_ping_status_refund_void_confirm(rig: Rig) -> None:
    guard, make, _ = rig
    sim = make()
    sim.sync(2.0)
    pong = sim.ping(2.0)
    assert isinstance(pong, Pong) and isinstance(sim.sent[-1], Ping) and pong.txn_id == sim.sent[-1].txn_id
    unknown = sim.status(bytes(16), 2.0)
    assert isinstance(unknown, ErrorMessage) and unknown.error_code == "TXN_UNKNOWN"
    last = sim.status(None, 2.0)
    assert isinstance(last, ErrorMessage) and last.error_code == "TXN_UNKNOWN"
    sold = assert_approved(sale(sim))
    assert sim.status(sold.txn_id, 2.0) == sold
    assert sim.status(None, 2.0) == sold
    assert_approved(sim.refund(500, "978", TEST_PAN, original_txn_id=sold.txn_id, timeout=3.0))
    assert_approved(sim.void(sold.txn_id, 1250, "978", timeout=3.0))
    held = sim.confirm(sold.txn_id, 2.0)
    assert isinstance(held, ErrorMessage) and held.error_code == "NOTHING_HELD"
    assert sum(guard.created.values()) == 3


def test_every_wait_is_bounded() -> None:
    master, slave = pty.openpty()  # nobody answers on the master
    sim = ReaderSim(open_port(os.ttyname(slave)), reader_id=READER, rng=random.Random(1), t2=T2)
    try:
        t = time.monotonic()
        with pytest.raises(ReaderTimeout):
            sim.sync(0.3)
        with pytest.raises(ReaderTimeout):
            sim.status(None, 0.3)
        assert time.monotonic() - t < 1.5
    finally:
        sim.close()
        os.close(slave)
        os.close(master)


# ---------------------------------------------------------------------------- faults


def test_dropped_acks_are_retransmitted_but_delivered_once(rig: Rig) -> None:
    guard, make, _ = rig
    faults = LinkFaults(seed=11, drop_ack_rate=0.5)
    sim = make(faults=faults, max_retx=12)  # a link down would legitimately re-deliver in a new epoch
    sim.sync(2.0)
    txns = [assert_approved(sale(sim)).txn_id for _ in range(5)]
    assert guard.auths() == {t: 1 for t in txns}
    assert faults.counts.acks_dropped > 0
    assert sim.retransmissions >= faults.counts.acks_dropped - 1  # the last drop may still be pending
    assert guard.ep.stats.duplicates > 0  # retransmissions re-ACKed, not delivered again
    assert sim.stats.link_downs == 0 and len(sim.epochs) == 1


def test_bit_flips_are_never_delivered(rig: Rig) -> None:
    guard, make, _ = rig
    faults = LinkFaults(seed=3, bitflip_rate=0.4)
    sim = make(faults=faults, max_retx=12)
    sim.sync(3.0)
    txns = [assert_approved(sale(sim)).txn_id for _ in range(5)]
    sent = {encode_message(m) for m in sim.sent}
    assert all(p in sent for _, p in guard.delivered)
    assert guard.auths() == {t: 1 for t in txns}
    assert faults.counts.bitflipped > 0
    assert sum(guard.ep.stats.frame_errors.values()) > 0


def test_every_write_fault_at_once(rig: Rig) -> None:
    guard, make, _ = rig
    faults = LinkFaults(seed=7, duplicate_rate=0.15, truncate_rate=0.15, bitflip_rate=0.15, garbage_rate=0.3,
                        split_writes=True, concatenate=True)
    sim = make(faults=faults)  # link downs happen here (ACKs damaged 4 times): recovery is under test too
    sim.sync(3.0)
    txns = [assert_approved(sale(sim)).txn_id for _ in range(6)]
    assert guard.created == {t: 1 for t in txns}
    per_epoch = Counter((e, txn_of(p)) for e, p in guard.delivered if p[0] == 0x01)
    assert max(per_epoch.values()) == 1
    assert all(v > 0 for k, v in faults.counts.as_dict().items() if k != "acks_dropped"), faults.counts


def test_duplicated_sync_is_answered_as_a_repeat_in_the_same_epoch(rig: Rig) -> None:
    """PROTOCOL 4.4: a SYNC copied on the line has the nonce last answered, so the guard answers
    it with the same epoch instead of starting a second one (which used to cost the reader ~4 s
    of ignored DATA until its retransmissions ran out)."""
    guard, make, _ = rig
    faults = LinkFaults(duplicate_rate=1.0)
    sim = make(faults=faults)
    first = sim.sync(2.0)
    faults.duplicate_rate = 0.0
    txn = assert_approved(sale(sim)).txn_id
    assert guard.ep.epoch == first and sim.stats.link_downs == 0 and len(sim.epochs) == 1
    assert guard.auths() == {txn: 1}


@pytest.mark.parametrize("rig", [{"reply_delay": 1.2}], indirect=True)
def test_send_failed_request_is_resent_with_the_same_txn_id(rig: Rig) -> None:
    """All ACKs lost: the link gives up on the AUTH the guard did get; the reader re-sends the
    same TXN_ID in the next epoch; the guard starts one transaction, not two."""
    guard, make, _ = rig
    faults = LinkFaults(drop_ack_rate=1.0)
    sim = make(faults=faults)
    sim.sync(2.0)
    txn = assert_approved(sale(sim, timeout=5.0)).txn_id
    assert sim.stats.resends >= 1 and sim.stats.link_downs >= 1
    per_epoch = Counter(e for e, p in guard.delivered if p[0] == 0x01)
    assert len(per_epoch) >= 2 and set(per_epoch.values()) == {1}
    assert guard.created == {txn: 1}


def test_reboot_new_epoch_then_status_last_and_resend(rig: Rig) -> None:
    guard, make, _ = rig
    sim = make()
    e1 = sim.sync(2.0)
    txn = sim.new_txn_id()
    auth = Auth(txn, 1250, "978", TEST_PAN, None, READER)
    sim.submit(auth)
    sim.reboot()
    assert sim.link.epoch == 0 and sim.boot_counter == 2
    e2 = sim.sync(2.0)
    assert e2 != e1 and guard.ep.epoch == e2
    r = sim.status(None, 2.0)
    assert isinstance(r, ResultMessage) and r.txn_id == txn
    assert_approved(sim.status(txn, 2.0))
    assert_approved(sim.transact(auth, 3.0))  # same id again: the stored RESULT, no new sale
    assert guard.created == {txn: 1}
    assert sim.new_txn_id()[:8] == (2).to_bytes(8, "big")


# ---------------------------------------------------------------------------- pieces


def _ack(seq: int, epoch: int) -> bytes:
    return encode_frame(Frame(FrameType.ACK, seq, epoch))


def test_ack_dropper_cuts_out_exactly_the_ack_frames() -> None:
    data = encode_frame(Frame(FrameType.DATA, 0x10, 0x10101010, b"\x10\x02\x10\x03 payload"))
    nak = encode_frame(Frame(FrameType.NAK, 1, 0x10101010))
    partial = b"\x10\x02\x01\x02"  # aborted by the next frame's DLE STX
    parts = [b"noise\x10", _ack(0x10, 0x10101010), data, partial, _ack(1, 7), b"\x10\x10\x03", nak, _ack(2, 7)]
    stream = b"".join(parts)
    kept = b"".join(p for p in parts if not p.startswith(b"\x10\x02\x01\x02\x00"))
    rng = random.Random(1)
    for cut in ("bytes", "whole", "random"):
        faults = LinkFaults(drop_ack_rate=1.0)
        dropper = _AckDropper(faults)
        if cut == "bytes":
            chunks = [stream[i:i + 1] for i in range(len(stream))]
        elif cut == "whole":
            chunks = [stream]
        else:
            chunks, i = [], 0
            while i < len(stream):
                n = rng.randint(1, 9)
                chunks.append(stream[i:i + n])
                i += n
        out = b"".join(seg for c in chunks for seg, _ in dropper.feed(c, 0.0))
        assert out == kept, cut
        assert faults.counts.acks_dropped == 3
    passthrough = _AckDropper(LinkFaults(drop_ack_rate=0.0))
    assert b"".join(s for s, _ in passthrough.feed(stream, 0.0)) == stream


def test_ack_dropper_keeps_a_t1_gap_visible() -> None:
    dropper = _AckDropper(LinkFaults(drop_ack_rate=1.0))
    ack = _ack(0, 5)
    assert dropper.feed(ack[:6], 1.0) == []
    assert dropper.poll(1.0 + T1_S / 2) == []
    assert dropper.poll(1.0 + T1_S) == [(ack[:6], 1.0)]  # forwarded with its own arrival time
    parser = FrameParser()
    parser.feed(ack[:6], 1.0)
    gap = parser.feed(ack[6:], 1.0 + T1_S)
    assert [e.code for e in gap if isinstance(e, FrameError)] == ["FRAME_GAP"]


def test_split_frames_and_fault_validation() -> None:
    frames = [_ack(0x10, 0x10101010), encode_frame(Frame(FrameType.DATA, 3, 9, b"\x10" * 40)), _ack(1, 2)]
    assert split_frames(b"".join(frames)) == frames
    with pytest.raises(ValueError):
        LinkFaults(bitflip_rate=1.5)
    with pytest.raises(ValueError):
        LinkFaults(split_gap_s=T1_S)


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "extra",
    [
        ["--drop-ack", "0.2", "--dup", "0.1", "--garbage", "0.2", "--split", "--concat"],
        ["--reboot-after-send", "--after-reboot", "last", "--truncate", "0.1"],
        ["--reboot-after-send", "--after-reboot", "resend"],
    ],
)
def test_cli_sales_and_no_clear_pan(
    rig: Rig, extra: list[str], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    guard, _, path = rig
    caplog.set_level(logging.DEBUG)
    argv = ["--port", path, "--sales", "3", "--seed", "4", "--t2", str(T2), "--timeout", "8", "--expiry", "2512",
            "--boot-counter", "42", *extra]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith(f"reader {READER} boot 42 a different test card per sale, another amount per sale; "
                               "link up")
    sales = [ln for ln in lines if ln.startswith("sale ")]
    assert len(sales) == 3 and all(" APPROVED rc=00 " in ln for ln in sales), out
    assert lines[-1].startswith("done: 3/3 final")
    assert TEST_PAN not in out + err + caplog.text
    assert not re.search(r"(?<![0-9a-f])\d{13,19}(?![0-9a-f])", out + err + caplog.text)  # no other card either
    assert sorted(guard.created.values()) == [1, 1, 1]


@pytest.mark.parametrize("rig", [{"hold_repeats": True}], indirect=True)
def test_cli_varies_cards_and_amounts_by_default_so_no_sale_is_held(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 15 item 14: `readersim --sales N` used one card and amount, so a guard with the default
    double-swipe rule held every sale after the first. Now each sale has its own Luhn-valid test
    card and amount; --pan/--amount repeat one."""
    guard, _, path = rig
    assert main(["--port", path, "--sales", "4", "--t2", str(T2), "--timeout", "5", "--boot-counter", "300"]) == 0
    sales = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sale ")]
    assert len(sales) == 4 and all(" APPROVED " in ln for ln in sales), sales
    pans = [pan for pan, _ in guard.seen]
    assert len(set(pans)) == 4 and len({a for _, a in guard.seen}) == 4
    assert all(luhn_ok(pan) for pan in pans)
    seen = set(guard.seen)
    assert main(["--port", path, "--sales", "4", "--t2", str(T2), "--timeout", "5", "--boot-counter", "301"]) == 0
    assert not (seen & (set(guard.seen) - seen)) and len(guard.seen) == 8  # the next run: other cards and amounts
    capsys.readouterr()
    assert main(["--port", path, "--sales", "2", "--t2", str(T2), "--timeout", "5", "--boot-counter", "400",
                 "--pan", TEST_PAN, "--amount", "1250"]) == 1  # one card and amount again: the repeat is held


def luhn_ok(pan: str) -> bool:
    total = 0
    for n, ch in enumerate(reversed(pan)):
        d = int(ch) * (2 if n % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


@pytest.mark.parametrize("rig", [{"hold_repeats": True}], indirect=True)
def test_cli_confirms_holds_and_counts_unconfirmed_ones(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, path = rig
    base = ["--port", path, "--sales", "3", "--t2", str(T2), "--timeout", "5", "--pan", TEST_PAN, "--amount", "1250"]
    assert main([*base, "--boot-counter", "100", "--confirm-holds"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sale ")]
    assert ["(held, confirmed)" in ln and " APPROVED " in ln for ln in lines] == [False, True, True], lines
    assert main([*base, "--boot-counter", "200"]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sale ")]
    assert all(" HELD " in ln for ln in lines), lines
