"""The daemon hands the host each new journal checkpoint (0800/880) as an anchor, so deleting the
-wal or rolling the file back can hide at most the entries since the last deposit; an idle
terminal does not deposit checkpoints that only cover its own deposits."""

from __future__ import annotations

import json
import time
from pathlib import Path

from guard.core.constants import CHECKPOINT_EVERY_ENTRIES, CHECKPOINT_EVERY_S
from guard.hostlink.iso import HostCodec
from guard.hostlink.uplink import Uplink
from guard.journal.verify import verify_journal
from guard.runtime.service import open_guard
from guard.simulation.hostserver import HostServer
from guard.simulation.hostsim import HostCore
from tests.support.ops_support import Gen


def _deposits(svc: object) -> list[dict[str, object]]:
    return [json.loads(e.payload) if isinstance(e.payload, str) else dict(e.payload)
            for e in svc.journal.entries() if e.kind == "checkpoint_deposited"]  # type: ignore[attr-defined]


def test_daemon_deposits_each_new_checkpoint_with_the_host(tmp_path: Path) -> None:
    core = HostCore(seed=7, dup_detection=True)
    server = HostServer(core, HostCodec())
    port = server.start()
    g = Gen(tmp_path / "g", core, t=time.time())
    sales = CHECKPOINT_EVERY_ENTRIES // 2 + 4  # intent + outcome each: past one checkpoint
    reqs = [g.request(amount=1000 + i) for i in range(sales)]
    g.close()
    clock = [time.time()]
    svc = open_guard(g.path, g.keys, g.ecfg, Uplink("127.0.0.1", port, HostCodec(), connect_timeout=1.0),
                     clock=lambda: clock[0])
    try:
        assert svc.run_until(lambda: svc.engine.host_up, 10.0)
        assert core.checkpoints() == [], "no new checkpoint yet: nothing deposited at start"
        for r in reqs:
            svc.submit(r)
            assert svc.run_until(lambda r=r: r.key in svc.replies and svc.replies[r.key].state.final, 10.0)
        cp = svc.journal.latest_checkpoint()
        assert cp["covers_seq"] >= CHECKPOINT_EVERY_ENTRIES - 1
        assert svc.run_until(lambda: any(d.get("rc") == "00" for d in _deposits(svc)), 10.0), _deposits(svc)
        kept = core.checkpoints()
        assert kept and kept[-1]["covers_seq"] == cp["covers_seq"] and kept[-1]["sig"] == cp["sig"]
        # the timed checkpoint after the last sales is deposited too
        clock[0] += CHECKPOINT_EVERY_S + 1
        assert svc.run_until(lambda: core.checkpoints()[-1]["covers_seq"]
                             == svc.journal.latest_checkpoint()["covers_seq"] > cp["covers_seq"]
                             and svc.engine.deposit_stan is None, 10.0)
        kept = core.checkpoints()
        assert len(kept) >= 2
        cp = svc.journal.latest_checkpoint()
        # idle: the next timed checkpoint covers only the deposit's own records, and is not deposited
        clock[0] += CHECKPOINT_EVERY_S + 1
        for _ in range(50):
            svc.step(0.0)
        assert svc.journal.latest_checkpoint()["covers_seq"] > cp["covers_seq"]
        assert len(core.checkpoints()) == len(kept)
        # a sale after it: the next checkpoint is deposited again
        more = Gen(tmp_path / "h", core).request(amount=77)
        svc.submit(more)
        assert svc.run_until(lambda: more.key in svc.replies and svc.replies[more.key].state.final, 10.0)
        clock[0] += CHECKPOINT_EVERY_S + 1
        assert svc.run_until(lambda: len(core.checkpoints()) == len(kept) + 1, 10.0)
        assert core.checkpoints()[-1]["covers_seq"] >= svc.journal.latest_checkpoint()["covers_seq"] - 3
    finally:
        svc.close()
        server.stop()
    assert g.keys is not None
    anchor = core.checkpoints()[-1]
    assert verify_journal(g.path, k0=g.keys.k0, public_key=g.keys.public_key, anchor=anchor).ok
