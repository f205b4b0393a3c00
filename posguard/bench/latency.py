"""Benchmark: the guard's added latency from the last byte of an AUTH frame on the serial line to
the first byte of the 0200 on the host socket, beside the frame's own transmission time at 115200
baud, and the link layer's encode+decode cost per frame.

Real pieces: a null-modem pty pair, the daemon's objects (posguard.run.build: reader bridge,
engine, journal on disk, uplink) stepped in a thread, and a TCP host on 127.0.0.1 that stamps
the first byte of each request and answers at once. One monotonic clock for both ends.
The latency includes the intent's durable commit (the fsync), which must precede the send; it is
also printed without it, using the journal's own timing of that commit.

usage: python -m posguard.bench.latency [--sales N]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


from firmware_bridge import messages as M
from firmware_bridge.frame import Frame, FrameParser, encode_frame
from firmware_bridge.constants import FrameType
from firmware_bridge.link import Delivered, LinkEndpoint
from firmware_bridge.nullmodem import NullModem
from firmware_bridge.serial_port import open_port
from guard.simulation.hostsim import HostCore
from guard.hostlink.iso import HostCodec, HostMessage
from guard.journal.keys import init_keys
from posguard.config import parse
from posguard.run import build

PAN = "4761739001010119"


class StampingHost:
    """Answers every request at once; records when the first byte of each request arrived."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.first_byte: list[float] = []
        self.core = HostCore(seed=1, dup_detection=True)
        self.codec = HostCodec()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.2)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            dec = self.codec.decoder(side="host")
            pending = False
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                if not pending:
                    self.first_byte.append(time.monotonic())
                for m in dec.feed(data):
                    if isinstance(m, HostMessage):
                        for r in self.core.handle(m.fields, time.time()):
                            if r.fields is not None:
                                conn.sendall(self.codec.encode(r.fields))
                pending = dec.buffered > 0
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=2)
        self.sock.close()


def link_cost(n: int = 5000) -> tuple[float, int]:
    """Median seconds to encode an AUTH frame and decode it back; and the frame's size."""
    payload = M.encode_message(M.Auth(b"\x01" * 16, 1234, "978", PAN, "2912", "R1"))
    frame = Frame(FrameType.DATA, seq=1, epoch=7, payload=payload)
    ts = []
    wire = b""
    for _ in range(n):
        t0 = time.perf_counter()
        wire = encode_frame(frame)
        out = FrameParser().feed(wire, 0.0)
        M.decode_message(out[0].payload)  # type: ignore[union-attr]
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), len(wire)


def q(xs: list[float], p: float) -> float:
    """The ``p`` quantile of ``xs`` (nearest rank)."""
    return sorted(xs)[int(p * (len(xs) - 1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sales", type=int, default=300)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="posguard-latency-"))
    init_keys(tmp / "keys")
    host = StampingHost()
    cable = NullModem()
    cfg = parse({
        "terminal": {"terminal_id": "LATENCY1", "merchant_id": "LATENCYMERCH001"},
        "reader": {"url": cable.a, "reader_id": "R1"},
        "host": {"address": "127.0.0.1", "port": host.port},
        "journal": {"path": str(tmp / "journal.db"), "keys": str(tmp / "keys")},
        "policy": {"double_swipe_window": 0, "card_max_count": 0, "card_max_amount": 0, "terminal_max_count": 0},
    })
    ready, stop = threading.Event(), threading.Event()
    holder: dict[str, Any] = {}

    def guard() -> None:
        svc, bridge = build(cfg)
        holder["svc"] = svc
        ready.set()
        while not stop.is_set():
            svc.step(0.002)
        bridge.link.port.close()
        svc.close()

    gt = threading.Thread(target=guard, daemon=True)
    gt.start()
    ready.wait(10)
    port = open_port(cable.b)
    ep = LinkEndpoint("reader", rng=random.Random(1))
    fd = port.fileno()

    def pump(until: float, want: type | None = None) -> Any:
        while time.monotonic() < until:
            now = time.monotonic()
            data = os.read(fd, 4096) if port.in_waiting else b""
            evs = ep.receive_bytes(data, now) if data else []
            evs += ep.tick(now)
            out = ep.bytes_to_send()
            if out:
                port.write(out)
            for ev in evs:
                if isinstance(ev, Delivered) and want is not None:
                    m = M.decode_message(ev.payload)
                    if isinstance(m, want) and not getattr(m, "in_progress", False):
                        return m
            if want is None and ep.epoch:
                return None
            time.sleep(0.0002)
        raise TimeoutError("no answer")

    ep.start(time.monotonic())
    pump(time.monotonic() + 5)
    svc = holder["svc"]
    lat, lat_no_fsync = [], []
    frame_bytes = 0
    for i in range(args.sales + 10):
        txn = (1 << 64 | i + 1).to_bytes(16, "big")
        n0 = len(host.first_byte)
        c0 = svc.journal.commit_seconds
        ep.send_message(M.encode_message(M.Auth(txn, 1000 + 10 * (i % 400), "978", PAN, "2912", "R1")), time.monotonic())
        out = ep.bytes_to_send()
        frame_bytes = len(out)
        port.write(out)
        port.flush()
        t_last = time.monotonic()
        pump(time.monotonic() + 10, M.ResultMessage)
        if i >= 10 and len(host.first_byte) > n0:
            d = host.first_byte[n0] - t_last
            lat.append(d)
            lat_no_fsync.append(d - (svc.journal.commit_seconds - c0) / 2)  # intent commit ~ half of the sale's two
    stop.set()
    gt.join(timeout=5)
    port.close()
    cable.close()
    host.stop()
    med = statistics.median
    tx = frame_bytes * 10 / 115200
    cost, size = link_cost()
    print(f"AUTH frame: {frame_bytes} bytes; serial transmission at 115200 8N1: {tx * 1e3:.3f} ms")
    print(f"{'metric':52} {'median':>9} {'p99':>9}")
    print(f"{'link encode+decode per AUTH frame (ms)':52} {cost * 1e3:9.3f}")
    print(f"{'last AUTH byte -> first 0200 byte, incl. fsync (ms)':52} {med(lat) * 1e3:9.3f} {q(lat, .99) * 1e3:9.3f}")
    print(f"{'same, minus the intent commit (ms)':52} {med(lat_no_fsync) * 1e3:9.3f} {q(lat_no_fsync, .99) * 1e3:9.3f}")
    print(f"{'ratio added latency (excl. fsync) / frame transmission':52} {med(lat_no_fsync) / tx:9.2f}")
    ok = med(lat_no_fsync) < tx
    print("target: added latency below the frame's own transmission time, apart from the fsync ->", "MET" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
