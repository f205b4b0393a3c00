"""Sans-I/O link state machine: stop-and-wait delivery with CRC'd ACK/NAK, epochs and resync.

The same class runs on both ends (role "guard" or "reader"); tests wire two of them together.
Nothing here touches a port or a clock: bytes and ``now`` (seconds, any monotonic origin) come
in, bytes and events go out. Rules (PROTOCOL.md section 4):

* DATA frames carry seq 0, 1, 2 ... (mod 256) per direction, restarting at 0 in every epoch.
  One DATA frame is outstanding at a time; further messages wait in a bounded queue.
* A valid DATA frame is ACKed at once (the ACK is queued before the Delivered event is
  returned). The expected seq is delivered; the previous seq again is re-ACKed, not delivered.
* No ACK within T2, or a NAK naming the outstanding seq: retransmit with the same seq and the
  retransmission flag. After ``max_retx`` retransmissions the link goes down and resyncs.
* SYNC(nonce) / SYNC_ACK(nonce, epoch) starts a new epoch; frames of any other epoch are
  ignored. When both ends send SYNC at once, the guard answers and the reader waits.
* Link down: the outstanding message and every queued one are reported as SendFailed (in
  order), never silently dropped. Messages given to ``send_message`` while the link is not up
  wait in the queue and go out after LinkUp.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from guard.core.errors import LinkError

from firmware_bridge.constants import (
    DOWN_LOCAL_RESYNC,
    DOWN_PEER_RESYNC,
    DOWN_RETX_EXHAUSTED,
    EPOCH_MAX,
    EPOCH_NONE,
    FLAG_RETRANSMISSION,
    MAX_PAYLOAD,
    MAX_RETRANSMISSIONS,
    MAX_SEND_QUEUE,
    SEQ_MODULO,
    SYNC_NONCE_LEN,
    T1_S,
    T2_S,
    FrameType,
)
from firmware_bridge.frame import Frame, FrameError, FrameParser, encode_frame

Role = Literal["guard", "reader"]


@dataclass(frozen=True, repr=False)
class Delivered:
    """A DATA payload from the peer, delivered once per (epoch, seq)."""

    payload: bytes

    def __repr__(self) -> str:
        return f"Delivered(<{len(self.payload)} bytes>)"


@dataclass(frozen=True, repr=False)
class Acked:
    """The peer acknowledged one of our messages (it holds the payload now)."""

    payload: bytes

    def __repr__(self) -> str:
        return f"Acked(<{len(self.payload)} bytes>)"


@dataclass(frozen=True, repr=False)
class SendFailed:
    """A message was not acknowledged before the link went down. It may or may not have
    reached the peer: the application decides (re-send with the same txn id, or STATUS)."""

    payload: bytes
    reason: str

    def __repr__(self) -> str:
        return f"SendFailed(<{len(self.payload)} bytes>, {self.reason})"


@dataclass(frozen=True)
class LinkUp:
    epoch: int


@dataclass(frozen=True)
class LinkDown:
    reason: str


LinkEvent = Delivered | Acked | SendFailed | LinkUp | LinkDown


class LinkState(str, enum.Enum):
    IDLE = "IDLE"  # constructed, not started: answers a peer's SYNC
    SYNCING = "SYNCING"  # our SYNC is out, waiting for SYNC_ACK
    UP = "UP"


@dataclass
class LinkStats:
    """Counters for diagnostics (none of them carry payload bytes)."""

    frames_in: int = 0
    frames_out: int = 0
    delivered: int = 0
    duplicates: int = 0
    stale_epoch: int = 0
    out_of_sequence: int = 0
    ignored: int = 0
    retransmissions: int = 0
    naks_sent: int = 0
    naks_received: int = 0
    syncs_sent: int = 0
    frame_errors: dict[str, int] = field(default_factory=dict)


@dataclass
class _Outstanding:
    payload: bytes
    seq: int
    deadline: float
    retx: int = 0


class LinkEndpoint:
    """One end of the reader link. See the module docstring for the rules."""

    def __init__(
        self,
        role: Role,
        *,
        rng: random.Random,
        t2: float = T2_S,
        max_retx: int = MAX_RETRANSMISSIONS,
        t1: float = T1_S,
        max_queue: int = MAX_SEND_QUEUE,
    ) -> None:
        if role not in ("guard", "reader"):
            raise ValueError(f"role must be 'guard' or 'reader', not {role!r}")
        self.role: Role = role
        self._rng = rng
        self._t2 = t2
        self._max_retx = max_retx
        self._max_queue = max_queue
        self._parser = FrameParser(t1=t1)
        self._out = bytearray()
        self.state = LinkState.IDLE
        self.epoch = EPOCH_NONE
        self._prev_epoch = EPOCH_NONE
        self._tx_seq = 0
        self._rx_last: int | None = None
        self._nak_armed = True
        self._outstanding: _Outstanding | None = None
        self._queue: deque[bytes] = deque()
        self._nonce: bytes | None = None  # our SYNC waiting for its SYNC_ACK
        self._last_nonce: bytes | None = None
        self._sync_deadline: float | None = None
        self._answered: tuple[bytes, int] | None = None
        self._peer_spoke = False  # a DATA/ACK/NAK of the current epoch arrived: the peer adopted it
        self.stats = LinkStats()

    # ------------------------------------------------------------------ public API

    def start(self, now: float) -> list[LinkEvent]:
        """Send SYNC and wait for SYNC_ACK (at boot, or to force a resync)."""
        events: list[LinkEvent] = []
        if self.state is LinkState.UP:
            self._go_down(DOWN_LOCAL_RESYNC, events)
        self._begin_sync(now)
        return events

    def send_message(self, payload: bytes, now: float) -> None:
        """Queue one application message; it is sent when the link is up and nothing is
        outstanding. Raises LinkError LINK_PAYLOAD_TOO_LONG / LINK_QUEUE_FULL."""
        if len(payload) > MAX_PAYLOAD:
            raise LinkError(f"message of {len(payload)} bytes exceeds {MAX_PAYLOAD}", code="LINK_PAYLOAD_TOO_LONG")
        if len(self._queue) >= self._max_queue:
            raise LinkError(f"{len(self._queue)} messages already queued", code="LINK_QUEUE_FULL")
        self._queue.append(bytes(payload))
        self._transmit_next(now)

    def receive_bytes(self, data: bytes, now: float) -> list[LinkEvent]:
        """Feed bytes read from the line. Call ``bytes_to_send`` right after: ACKs are queued."""
        events: list[LinkEvent] = []
        for item in self._parser.feed(data, now):
            self._dispatch(item, now, events)
        return events

    def tick(self, now: float) -> list[LinkEvent]:
        """Run the timers (T1 inside the parser, T2, SYNC repeat)."""
        events: list[LinkEvent] = []
        for item in self._parser.poll(now):
            self._dispatch(item, now, events)
        if self.state is LinkState.SYNCING and self._sync_deadline is not None and now >= self._sync_deadline:
            self._send_sync(now, retransmission=True)
        out = self._outstanding
        if self.state is LinkState.UP and out is not None and now >= out.deadline:
            self._retransmit(now, events)
        return events

    def bytes_to_send(self) -> bytes:
        """Drain the outbound buffer."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def next_deadline(self) -> float | None:
        """The earliest time ``tick`` has work to do, or None."""
        candidates = [self._parser.deadline()]
        if self.state is LinkState.SYNCING:
            candidates.append(self._sync_deadline)
        if self.state is LinkState.UP and self._outstanding is not None:
            candidates.append(self._outstanding.deadline)
        present = [c for c in candidates if c is not None]
        return min(present) if present else None

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged (outstanding + queued)."""
        return len(self._queue) + (self._outstanding is not None)

    # ------------------------------------------------------------------ sending

    def _emit(self, frame: Frame) -> None:
        self._out += encode_frame(frame)
        self.stats.frames_out += 1

    def _transmit_next(self, now: float) -> None:
        if self.state is not LinkState.UP or self._outstanding is not None or not self._queue:
            return
        payload = self._queue.popleft()
        self._outstanding = _Outstanding(payload, self._tx_seq, now + self._t2)
        self._emit(Frame(FrameType.DATA, self._tx_seq, self.epoch, payload))

    def _retransmit(self, now: float, events: list[LinkEvent]) -> None:
        out = self._outstanding
        assert out is not None
        if out.retx >= self._max_retx:
            self._go_down(DOWN_RETX_EXHAUSTED, events)
            self._begin_sync(now)
            return
        out.retx += 1
        out.deadline = now + self._t2
        self.stats.retransmissions += 1
        self._emit(Frame(FrameType.DATA, out.seq, self.epoch, out.payload, FLAG_RETRANSMISSION))

    def _begin_sync(self, now: float) -> None:
        nonce = self._last_nonce
        while nonce == self._last_nonce:
            nonce = self._rng.getrandbits(8 * SYNC_NONCE_LEN).to_bytes(SYNC_NONCE_LEN, "big")
        self._nonce = self._last_nonce = nonce
        self.state = LinkState.SYNCING
        self._send_sync(now, retransmission=False)

    def _send_sync(self, now: float, *, retransmission: bool) -> None:
        assert self._nonce is not None
        flags = FLAG_RETRANSMISSION if retransmission else 0
        self._emit(Frame(FrameType.SYNC, 0, EPOCH_NONE, self._nonce, flags))
        self._sync_deadline = now + self._t2
        self.stats.syncs_sent += 1

    def _go_down(self, reason: str, events: list[LinkEvent]) -> None:
        events.append(LinkDown(reason))
        failed = ([self._outstanding.payload] if self._outstanding is not None else []) + list(self._queue)
        events.extend(SendFailed(p, reason) for p in failed)
        self._outstanding = None
        self._queue.clear()
        self.state = LinkState.IDLE
        self._prev_epoch = self.epoch or self._prev_epoch
        self.epoch = EPOCH_NONE
        self._rx_last = None

    def _establish(self, epoch: int, now: float, events: list[LinkEvent]) -> None:
        self.state = LinkState.UP
        self.epoch = epoch
        self._tx_seq = 0
        self._rx_last = None
        self._nak_armed = True
        self._peer_spoke = False
        self._nonce = None
        self._sync_deadline = None
        events.append(LinkUp(epoch))
        self._transmit_next(now)

    # ------------------------------------------------------------------ receiving

    def _dispatch(self, item: Frame | FrameError, now: float, events: list[LinkEvent]) -> None:
        if isinstance(item, FrameError):
            self._on_frame_error(item)
            return
        self.stats.frames_in += 1
        self._nak_armed = True
        kind = item.kind
        if kind is FrameType.DATA:
            self._on_data(item, events)
        elif kind is FrameType.ACK:
            self._on_ack(item, now, events)
        elif kind is FrameType.NAK:
            self._on_nak(item, now, events)
        elif kind is FrameType.SYNC:
            self._on_sync(item, now, events)
        else:
            self._on_sync_ack(item, now, events)

    def _on_frame_error(self, err: FrameError) -> None:
        errors = self.stats.frame_errors
        errors[err.code] = errors.get(err.code, 0) + 1
        # One NAK per burst of damage: a noisy line must not burn the peer's retransmissions.
        if self.state is LinkState.UP and self._nak_armed:
            self._nak_armed = False
            self.stats.naks_sent += 1
            self._emit(Frame(FrameType.NAK, self._rx_expected(), self.epoch))

    def _rx_expected(self) -> int:
        return 0 if self._rx_last is None else (self._rx_last + 1) % SEQ_MODULO

    def _current(self, frame: Frame) -> bool:
        if self.state is not LinkState.UP or frame.epoch != self.epoch:
            self.stats.stale_epoch += 1
            return False
        self._peer_spoke = True
        return True

    def _on_data(self, frame: Frame, events: list[LinkEvent]) -> None:
        if not self._current(frame):
            return
        if frame.seq == self._rx_expected():
            self._emit(Frame(FrameType.ACK, frame.seq, self.epoch))
            self._rx_last = frame.seq
            self.stats.delivered += 1
            events.append(Delivered(frame.payload))
        elif frame.seq == self._rx_last:
            self._emit(Frame(FrameType.ACK, frame.seq, self.epoch))
            self.stats.duplicates += 1
        else:
            self.stats.out_of_sequence += 1

    def _on_ack(self, frame: Frame, now: float, events: list[LinkEvent]) -> None:
        if not self._current(frame):
            return
        out = self._outstanding
        if out is None or frame.seq != out.seq:
            self.stats.ignored += 1
            return
        self._outstanding = None
        self._tx_seq = (out.seq + 1) % SEQ_MODULO
        events.append(Acked(out.payload))
        self._transmit_next(now)

    def _on_nak(self, frame: Frame, now: float, events: list[LinkEvent]) -> None:
        if not self._current(frame):
            return
        self.stats.naks_received += 1
        out = self._outstanding
        if out is None or frame.seq != out.seq:
            self.stats.ignored += 1
            return
        self._retransmit(now, events)

    def _on_sync(self, frame: Frame, now: float, events: list[LinkEvent]) -> None:
        nonce = frame.payload
        if len(nonce) != SYNC_NONCE_LEN:
            self.stats.ignored += 1
            return
        if self.state is LinkState.SYNCING and self.role == "reader":
            self.stats.ignored += 1
            return
        if (self.state is LinkState.UP and self._answered == (nonce, self.epoch) and not self._peer_spoke):
            # The same nonce again while up in the epoch it chose, before the peer sent anything in
            # that epoch: a repeat (lost SYNC_ACK) or a copy duplicated on the line. Answer the same.
            # Once a DATA/ACK/NAK of the epoch has arrived, the peer had adopted it; the line keeps
            # order, so this SYNC is new: a peer that rebooted and reused its nonce gets a new
            # epoch at once instead of three unanswered retransmissions (PROTOCOL.md 4.4).
            self._emit(Frame(FrameType.SYNC_ACK, 0, self.epoch, nonce))
            return
        if self.state is LinkState.UP:
            self._go_down(DOWN_PEER_RESYNC, events)
        epoch = EPOCH_NONE
        while epoch in (EPOCH_NONE, self._prev_epoch):
            epoch = self._rng.randint(1, EPOCH_MAX)
        self._answered = (nonce, epoch)
        self._emit(Frame(FrameType.SYNC_ACK, 0, epoch, nonce))
        self._establish(epoch, now, events)

    def _on_sync_ack(self, frame: Frame, now: float, events: list[LinkEvent]) -> None:
        if self.state is not LinkState.SYNCING or frame.payload != self._nonce or frame.epoch == EPOCH_NONE:
            self.stats.ignored += 1
            return
        self._answered = None
        self._establish(frame.epoch, now, events)
