"""Child process for the crash tests: runs the real guard (journal file, TCP uplink) and SIGKILLs
itself at a named point of the write path. Test-only: the kill hooks wrap the adapters here, the
product code has no switch for them.

usage: crash_child.py DIR PORT START COUNT POINT NTH
  POINT: none | before_intent_commit | after_intent_commit | after_send |
         after_response_before_commit | after_outcome_commit | mid_reversal_commit | mid_reversal_send
  with snapshots every few entries and automatic retention on (a cut every second or so):
         retention_none | snapshot_before_commit | snapshot_after_commit | retention_mid_copy |
         retention_before_archive | retention_before_restart | retention_after_restart
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from pathlib import Path

from guard.core.engine import EngineConfig
from guard.core.errors import PosguardError
from guard.hostlink.iso import HostCodec
from guard.journal.keys import load_keys
from guard.core.policies import OFF
from guard.core.model import CardData, Request, TxnKind
from guard.runtime.service import open_guard
from guard.hostlink.uplink import SendOutcome, Uplink

TID = "CRASHT01"
MID = "CRASHMERCHANT01"
PANS = ("4761739001010119", "5413330089020011")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def request(i: int) -> Request:
    txn = hashlib.sha256(f"crash:{i}".encode()).digest()[:16]
    return Request("CR", txn, TxnKind.SALE, 1000 + i, "978", CardData(PANS[i % 2], "2912"))


def retention_on(svc: object, d: Path, point: str, hit: object) -> None:
    """Snapshots every 16 entries and a retention cut about every second (real clock), with the
    kill hooks of the retention points around the archive writer."""
    from guard.journal.archive import ArchiveWriter
    from guard.runtime.retention import Retention, RetentionConfig

    svc.snapshots.every = 16  # type: ignore[attr-defined]
    cfg = RetentionConfig(retain_s=0.3, max_live_bytes=0, archive_dir=d / "archive", check_every_s=0.2, quiet_s=0.05,
                          slice_entries=4, min_keep_s=0.3)
    svc.retention = Retention(svc, cfg)  # type: ignore[arg-type, attr-defined]
    real_copy, real_finish = ArchiveWriter.copy, ArchiveWriter.finish

    def copy(self, n):  # type: ignore[no-untyped-def]
        got = real_copy(self, n)
        if point == "retention_mid_copy" and got:
            hit()  # type: ignore[operator]
        return got

    def finish(self):  # type: ignore[no-untyped-def]
        if point == "retention_before_archive":  # sealed, the archive not yet durable nor in place
            hit()  # type: ignore[operator]
        return real_finish(self)

    ArchiveWriter.copy = copy  # type: ignore[method-assign]
    ArchiveWriter.finish = finish  # type: ignore[method-assign]


def main() -> int:
    d, port, start, count, point, nth = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
    keys = load_keys(d / "keys")
    ecfg = EngineConfig(TID, MID, host_timeout_s=0.4, reversal_timeout_s=0.4, backoff_base_s=0.05, backoff_max_s=0.2,
                        reversal_max_attempts=1000, policy=OFF)
    seen = {"n": 0}

    def hit() -> None:
        seen["n"] += 1
        if seen["n"] >= nth:
            die()

    svc = None

    uplink = Uplink("127.0.0.1", port, HostCodec())
    real_send = uplink.send

    def send(fields: dict[str, str]) -> SendOutcome:
        out = real_send(fields)
        mti = fields.get("t", "")
        if point == "after_send" and mti == "0200":
            hit()
        if point == "mid_reversal_send" and mti in ("0400", "0401"):
            hit()
        return out

    uplink.send = send  # type: ignore[method-assign]

    def wrap_journal(j: object) -> None:
        real_append = j.append  # type: ignore[attr-defined]

        def append(records, **kw):  # type: ignore[no-untyped-def]
            ks = {k for k, _, _ in records}
            if point == "before_intent_commit" and "intent" in ks:
                hit()
            if point == "after_response_before_commit" and "outcome" in ks:
                hit()
            if point == "snapshot_before_commit" and "snapshot" in ks:
                hit()
            out = real_append(records, **kw)
            if point == "after_intent_commit" and "intent" in ks:
                hit()
            if point == "after_outcome_commit" and "outcome" in ks:
                hit()
            if point == "mid_reversal_commit" and "reversal_attempt" in ks:
                hit()
            if point == "snapshot_after_commit" and "snapshot" in ks:
                hit()
            return out

        j.append = append  # type: ignore[attr-defined]
        real_restart = j.restart_segment  # type: ignore[attr-defined]

        def restart_segment(*a, **kw):  # type: ignore[no-untyped-def]
            if point == "retention_before_restart":  # the archive is in place, the live file intact
                hit()
            out = real_restart(*a, **kw)
            if point == "retention_after_restart":
                hit()
            return out

        j.restart_segment = restart_segment  # type: ignore[attr-defined]

    # Recovery itself may be where we die (mid-reversal): wrap before opening the service.
    import guard.runtime.service as service_mod

    real_journal_open, real_journal_create = service_mod.Journal.open, service_mod.Journal.create

    def opened(fn):  # type: ignore[no-untyped-def]
        def inner(*a, **kw):  # type: ignore[no-untyped-def]
            j = fn(*a, **kw)
            wrap_journal(j)
            return j
        return inner

    service_mod.Journal.open = opened(real_journal_open)  # type: ignore[method-assign]
    service_mod.Journal.create = opened(real_journal_create)  # type: ignore[method-assign]

    svc = open_guard(d / "journal.db", keys, ecfg, uplink, rng=random.Random(start), reconnect_s=0.05)
    if point.startswith(("snapshot_", "retention_")):
        retention_on(svc, d, point, hit)
    svc.run_until(lambda: svc.uplink.connected, 5.0)
    svc.drain(10.0)
    progress, tmp = d / "progress", d / "progress.tmp"

    def set_progress(n: int) -> None:
        """Atomic (write + rename): a SIGKILL mid-write must not leave an empty file for the test."""
        tmp.write_text(str(n))
        os.replace(tmp, progress)

    for i in range(start, start + count):
        set_progress(i)
        req = request(i)
        try:
            svc.submit(req)
        except PosguardError as e:
            print(f"sale {i}: {e.code}", file=sys.stderr)
            continue
        svc.run_until(lambda: req.key in svc.replies and not svc.replies[req.key].in_progress, 3.0)
    set_progress(start + count)
    if svc.retention is not None:  # quiet now: give the retention cut its moment
        runs = svc.retention.runs
        svc.run_until(lambda: svc.retention.runs > runs, 3.0)
    ok = svc.drain(20.0)
    svc.close()
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
