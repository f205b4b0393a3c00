"""Link fault injection for the reference reader (guard.simulation.readersim): ``LinkFaults``
damages what the reader writes (duplicate, truncate, bit flip, garbage, split and concatenated
writes) and ``_AckDropper`` drops ACK frames it reads, so both link layers are exercised."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

from firmware_bridge.constants import DLE, T1_S, FrameType
from firmware_bridge.frame import Frame, FrameError, FrameParser, encode_frame


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

