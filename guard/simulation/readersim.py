"""Reference card reader: the firmware side of the link, in Python, with link fault injection.

Integrators test their guard set-up against it (``posguard readersim --port URL``) and read it as
an example of what PROTOCOL.md asks of a reader beyond the link layer:

* SYNC first after every boot; a reboot loses all link state and whatever was not yet written.
* TXN_ID = boot counter (8 bytes) + counter restarting at 1 after each boot (section 7.1).
* A request the link reports as SendFailed is re-sent with the **same** TXN_ID (section 7.3).
* Only a RESULT with IN_PROGRESS = 00 ends a transaction; PROGRESS and in-progress RESULTs are
  recorded and waited through. The application timer (30 s, restarted by PROGRESS and by
  in-progress RESULTs up to 120 s after the request) ends in STATUS(TXN_ID), never in "approved"
  (section 7.6); so does a resync while nothing of the call is left to answer (section 7.8).
* SYNC nonces come from the seeded RNG mixed with the boot counter (section 4.4).
* Clear card data is only ever put on the wire; nothing here prints or logs it.

``LinkFaults`` (guard.simulation.linkfaults) damages what the reader writes (duplicate, truncate, bit flip, garbage, split and
concatenated writes) and can drop ACK frames it reads, so the guard's and the reader's link
layers are both exercised over a real port (pty, socket://, a USB adapter). The command line:
guard.simulation.readercli.
"""

from __future__ import annotations

import logging
import random
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Self

import serial

from guard.core.errors import LinkError
from guard.core.model import TxnState

from firmware_bridge.constants import (
    ERR_TXN_UNKNOWN,
    MAX_RETRANSMISSIONS,
    READER_APP_TIMEOUT_CAP_S,
    READER_APP_TIMEOUT_S,
    T2_S,
    Tag,
)
from firmware_bridge.link import Acked, Delivered, LinkDown, LinkEndpoint, LinkEvent, LinkState, LinkUp, SendFailed
from firmware_bridge.messages import (
    TAG_CODECS,
    Auth,
    Cancel,
    Complete,
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
from guard.simulation.linkfaults import LinkFaults, _AckDropper, split_frames

log = logging.getLogger("posguard.readersim")

TEST_PAN = "4761739001010119"  # public EMV test card (PROTOCOL.md section 8)
IDLE_CAP_S = 0.05  # longest sleep between two looks at the timers


PartialChoice = Literal["accept", "cancel", "ignore"]
PARTIAL_CHOICES: tuple[PartialChoice, ...] = ("accept", "cancel", "ignore")
OPERATOR_DECISION_STATES = frozenset({TxnState.HELD, TxnState.PARTIAL})  # wait for the operator


class ReaderTimeout(LinkError):
    """A wait ran out before the expected answer arrived (the request may still be processed)."""

    code = "READER_TIMEOUT"


# ---------------------------------------------------------------------------- the reader


@dataclass
class ReaderStats:
    """Application-level counters (the link's own are in ``ReaderSim.link.stats``)."""

    syncs: int = 0
    reboots: int = 0
    link_downs: int = 0
    resends: int = 0  # requests re-sent with the same TXN_ID after SendFailed or TXN_UNKNOWN
    confirms: int = 0
    partials_accepted: int = 0  # PARTIAL RESULTs answered with CONFIRM
    partials_cancelled: int = 0  # PARTIAL RESULTs answered with CANCEL
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
        port: serial.Serial,
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
        # SYNC nonces stand in for a hardware RNG: the boot counter is mixed in so that two runs
        # with the same --seed do not start with the same nonce (PROTOCOL.md 4.4).
        self.link = LinkEndpoint(
            "reader", rng=random.Random(self._rng.getrandbits(64) ^ self.boot_counter), t2=self._t2,
            max_retx=self._max_retx,
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
        self, txn_id: bytes, amount: int, currency: str, pan: str, expiry: str | None = None, timeout: float = 60.0,
        *, partial: PartialChoice = "ignore",
    ) -> ResultMessage | ErrorMessage:
        """A sale: its RESULT with IN_PROGRESS = 00 (HELD and PARTIAL too: the operator decides),
        or the ERROR refusing it. Success only if that RESULT says APPROVED.

        ``partial`` is the operator's answer to a partial approval (STATE = PARTIAL, section 6.1):
        "accept" sends CONFIRM (APPROVED for APPROVED_AMOUNT), "cancel" sends CANCEL (the partial
        is reversed), "ignore" returns the PARTIAL RESULT for the caller to decide."""
        if partial not in PARTIAL_CHOICES:
            raise ValueError(f"partial must be one of {', '.join(PARTIAL_CHOICES)}")
        deadline = self.clock() + timeout
        r = self.transact(Auth(txn_id, amount, currency, pan, expiry, self.reader_id), timeout)
        return self.decide_partial(r, partial, max(0.0, deadline - self.clock()))

    def decide_partial(self, result: ResultMessage | ErrorMessage, choice: PartialChoice,
                       timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Answer a final PARTIAL RESULT as the operator chose ("accept": CONFIRM, "cancel":
        CANCEL, "ignore": nothing); any other result is returned as it is."""
        if not (isinstance(result, ResultMessage) and result.state is TxnState.PARTIAL and not result.in_progress):
            return result
        if choice == "accept":
            self.stats.partials_accepted += 1
            return self.confirm(result.txn_id, timeout)
        if choice == "cancel":
            self.stats.partials_cancelled += 1
            return self.cancel(result.txn_id, timeout)
        return result

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
        """Release a hold the guard put on ``txn_id`` (or accept its partial approval) and wait
        until the transaction leaves HELD (PARTIAL).

        A HELD or PARTIAL RESULT arriving after the CONFIRM does not end the wait: it may be a
        late copy of an earlier answer (a pushed RESULT and the answer to a STATUS can both be in
        flight). If the guard keeps holding, the latest such RESULT is returned at the deadline."""
        self.stats.confirms += 1
        return self.transact(Confirm(txn_id, self.reader_id), timeout)

    def cancel(self, txn_id: bytes, timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Drop a held request (RESULT DECLINED, OPERATOR_CANCELLED) or refuse a partial approval
        (REVERSAL_PENDING: the partial is reversed); or the ERROR refusing the CANCEL."""
        return self.transact(Cancel(txn_id, self.reader_id), timeout)

    def signed(self, txn_id: bytes, timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Report the customer's signature for an approved sale; its RESULT or an ERROR."""
        return self.transact(Signed(txn_id, self.reader_id), timeout)

    def complete(self, txn_id: bytes, decision: str, icc: bytes | None = None,
                 timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """COMPLETE: the card's final decision on a chip sale (section 12); the final RESULT."""
        return self.transact(Complete(txn_id, decision, icc, self.reader_id), timeout)

    def transact(self, msg: Auth | Refund | Void | Confirm | Cancel | Signed | Complete,
                 timeout: float = 60.0) -> ResultMessage | ErrorMessage:
        """Send a transaction request and wait for its final RESULT (or an ERROR)."""
        deadline = self.clock() + timeout
        payload = self.submit(msg)
        if isinstance(msg, Complete):  # a late AWAITING_COMPLETION copy does not end the wait
            return self._await_final(msg.txn_id, None, deadline, held_ends=False,
                                     waiting=frozenset({TxnState.AWAITING_COMPLETION}))
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

    def send_payload(self, payload: bytes, timeout: float = 5.0) -> Message:
        """Put any payload on the link (a test's malformed message, built by hand) and return the
        first ERROR, RESULT or PONG that arrives after it."""
        def match(m: Message) -> bool:
            return isinstance(m, (ErrorMessage, ResultMessage, Pong))

        return self._ask(payload, match, timeout)

    def submit(self, msg: Message | bytes) -> bytes:
        """Queue one request (a message, or a payload as is) and put it on the wire now if the
        link allows; returns its payload. Answers are collected by the next waiting call."""
        payload = msg if isinstance(msg, bytes) else encode_message(msg)
        now = self.clock()
        if self.link.state is LinkState.IDLE:
            self.stats.syncs += 1
            self._handle(self.link.start(now), now)  # a reader SYNCs at boot before anything else
        self._begin_call((payload,))
        if not isinstance(msg, bytes):
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

    def _ask(self, msg: Message | bytes, match: Callable[[Message], bool], timeout: float) -> Message:
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
        self, txn_id: bytes, request: bytes | None, deadline: float, *, held_ends: bool = True,
        waiting: frozenset[TxnState] = OPERATOR_DECISION_STATES,
    ) -> ResultMessage | ErrorMessage:
        """Wait for ``txn_id``'s RESULT with IN_PROGRESS = 00 (HELD and PARTIAL included unless
        not ``held_ends``). ``request`` is re-sent (same TXN_ID) if the guard says TXN_UNKNOWN. The
        call's messages, STATUS included, are re-sent after SendFailed."""
        start = now = self.clock()
        app_deadline = now + self.app_timeout
        held: ResultMessage | None = None
        while True:
            now = self.clock()
            self._pump(now)
            for m in self._take_inbox():
                if isinstance(m, (Progress, ResultMessage)) and m.txn_id == txn_id and (
                        isinstance(m, Progress) or m.in_progress):
                    # Restarted, never shortened, never past the cap (section 7.6).
                    wait = (m.wait_s if isinstance(m, Progress) else None) or READER_APP_TIMEOUT_S
                    app_deadline = max(app_deadline, min(now + wait, start + READER_APP_TIMEOUT_CAP_S))
                elif isinstance(m, ResultMessage) and m.txn_id == txn_id and not m.in_progress:
                    if held_ends or m.state not in waiting:
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
