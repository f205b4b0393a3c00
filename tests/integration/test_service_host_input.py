"""Bad host input through the real driver, socket and journal: truncated frames, impossible
lengths, undecodable messages. Each is journaled as such (size and digest, never the bytes), the
sale is reversed, and the guard carries on with the next sale."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from guard.core.engine import EngineConfig
from guard.simulation.hostsim import HostCore
from guard.hostlink.iso import HostCodec, HostMessage
from guard.journal.keys import DeviceKeys
from guard.core.model import CardData, Request, TxnKind, TxnState
from guard.core.policies import OFF
from guard.runtime.service import open_guard
from guard.hostlink.uplink import Uplink

TID, MID = "BADHOST1", "BADHOSTMERCHANT"
PAN = "4761739001010119"

Answer = Callable[[bytes, dict[str, str]], bytes]


class ScriptedHost:
    """A TCP host on 127.0.0.1 whose first answer is replaced by ``bad`` bytes; later requests get
    HostCore's real answers (so the reversal and the next sale go through)."""

    def __init__(self, bad: Answer, close_after_bad: bool) -> None:
        self.core = HostCore(seed=1, dup_detection=True)
        self.codec = HostCodec()
        self.bad, self.close_after_bad = bad, close_after_bad
        self.used = False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.1)
            dec = self.codec.decoder(side="host")
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                for m in dec.feed(data):
                    assert isinstance(m, HostMessage)
                    replies = [self.codec.encode(r.fields) for r in self.core.handle(m.fields, time.time()) if r.fields]
                    if not self.used and m.fields["t"] == "0200":
                        self.used = True
                        conn.sendall(self.bad(replies[0], m.fields))
                        if self.close_after_bad:
                            conn.close()
                            break
                        continue
                    for raw in replies:
                        conn.sendall(raw)
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=2)
        self.sock.close()


CASES: dict[str, tuple[Answer, bool, str]] = {
    "truncated-frame": (lambda good, f: good[: len(good) // 2], True, "HOST_FRAME_TRUNCATED"),
    "zero-length": (lambda good, f: b"\x00\x00" + good, True, "HOST_BAD_LENGTH"),
    "huge-length": (lambda good, f: b"\xff\xff" + good[2:], True, "HOST_BAD_LENGTH"),
    "undecodable": (lambda good, f: struct.pack(">H", 12) + b"0210\xff\xff\xff\xff\xff\xff\xff\xff", False, "HOST_UNDECODABLE"),
    "bad-mti": (lambda good, f: struct.pack(">H", len(good) - 2) + b"9999" + good[6:], False, "HOST_BAD_MTI"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_host_bytes_are_journaled_the_sale_reversed_and_the_guard_carries_on(tmp_path: Path, keys: DeviceKeys,
                                                                                  case: str) -> None:
    bad, close, code = CASES[case]
    host = ScriptedHost(bad, close)
    ecfg = EngineConfig(TID, MID, host_timeout_s=0.5, reversal_timeout_s=0.5, backoff_base_s=0.05, backoff_max_s=0.2, policy=OFF)
    svc = open_guard(tmp_path / "j.db", keys, ecfg, Uplink("127.0.0.1", host.port, HostCodec()), rng=random.Random(1),
                     reconnect_s=0.05)
    try:
        svc.run_until(lambda: svc.uplink.connected, 5)
        first = Request("R", b"\x01" * 16, TxnKind.SALE, 1000, "978", CardData(PAN, "2912"))
        svc.submit(first)
        assert svc.run_until(lambda: first.key in svc.replies and not svc.engine.busy(), 10)
        # Told REVERSAL_PENDING first; the final REVERSED is pushed too and is the latest reply.
        assert svc.replies[first.key].state is TxnState.REVERSED
        assert svc.engine.txns[first.key].state is TxnState.REVERSED
        second = Request("R", b"\x02" * 16, TxnKind.SALE, 2000, "978", CardData(PAN, "2912"))
        svc.submit(second)
        assert svc.run_until(lambda: second.key in svc.replies, 10)
        assert svc.replies[second.key].state is TxnState.APPROVED, "the guard carries on after bad input"
        garbage = [e.payload for e in svc.journal.entries() if e.kind == "host_garbage"]
        assert any(g["code"] == code for g in garbage), garbage
        assert all(set(g) == {"code", "detail", "len", "digest", "count", "bytes", "codes", "last", "since"}
                   and set(g["last"]) == {"code", "len", "digest"} for g in garbage), "sizes, counts and digests only"
    finally:
        svc.close()
        host.stop()
    assert host.core.total_net_debits() == 1, "the reversed sale holds no debit, the second one does"
