"""Link codec cost vs. line time: median µs to encode and decode a typical AUTH frame, printed
beside the time the same frame takes on the wire (8N1: 10 bits per byte).

    python -m posguard.bench.link [--baud 115200] [--rounds 301] [--batch 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


from firmware_bridge.constants import BITS_PER_BYTE_8N1, DEFAULT_BAUDRATE, FrameType
from firmware_bridge.frame import Frame, FrameParser, encode_frame
from firmware_bridge.messages import Auth, decode_message, encode_message

EPOCH = 0x1B2C3D4E
AUTH = Auth(bytes.fromhex("00000000000000070000000000000001"), 1250, "978", "4761739001010119", "2512", "lane-01")


def median_us(fn: Callable[[], object], rounds: int, batch: int) -> float:
    """Median over ``rounds`` of the mean time per call in a batch of ``batch`` calls."""
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter_ns() - t0) / batch / 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baud", type=int, default=DEFAULT_BAUDRATE)
    ap.add_argument("--rounds", type=int, default=301)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args(argv)

    wire = encode_frame(Frame(FrameType.DATA, 0, EPOCH, encode_message(AUTH)))

    def encode() -> bytes:
        return encode_frame(Frame(FrameType.DATA, 0, EPOCH, encode_message(AUTH)))

    def decode() -> object:
        (f,) = FrameParser().feed(wire, 0.0)
        return decode_message(f.payload)  # type: ignore[union-attr]

    def decode_bytewise() -> object:
        p = FrameParser()
        out: list[object] = []
        for i in range(len(wire)):
            out += p.feed(wire[i : i + 1], 0.0)
        return decode_message(out[0].payload)  # type: ignore[attr-defined]

    def both() -> object:
        (f,) = FrameParser().feed(encode(), 0.0)
        return decode_message(f.payload)  # type: ignore[union-attr]

    assert decode() == AUTH and decode_bytewise() == AUTH
    line_us = len(wire) * BITS_PER_BYTE_8N1 / args.baud * 1e6
    rows = [
        ("encode (message + frame)", median_us(encode, args.rounds, args.batch)),
        ("decode (parser + message), one read", median_us(decode, args.rounds, args.batch)),
        ("decode, fed one byte at a time", median_us(decode_bytewise, args.rounds, max(1, args.batch // 4))),
        ("encode + decode", median_us(both, args.rounds, args.batch)),
    ]
    print(f"AUTH frame: {len(wire)} bytes on the wire; at {args.baud} 8N1 it takes {line_us:,.0f} µs to transmit")
    for name, us in rows:
        print(f"  {name:<38} {us:8.1f} µs   ({us / line_us:6.1%} of line time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
