"""Reference card reader: the firmware side of the link, in Python, with link fault injection.

Integrators test their guard set-up against it (``posguard readersim --port URL``) and read it as
an example of what PROTOCOL.md asks of a reader beyond the link layer:

* SYNC first after every boot; a reboot loses all link state and whatever was not yet written.
* TXN_ID = boot counter (8 bytes) + counter restarting at 1 after each boot (section 7.1).
* A request the link reports as SendFailed is re-sent with the **same** TXN_ID (section 7.3).
* Only a RESULT with IN_PROGRESS = 00 ends a transaction; PROGRESS and in-progress RESULTs are
  recorded and waited through. The application timer (30 s, restarted by PROGRESS up to 120 s
  after the request) ends in STATUS(TXN_ID), never in "approved" (section 7.6).
* Clear card data is only ever put on the wire; nothing here prints or logs it.

``LinkFaults`` damages what the reader writes (duplicate, truncate, bit flip, garbage, split and
concatenated writes) and can drop ACK frames it reads, so the guard's and the reader's link
layers are both exercised over a real port (pty, socket://, a USB adapter).
"""

from __future__ import annotations

import argparse
import logging
import random
import select
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Self

import serial

from guard.core.errors import LinkError
from guard.core.model import TxnState, mask_pan

from firmware_bridge.constants import (
    DEFAULT_BAUDRATE,
    DLE,
    ERR_TXN_UNKNOWN,
    MAX_RETRANSMISSIONS,
    READER_APP_TIMEOUT_CAP_S,
    READER_APP_TIMEOUT_S,
    T1_S,
    T2_S,
    FrameType,
    Tag,
)
from firmware_bridge.frame import Frame, FrameError, FrameParser, encode_frame
from firmware_bridge.link import Acked, Delivered, LinkDown, LinkEndpoint, LinkEvent, LinkState, LinkUp, SendFailed
from firmware_bridge.messages import (
    TAG_CODECS,
    Auth,
    Cancel,
    Confirm,
    Signed,
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
from firmware_bridge.serial_port import open_port

log = logging.getLogger("posguard.readersim")

TEST_PAN = "4761739001010119"  # public EMV test card (PROTOCOL.md section 8)
IDLE_CAP_S = 0.05  # longest sleep between two looks at the timers


class ReaderTimeout(LinkError):
    """A wait ran out before the expected answer arrived (the request may still be processed)."""

    code = "READER_TIMEOUT"


# ---------------------------------------------------------------------------- fault injection


@dataclass
class FaultCounts:
    """How many times each fault was applied."""

    acks_dropped: int = 0
    duplicated: int = 0
    truncated: int = 0
    bitflipped: int = 0
    garbage: int = 0
    split_writes: int = 0  # writes cut into pieces
    concatenated: int = 0  # writes carrying two or more frames

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class LinkFaults:
    """Seeded link damage. Rates are per frame, 0..1; all default to off.

    Written frames (decided per frame, in this order): ``garbage_rate`` writes 1-16 random bytes
    before the frame; ``bitflip_rate`` flips one bit anywhere in the frame's wire bytes;
    ``truncate_rate`` writes only a prefix (the link's T2/NAK retransmission sends it whole
    later); ``duplicate_rate`` writes the (possibly damaged) frame bytes a second time.
    ``split_writes`` writes in chunks of 1-4 bytes, each flushed, ``split_gap_s`` apart (well
    under T1); ``concatenate`` holds a lone frame up to ``concat_hold_s`` (under the 100 ms ACK
    deadline) so that it leaves in one write with the next frame.

    Read side: ``drop_ack_rate`` removes whole valid ACK frames from the incoming bytes, as if
    they were lost on the line, so the reader's T2 retransmission runs (see ``_AckDropper``).
    """

    seed: int = 0
    drop_ack_rate: float = 0.0
    duplicate_rate: float = 0.0
    truncate_rate: float = 0.0
    bitflip_rate: float = 0.0
    garbage_rate: float = 0.0
    split_writes: bool = False
    concatenate: bool = False
    split_gap_s: float = 0.001
    concat_hold_s: float = 0.02
    counts: FaultCounts = field(default_factory=FaultCounts)

    def __post_init__(self) -> None:
        for name in ("drop_ack_rate", "duplicate_rate", "truncate_rate", "bitflip_rate", "garbage_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within 0..1, not {v}")
        if not 0.0 <= self.split_gap_s < T1_S / 2:
            raise ValueError(f"split_gap_s must be below T1/2 ({T1_S / 2} s)")
        if not 0.0 <= self.concat_hold_s < 0.1:
            raise ValueError("concat_hold_s must stay below the 100 ms ACK deadline")
        self.rng = random.Random(self.seed)

    def hit(self, rate: float) -> bool:
        return rate > 0.0 and self.rng.random() < rate

    @property
    def damages_writes(self) -> bool:
        return bool(
            self.duplicate_rate or self.truncate_rate or self.bitflip_rate or self.garbage_rate
            or self.split_writes or self.concatenate
        )

    def mangle(self, frame: bytes) -> list[tuple[bytes, bool]]:
        """Wire pieces for one encoded frame: (bytes, counts_as_a_frame)."""
        c = self.counts
        pieces: list[tuple[bytes, bool]] = []
        if self.hit(self.garbage_rate):
            # Random bytes may contain DLE STX and start a bogus frame: the CRC rejects it, and the
            # real frame's own DLE STX aborts it (FRAME_ABORTED), as with real line noise.
            pieces.append((self.rng.randbytes(self.rng.randint(1, 16)), False))
            c.garbage += 1
        wire = bytearray(frame)
        if self.hit(self.bitflip_rate):
            bit = self.rng.randrange(8 * len(wire))
            wire[bit // 8] ^= 1 << (bit % 8)
            c.bitflipped += 1
        if self.hit(self.truncate_rate):
            del wire[self.rng.randint(1, len(wire) - 1):]
            c.truncated += 1
        pieces.append((bytes(wire), True))
        if self.hit(self.duplicate_rate):
            pieces.append((bytes(wire), True))
            c.duplicated += 1
        return pieces

    def chunks(self, data: bytes) -> list[bytes]:
        """``data`` cut into 1-4 byte pieces, short ones likelier, so every boundary gets split."""
        out: list[bytes] = []
        i = 0
        while i < len(data):
            n = self.rng.choice((1, 1, 2, 3, 4))
            out.append(data[i:i + n])
            i += n
        return out


def split_frames(data: bytes) -> list[bytes]:
    """Cut a LinkEndpoint's output (always whole frames) into one bytes object per frame.

    The encoder is deterministic, so re-encoding the parsed frames gives the original bytes; if
    that ever stopped being true the data is kept in one piece rather than altered.
    """
    parsed = FrameParser().feed(data, 0.0)
    frames = [encode_frame(f) for f in parsed if isinstance(f, Frame)]
    if len(frames) != len(parsed) or b"".join(frames) != data:
        return [data]
    return frames


class _AckDropper:
    """Cuts chosen ACK frames out of the incoming byte stream and passes every other byte on
    unchanged, so the reader's endpoint sees the line it would see had those ACKs been lost.

    Why at the byte level: filtering ``Acked`` events would be too late, since the endpoint has
    already retired the outstanding frame, so nothing would be retransmitted. A private parser (the
    tap) is fed the same bytes one at a time to find frame boundaries; bytes that may belong to a
    frame are held until the tap says what they were. Held bytes keep the time of their last
    byte, so a T1 gap still reaches the endpoint's own parser as a gap.
    """

    def __init__(self, faults: LinkFaults, *, t1: float = T1_S) -> None:
        self._faults = faults
        self._t1 = t1
        self._tap = FrameParser(t1=t1)
        self._held = bytearray()
        self._held_at = 0.0

    def deadline(self) -> float | None:
        return self._held_at + self._t1 if self._held else None

    def poll(self, now: float) -> list[tuple[bytes, float]]:
        """Segments (bytes, arrival time) to forward after a T1 gap without new bytes."""
        out: list[tuple[bytes, float]] = []
        if self._held and now >= self._held_at + self._t1:
            out.append((bytes(self._held), self._held_at))
            self._held.clear()
        self._tap.poll(now)
        return out

    def feed(self, data: bytes, now: float) -> list[tuple[bytes, float]]:
        """Segments (bytes, arrival time) of ``data`` and earlier held bytes to forward now."""
        out = self.poll(now)
        for b in data:
            was_in_frame = self._tap.in_frame
            items = self._tap.feed(bytes([b]), now)
            self._held.append(b)
            self._held_at = now
            frame = next((i for i in items if isinstance(i, Frame)), None)
            aborted = any(isinstance(i, FrameError) and i.code == "FRAME_ABORTED" for i in items)
            if frame is not None:
                if frame.kind is FrameType.ACK and self._faults.hit(self._faults.drop_ack_rate):
                    self._held.clear()
                    self._faults.counts.acks_dropped += 1
                else:
                    self._release(out, now)
            elif aborted or (self._tap.in_frame and not was_in_frame):
                # b is the STX of a new frame: pass on what came before its DLE STX.
                out.append((bytes(self._held[:-2]), now))
                del self._held[:-2]
            elif not self._tap.in_frame and b != DLE:
                self._release(out, now)  # line noise, or the last byte of a rejected frame
        return [(seg, t) for seg, t in out if seg]

    def _release(self, out: list[tuple[bytes, float]], now: float) -> None:
        out.append((bytes(self._held), now))
        self._held.clear()


# ---------------------------------------------------------------------------- the reader


@dataclass
class ReaderStats:
    """Application-level counters (the link's own are in ``ReaderSim.link.stats``)."""

    syncs: int = 0
    reboots: int = 0
    link_downs: int = 0
    resends: int = 0  # requests re-sent with the same TXN_ID after SendFailed or TXN_UNKNOWN
    confirms: int = 0
    status_polls: int = 0  # STATUS(TXN_ID) sent: application timer ran out, or the link resynced
    ignored: int = 0  # messages of a type a reader does not know (section 5.2)
    undecodable: int = 0


class ReaderSim:
    """A card reader on ``port`` (any ``open_port`` URL: device, pty slave, socket://...).

    Every call pumps the port with non-blocking reads until its answer arrives or its deadline
    (on ``clock``, which must advance) passes; ReaderTimeout then. Nothing runs between calls:
    a frame held by ``LinkFaults.concatenate`` leaves with the next call or ``close()``.
    ``t2`` and ``max_retx`` are the link timers (section 4.6: scale T2 up below 19200 baud).
    """

    def __init__(
        self,
        port: serial.SerialBase,
        *,
        reader_id: str,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
        faults: LinkFaults | None = None,
        t2: float = T2_S,
        max_retx: int = MAX_RETRANSMISSIONS,
        app_timeout: float = READER_APP_TIMEOUT_S,
        boot_counter: int = 1,
    ) -> None:
        TAG_CODECS[Tag.READER_ID].check(Tag.READER_ID, reader_id)
        if not 0 <= boot_counter < 2**64:
            raise ValueError("boot_counter must fit in 8 bytes")
        self.port = port
        self.reader_id = reader_id
        self.clock = clock
        self.faults = faults
        self.boot_counter = boot_counter
        self.app_timeout = app_timeout
        self.received: list[Message] = []
        self.sent: list[Message] = []
        self.results: dict[bytes, ResultMessage] = {}  # latest final RESULT per TXN_ID wins
        self.epochs: list[int] = []
        self.stats = ReaderStats()
        self._rng = rng
        self._t2 = t2
        self._max_retx = max_retx
        self._counter = 0
        self._retx_before_reboots = 0
        self._retry: set[bytes] = set()  # this call's messages: re-sent after SendFailed
        self._acked: set[bytes] = set()  # those of them the guard's link acknowledged
        self._resynced = False  # a LinkUp happened since the call began or last looked
        self._inbox: list[Message] = []
        self._tx_pending: list[tuple[bytes, bool]] = []
        self._tx_hold_until: float | None = None
        self._closed = False
        self._power_on()

    # ------------------------------------------------------------------ lifecycle

    def _power_on(self) -> None:
        self.link = LinkEndpoint(
            "reader", rng=random.Random(self._rng.getrandbits(64)), t2=self._t2, max_retx=self._max_retx
        )
        f = self.faults
        self._dropper = _AckDropper(f) if f is not None and f.drop_ack_rate else None
        self._tx_pending.clear()
        self._tx_hold_until = None
        self._begin_call(())
        self._counter = 0

    def reboot(self) -> None:
        """Power cut: all link state, queued messages and unread input are lost; the boot
        counter moves on (new TXN_IDs). ``sync`` must run again and yields a new epoch."""
        self._retx_before_reboots += self.link.stats.retransmissions
        self.boot_counter += 1
        self.stats.reboots += 1
        self.port.reset_input_buffer()
        self._power_on()

    def close(self) -> None:
        """Write anything still held back, then close the port."""
        if self._closed:
            return
        self._closed = True
        try:
            self._flush_tx(self.clock(), force=True)
        finally:
            self.port.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def retransmissions(self) -> int:
        """Link retransmissions of DATA frames since construction, across reboots."""
        return self._retx_before_reboots + self.link.stats.retransmissions

    def new_txn_id(self) -> bytes:
        """Boot counter (u64) + counter (u64) restarting at 1 each boot: unique forever as long
        as the boot counter is persisted and incremented before first use (section 7.1)."""
        self._counter += 1
        return self.boot_counter.to_bytes(8, "big") + self._counter.to_bytes(8, "big")

    # ------------------------------------------------------------------ requests

    def sync(self, timeout: float = 5.0) -> int:
        """Start a new link epoch (SYNC until the matching SYNC_ACK) and return it."""
        now = self.clock()
        deadline = now + timeout
        self.stats.syncs += 1
        self._begin_call(())  # whatever an earlier call left unacknowledged is not re-sent
        ups = len(self.epochs)
        self._handle(self.link.start(now), now)
        self._write_out(now, force=False)
        while True:
            now = self.clock()
            self._pump(now)
            if len(self.epochs) > ups and self.link.state is LinkState.UP:
                return self.link.epoch
            if now >= deadline:
                raise ReaderTimeout(f"no SYNC_ACK within {timeout} s")
            self._idle(deadline)

    def auth(
        self, txn_id: bytes, amount: int, currency: str, pan: str, expiry: str | None = None, timeout: float = 60.0
    ) -> ResultMessage | ErrorMessage:
        """A sale: its RESULT with IN_PROGRESS = 00 (HELD too: the operator decides), or the ERROR
        refusing it. Success only if that RESULT says APPROVED."""
        return self.transact(Auth(txn_id, amount, currency, pan, expiry, self.reader_id), timeout)

    def refund(
        self,
        amount: int,
        currency: str,
        pan: str,
        expiry: str | None = None,
        original_txn_id: bytes | None = None,
        *,
        txn_id: bytes | None = None,
        timeout: float = 60.0,
    ) -> ResultMessage | ErrorMessage:
        """Money back to a card, optionally naming the original sale; a fresh TXN_ID by default."""
        msg = Refund(txn_id or self.new_txn_id(), amount, currency, pan, expiry, original_txn_id, self.reader_id)
        return self.transact(msg, timeout)

    def void(
        self, original_txn_id: bytes, amount: int, currency: str, *, txn_id: bytes | None = None, timeout: float = 60.0
    ) -> ResultMessage | ErrorMessage:
        """Cancel an earlier transaction; AMOUNT and CURRENCY repeat the original's."""
        msg = Void(txn_id or self.new_txn_id(), amount, currency, original_txn_id, self.reader_id)
        return self.transact(msg, timeout)

    def confirm(self, txn_id: bytes, timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Release a hold the guard put on ``txn_id`` and wait until the transaction leaves HELD.

        A HELD RESULT arriving after the CONFIRM does not end the wait: it may be a late copy of
        an earlier answer (a pushed RESULT and the answer to a STATUS can both be in flight). If
        the guard keeps holding, the latest HELD is returned at the deadline."""
        self.stats.confirms += 1
        return self.transact(Confirm(txn_id, self.reader_id), timeout)

    def cancel(self, txn_id: bytes, timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Drop a held request: its RESULT (DECLINED, OPERATOR_CANCELLED) or the ERROR refusing it."""
        return self.transact(Cancel(txn_id, self.reader_id), timeout)

    def signed(self, txn_id: bytes, timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Report the customer's signature for an approved sale; its RESULT or an ERROR."""
        return self.transact(Signed(txn_id, self.reader_id), timeout)

    def transact(self, msg: Auth | Refund | Void | Confirm | Cancel | Signed,
                 timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Send a transaction request and wait for its final RESULT (or an ERROR)."""
        deadline = self.clock() + timeout
        payload = self.submit(msg)
        if isinstance(msg, (Confirm, Cancel, Signed)):
            return self._await_final(msg.txn_id, None, deadline, held_ends=False)
        return self._await_final(msg.txn_id, payload, deadline)

    def await_final(self, txn_id: bytes, timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Wait for the final RESULT of a transaction sent earlier (e.g. STATUS said in progress)."""
        self._begin_call(())
        return self._await_final(txn_id, None, self.clock() + timeout)

    def status(self, txn_id: bytes | None = None, timeout: float = 10.0) -> ResultMessage | ErrorMessage:
        """STATUS(TXN_ID), or STATUS(LAST) when ``txn_id`` is None: the first RESULT for that id
        (for LAST: the first RESULT at all) or ERROR, in progress or not. A RESULT the guard
        pushed just before may be taken for the answer; it is a true state all the same."""
        msg = Status(txn_id=txn_id, reader_id=self.reader_id, last=txn_id is None)

        def match(m: Message) -> bool:
            if isinstance(m, ResultMessage):
                return txn_id is None or m.txn_id == txn_id
            return isinstance(m, ErrorMessage) and m.txn_id in (None, txn_id)

        answer = self._ask(msg, match, timeout)
        assert isinstance(answer, (ResultMessage, ErrorMessage))
        return answer

    def ping(self, timeout: float = 5.0) -> Pong | ErrorMessage:
        """Application liveness: PING with a fresh id, PONG echoing it."""
        txn_id = self.new_txn_id()

        def match(m: Message) -> bool:
            return isinstance(m, (Pong, ErrorMessage)) and m.txn_id == txn_id

        answer = self._ask(Ping(txn_id, self.reader_id), match, timeout)
        assert isinstance(answer, (Pong, ErrorMessage))
        return answer

    def submit(self, msg: Message) -> bytes:
        """Queue one request and put it on the wire now if the link allows; returns its payload.
        Answers are collected by the next waiting call."""
        payload = encode_message(msg)
        now = self.clock()
        if self.link.state is LinkState.IDLE:
            self.stats.syncs += 1
            self._handle(self.link.start(now), now)  # a reader SYNCs at boot before anything else
        self._begin_call((payload,))
        self.sent.append(msg)
        log.debug("send %r", msg)
        self.link.send_message(payload, now)
        self._write_out(now, force=True)
        return payload

    def send(self, msg: Message, timeout: float = 5.0) -> bytes:
        """``submit`` and pump until the request is on the wire: the link's outstanding frame (or
        already acknowledged), not merely queued behind an earlier unacknowledged one."""
        deadline = self.clock() + timeout
        payload = self.submit(msg)
        while not (self.link.state is LinkState.UP and self.link.pending <= 1):
            now = self.clock()
            if now >= deadline:
                raise ReaderTimeout(f"{type(msg).__name__} not sent within {timeout} s")
            self._idle(deadline)
            self._pump(self.clock())
        self._flush_tx(self.clock(), force=True)
        return payload

    # ------------------------------------------------------------------ waiting

    def _begin_call(self, payloads: Sequence[bytes]) -> None:
        self._retry = set(payloads)
        self._acked.clear()
        self._resynced = False
        self._inbox.clear()

    def _ask(self, msg: Message, match: Callable[[Message], bool], timeout: float) -> Message:
        """Send a query and return the first message ``match`` accepts."""
        deadline = self.clock() + timeout
        payload = self.submit(msg)
        while True:
            now = self.clock()
            self._pump(now)
            for m in self._take_inbox():
                if match(m):
                    return m
            if self._resynced:
                self._resynced = False
                if payload in self._acked:
                    # The guard had it, but its answer may have died with the old epoch.
                    self._send_again(payload, now)
            if now >= deadline:
                raise ReaderTimeout(f"no answer to {type(msg).__name__} within {timeout} s")
            self._idle(deadline)

    def _await_final(
        self, txn_id: bytes, request: bytes | None, deadline: float, *, held_ends: bool = True
    ) -> ResultMessage | ErrorMessage:
        """Wait for ``txn_id``'s RESULT with IN_PROGRESS = 00 (HELD included unless not
        ``held_ends``). ``request`` is re-sent (same TXN_ID) if the guard says TXN_UNKNOWN. The
        call's messages, STATUS included, are re-sent after SendFailed."""
        start = now = self.clock()
        app_deadline = now + self.app_timeout
        held: ResultMessage | None = None
        while True:
            now = self.clock()
            self._pump(now)
            for m in self._take_inbox():
                if isinstance(m, Progress) and m.txn_id == txn_id:
                    wait = m.wait_s or READER_APP_TIMEOUT_S
                    app_deadline = min(now + wait, start + READER_APP_TIMEOUT_CAP_S)
                elif isinstance(m, ResultMessage) and m.txn_id == txn_id and not m.in_progress:
                    if held_ends or m.state is not TxnState.HELD:
                        return m
                    held = m
                elif isinstance(m, ErrorMessage) and m.txn_id in (None, txn_id):
                    if m.error_code == ERR_TXN_UNKNOWN and request is not None:
                        # The guard never got it (e.g. lost in a power cut): the same id is safe.
                        self.stats.resends += 1
                        self._send_again(request, now)
                        continue
                    return m
            if self._resynced:
                self._resynced = False
                if not self._retry - self._acked:
                    # Nothing of ours is waiting in the link to be answered, and a RESULT the
                    # guard had queued died with the old epoch (4.5): ask now, not in 30 s.
                    app_deadline = now
            if now >= deadline:
                if held is not None:
                    return held
                raise ReaderTimeout(f"no final RESULT for {txn_id.hex()} before the deadline")
            if now >= app_deadline:
                # Never assume an outcome: ask (section 7.6).
                self.stats.status_polls += 1
                self._send_again(encode_message(Status(txn_id=txn_id, reader_id=self.reader_id)), now)
                app_deadline = now + self.app_timeout
            self._idle(min(deadline, app_deadline))

    def _take_inbox(self) -> list[Message]:
        msgs, self._inbox = self._inbox, []
        return msgs

    def _send_again(self, payload: bytes, now: float) -> None:
        self._retry.add(payload)
        self._acked.discard(payload)
        self.link.send_message(payload, now)
        self._write_out(now, force=True)

    def _idle(self, until: float) -> None:
        """Sleep until input arrives or the nearest timer (capped, so a stuck clock still polls)."""
        now = self.clock()
        wakes = [until, self.link.next_deadline(), self._tx_hold_until]
        if self._dropper is not None:
            wakes.append(self._dropper.deadline())
        wait = min(max(0.0, min(w for w in wakes if w is not None) - now), IDLE_CAP_S)
        try:
            select.select([self.port.fileno()], [], [], wait)
        except (OSError, ValueError, AttributeError):
            time.sleep(min(wait, 0.005))  # ports without a file descriptor (loop://)

    # ------------------------------------------------------------------ port pumping

    def _pump(self, now: float) -> None:
        """Read what is waiting (never blocking), run the link, write what it produced."""
        waiting = self.port.in_waiting
        data = self.port.read(waiting if waiting > 0 else 1)
        events: list[LinkEvent] = []
        if self._dropper is not None:
            segments = self._dropper.feed(data, now) if data else self._dropper.poll(now)
            for seg, t in segments:
                events += self.link.receive_bytes(seg, t)
        elif data:
            events += self.link.receive_bytes(data, now)
        events += self.link.tick(now)
        self._handle(events, now)
        self._write_out(now, force=False)

    def _handle(self, events: list[LinkEvent], now: float) -> None:
        for ev in events:
            if isinstance(ev, Delivered):
                self._on_payload(ev.payload)
            elif isinstance(ev, Acked):
                if ev.payload in self._retry:
                    self._acked.add(ev.payload)
            elif isinstance(ev, SendFailed):
                if ev.payload in self._retry:
                    self._acked.discard(ev.payload)
                    self.stats.resends += 1
                    log.info("request not acknowledged (%s): re-sending it with the same TXN_ID", ev.reason)
                    self.link.send_message(ev.payload, now)
            elif isinstance(ev, LinkUp):
                self._resynced = True
                self.epochs.append(ev.epoch)
                log.info("link up, epoch 0x%08x", ev.epoch)
            elif isinstance(ev, LinkDown):
                self.stats.link_downs += 1
                log.info("link down: %s", ev.reason)

    def _on_payload(self, payload: bytes) -> None:
        try:
            msg = decode_message(payload)
        except MessageError as e:
            # Unknown types are ignored by rule (5.2); the link has ACKed them already.
            if e.code == "MSG_UNKNOWN_TYPE":
                self.stats.ignored += 1
            else:
                self.stats.undecodable += 1
            log.warning("guard message not usable: %s", e.code)
            return
        log.debug("received %r", msg)
        self.received.append(msg)
        self._inbox.append(msg)
        if isinstance(msg, ResultMessage):
            known = self.results.get(msg.txn_id)
            if not msg.in_progress or known is None or known.in_progress:
                self.results[msg.txn_id] = msg  # section 7.7: the latest final one wins

    def _write_out(self, now: float, *, force: bool) -> None:
        data = self.link.bytes_to_send()
        if self.faults is None or not self.faults.damages_writes:
            if data:
                self.port.write(data)
            return
        for frame in split_frames(data) if data else []:
            self._tx_pending += self.faults.mangle(frame)
        self._flush_tx(now, force=force)

    def _flush_tx(self, now: float, *, force: bool) -> None:
        f = self.faults
        if f is None or not self._tx_pending:
            return
        if not f.concatenate:
            for piece, _ in self._tx_pending:
                self._write(piece)
            self._tx_pending.clear()
            return
        frames = sum(1 for _, is_frame in self._tx_pending if is_frame)
        if self._tx_hold_until is None:
            self._tx_hold_until = now + f.concat_hold_s
        if frames >= 2 or force or now >= self._tx_hold_until:
            if frames >= 2:
                f.counts.concatenated += 1
            self._write(b"".join(piece for piece, _ in self._tx_pending))
            self._tx_pending.clear()
            self._tx_hold_until = None

    def _write(self, data: bytes) -> None:
        f = self.faults
        if f is None or not f.split_writes or len(data) < 2:
            self.port.write(data)
            return
        f.counts.split_writes += 1
        pieces = f.chunks(data)
        for i, piece in enumerate(pieces):
            self.port.write(piece)
            self.port.flush()
            if i + 1 < len(pieces) and f.split_gap_s:
                time.sleep(f.split_gap_s)  # let the peer read the pieces one by one


# ---------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posguard readersim",
        description="Reference card reader: SYNC, then N sales against a guard, with optional link faults. "
        "Exit 0 when every sale got a final RESULT.",
    )
    p.add_argument("--port", required=True, help="pyserial URL: /dev/ttyUSB0, a pty slave path, socket://127.0.0.1:PORT")
    p.add_argument("--reader-id", default="READER01", help="READER_ID sent with every request (must match the guard)")
    p.add_argument("--sales", type=int, default=1, help="number of sales (default 1)")
    p.add_argument("--amount", type=int, default=1250, help="amount in minor units (default 1250 = 12.50)")
    p.add_argument("--currency", default="978", help="ISO 4217 numeric currency (default 978, EUR)")
    p.add_argument("--pan", default=TEST_PAN, help="card number (default: the public EMV test PAN); never printed")
    p.add_argument("--expiry", default=None, help="card expiry YYMM (default: omitted)")
    p.add_argument("--seed", type=int, default=0, help="seed for nonces and faults (default 0)")
    p.add_argument("--boot-counter", type=int, default=None,
                   help="first 8 bytes of every TXN_ID, +1 per reboot (default: Unix time in microseconds, so that "
                   "runs never reuse an id; set it only to a value above every earlier run's last)")
    p.add_argument("--drop-ack", type=float, default=0.0, metavar="P", help="drop incoming ACK frames")
    p.add_argument("--dup", type=float, default=0.0, metavar="P", help="write frames twice")
    p.add_argument("--truncate", type=float, default=0.0, metavar="P", help="write only a prefix of frames")
    p.add_argument("--bitflip", type=float, default=0.0, metavar="P", help="flip one bit in written frames")
    p.add_argument("--garbage", type=float, default=0.0, metavar="P", help="write random bytes before frames")
    p.add_argument("--split", action="store_true", help="write frames in 1-4 byte pieces")
    p.add_argument("--concat", action="store_true", help="join frames into one write when possible")
    p.add_argument("--reboot-after-send", action="store_true", help="reboot right after writing each AUTH")
    p.add_argument("--after-reboot", choices=("status", "last", "resend"), default="status",
                   help="after the reboot: STATUS(TXN_ID), STATUS(LAST), or re-send the AUTH with the same TXN_ID")
    p.add_argument("--confirm-holds", action="store_true",
                   help="when the guard HOLDs a sale (e.g. double swipe), CONFIRM it as an operator would")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per sale (default 60)")
    p.add_argument("--baud", type=int, default=DEFAULT_BAUDRATE, help="line speed (default 115200)")
    p.add_argument("-v", "--verbose", action="store_true", help="log link events and messages (PAN masked) to stderr")
    p.add_argument("--t2", type=float, default=T2_S,
                   help="link retransmission timer, seconds (default 1.0; scale up below 19200 baud, PROTOCOL 4.6)")
    return p


def _faults_from(args: argparse.Namespace) -> LinkFaults | None:
    faults = LinkFaults(
        seed=args.seed,
        drop_ack_rate=args.drop_ack,
        duplicate_rate=args.dup,
        truncate_rate=args.truncate,
        bitflip_rate=args.bitflip,
        garbage_rate=args.garbage,
        split_writes=args.split,
        concatenate=args.concat,
    )
    return faults if faults.drop_ack_rate or faults.damages_writes else None


def _one_sale(sim: ReaderSim, args: argparse.Namespace, txn_id: bytes) -> ResultMessage | ErrorMessage:
    deadline: float = sim.clock() + args.timeout

    def left() -> float:
        return max(0.0, deadline - sim.clock())

    r = _sale_through_reboot(sim, args, txn_id, left)
    if args.confirm_holds and isinstance(r, ResultMessage) and r.state is TxnState.HELD and not r.in_progress:
        r = sim.confirm(txn_id, left())
    return r


def _sale_through_reboot(
    sim: ReaderSim, args: argparse.Namespace, txn_id: bytes, left: Callable[[], float]
) -> ResultMessage | ErrorMessage:
    auth = Auth(txn_id, args.amount, args.currency, args.pan, args.expiry, sim.reader_id)
    if not args.reboot_after_send:
        return sim.transact(auth, left())
    sim.send(auth, left())
    sim.reboot()
    sim.sync(left())
    if args.after_reboot == "resend":
        return sim.transact(auth, left())
    r = sim.status(txn_id if args.after_reboot == "status" else None, left())
    if (isinstance(r, ErrorMessage) and r.error_code == ERR_TXN_UNKNOWN) or (
        isinstance(r, ResultMessage) and r.txn_id != txn_id
    ):
        # The AUTH never reached the guard (lost in the power cut): re-sending the same id is safe.
        sim.stats.resends += 1
        return sim.transact(auth, left())
    if isinstance(r, ResultMessage) and r.in_progress:
        return sim.await_final(txn_id, left())
    return r


def _describe(outcome: ResultMessage | ErrorMessage | None) -> str:
    if outcome is None:
        return "NO FINAL RESULT (timeout)"
    if isinstance(outcome, ErrorMessage):
        return f"ERROR {outcome.error_code} {outcome.display_text or ''!r}"
    return f"{outcome.state.value} rc={outcome.response_code or '--'} {outcome.display_text!r}"


def main(argv: Sequence[str] | None = None) -> int:
    """``posguard readersim``: exit 0 if every sale got a final RESULT (IN_PROGRESS 00, not HELD),
    1 if not, 2 on bad use."""
    p = _parser()
    args = p.parse_args(argv)
    if args.sales < 0 or args.timeout <= 0 or args.t2 <= 0:
        p.error("--sales must be >= 0, --timeout and --t2 > 0")
    if args.boot_counter is not None and not 0 <= args.boot_counter < 2**64:
        p.error("--boot-counter must be 0 .. 2^64-1 (the first 8 bytes of every TXN_ID)")
    try:
        faults = _faults_from(args)
        Auth(bytes(16), args.amount, args.currency, args.pan, args.expiry, args.reader_id)
    except (ValueError, MessageError) as e:
        p.error(str(e))  # MessageError texts never contain the value itself
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)8.1f ms %(name)s %(message)s")
    # Stands in for a persisted boot counter: microseconds advance faster than any run reboots.
    boot = args.boot_counter if args.boot_counter is not None else time.time_ns() // 1000
    try:
        port = open_port(args.port, baudrate=args.baud)
    except (serial.SerialException, ValueError) as e:
        print(f"readersim: cannot open {args.port}: {e}", file=sys.stderr)
        return 2
    with ReaderSim(port, reader_id=args.reader_id, rng=random.Random(args.seed), faults=faults, t2=args.t2,
                   boot_counter=boot) as sim:
        try:
            return _run_sales(sim, args, faults)
        except serial.SerialException as e:
            print(f"readersim: port {args.port} failed: {e}", file=sys.stderr)
            return 1


def _run_sales(sim: ReaderSim, args: argparse.Namespace, faults: LinkFaults | None) -> int:
    """SYNC, then one line per sale and a summary line; the exit code of ``main``."""
    try:
        epoch = sim.sync(args.timeout)
    except ReaderTimeout:
        print(f"readersim: no SYNC_ACK from the guard on {args.port} within {args.timeout} s", file=sys.stderr)
        return 1
    print(f"reader {sim.reader_id} boot {sim.boot_counter} card {mask_pan(args.pan)} link up, epoch 0x{epoch:08x}")
    finals = 0
    for i in range(args.sales):
        txn_id = sim.new_txn_id()
        retx, resends, confirms, t0 = sim.retransmissions, sim.stats.resends, sim.stats.confirms, time.monotonic()
        applied = faults.counts.as_dict() if faults else {}
        outcome: ResultMessage | ErrorMessage | None
        try:
            outcome = _one_sale(sim, args, txn_id)
        except ReaderTimeout:
            outcome = None
        if isinstance(outcome, ResultMessage) and not outcome.in_progress and outcome.state is not TxnState.HELD:
            finals += 1
        now_applied = faults.counts.as_dict() if faults else {}
        hit = ",".join(f"{k}={now_applied[k] - v}" for k, v in applied.items() if now_applied[k] > v) or "none"
        held = " (held, confirmed)" if sim.stats.confirms > confirms else ""
        print(
            f"sale {i + 1}/{args.sales} txn {txn_id.hex()} {_describe(outcome)}{held} "
            f"{time.monotonic() - t0:.2f}s retx={sim.retransmissions - retx} "
            f"resends={sim.stats.resends - resends} faults={hit}"
        )
    s = sim.stats
    print(
        f"done: {finals}/{args.sales} final, retransmissions={sim.retransmissions} resends={s.resends} "
        f"link_downs={s.link_downs} status_polls={s.status_polls} epochs={len(sim.epochs)}"
    )
    return 0 if finals == args.sales else 1

if __name__ == "__main__":
    sys.exit(main())
