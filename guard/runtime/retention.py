"""Automatic retention: the running daemon keeps its live journal bounded, with no operator.

The same cut as ``posguard journal compact`` (guard.ops.compact: verbatim sealed archive, live
file restarted in place from a signed ``segment`` record, ids of archived transactions kept in
``archived_txns``), done from the daemon loop (``GuardService.step``) without stopping it:

1. Due when the live file's first entry is older than 2 x ``retain_s``, or its data (pages in
   use) exceed ``BUDGET_START_FRACTION`` of ``max_live_bytes`` (the budget is a ceiling: sales
   go on while the archive is copied and the cut waits for a quiet moment); checked every
   ``check_every_s``.
2. Archive in slices: ``slice_entries`` entries a loop round (a few ms) are copied into ``<archive>.tmp``
   (guard.journal.archive), reading the live file between two commits.
3. At a quiet moment (no request between intent and answer, no transaction's record for
   ``quiet_s``; after ``max_wait_s`` without one, ``busy_quiet_s`` will do), ONE loop round seals a checkpoint, copies the last entries, makes the archive
   durable and puts it in place, then restarts the live file in one commit. That carries every
   transaction not final, every NEEDS_MANUAL, every transaction with an entry younger than the
   cut-off (at least the counter rules' window, so a restart counts what they count) and the
   VOIDs and refunds linked to them; it ends with a ``snapshot`` (so the next start reads only
   the restarted file). The pause a sale can see is this round; ``pauses`` keeps their lengths,
   ``cuts`` their parts (posguard.bench.retention): it grows with the entries carried (~30 us
   each), it is not bounded. Two rounds would not do: the deposit of the sealing checkpoint
   or an idle-time checkpoint would be journaled in between, after the archive's end.
4. Archives older than ``archive_keep_s`` are deleted, but only once a checkpoint written after
   them was deposited with the host and answered as approved (in this run of the daemon).

Crash at any step: before the rename, a ``.tmp`` is left; after it and before the restart, an
archive whose entries the live file still holds: both are removed when the daemon starts again
(the live file is intact; the next run archives them again); the restart is one SQLite
transaction (tests/simulation/test_crash.py kills the daemon at each of these steps).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.core.policies import horizon_s
from guard.core.records import Kind
from guard.core.txn import Txn, rebuild
from guard.journal.archive import ArchiveWriter
from guard.journal.schema import MARKED_KINDS_SQL

from guard.journal.schema import _connect

if TYPE_CHECKING:
    from guard.runtime.service import GuardService

log = logging.getLogger("posguard.retention")
DAY_S = 86_400.0
MIN_KEEP_S = 60.0


BUDGET_START_FRACTION = 0.75  # a run starts here, so what is written until its cut still fits the budget

@dataclass(frozen=True)
class RetentionConfig:
    retain_s: float  # final transactions stay live this long (0: no age trigger)
    max_live_bytes: int  # pages in use above this: archive down to the rules' window (0: no budget)
    archive_dir: Path
    archive_keep_s: float = 0.0  # 0: never delete archives
    check_every_s: float = 60.0
    quiet_s: float = 60.0  # the cut waits for this long without a transaction (an idle shop)
    max_wait_s: float = 3600.0  # ... for at most this long; then a moment with nothing in flight will do
    busy_quiet_s: float = 2.0  # what "quiet" means once max_wait_s has passed (a shop never idle)
    slice_entries: int = 200
    min_keep_s: float = MIN_KEEP_S  # never cut closer to now than this (nor than the rules' window)


@dataclass
class Run:
    writer: ArchiveWriter
    cutoff: float
    started: float
    reason: str
    archived: tuple[int, int] | None = None  # (first, last) once the archive is in place


@dataclass(frozen=True)
class Cut:
    """One cut round's parts (posguard.bench.retention prints them: the restart grows with ``carried``)."""
    seal_s: float  # sealing checkpoint, last copies, archive fsync and rename
    restart_s: float  # the live file restarted in one commit (re-link and re-MAC of the carried entries)
    archived: int  # entries in the archive (all the live file held)
    carried: int  # entries copied into the restarted file


@dataclass
class Retention:
    svc: GuardService
    cfg: RetentionConfig
    runs: int = 0
    pauses: list[float] = field(default_factory=list)  # seconds of each run's final (blocking) round
    slices: list[float] = field(default_factory=list)  # seconds of each copying slice
    cuts: list[Cut] = field(default_factory=list)  # each cut round's parts (``pauses`` holds their sums)
    confirmed_seq: int = 0  # newest checkpoint seq the host confirmed holding (this run of the daemon)
    deleted: int = 0  # archives deleted
    _run: Run | None = None
    _next_check: float = 0.0
    _dep: tuple[int, int] | None = None  # (stan, checkpoint seq) of the deposit in flight

    def step(self, now: float) -> None:
        """Called once per loop round, after everything of the round is committed."""
        self._watch_deposit()
        j = self.svc.journal
        if self._run is None:
            if now >= self._next_check:
                if not self._next_check:
                    self._drop_orphans()
                self._next_check = now + self.cfg.check_every_s
                self._delete_old_archives(now)
                self._start(now)
            return
        need = self.cfg.quiet_s if now - self._run.started < self.cfg.max_wait_s else self.cfg.busy_quiet_s
        quiet = now - self._last_entry_ts() >= need and not self.svc.engine.in_flight()
        behind = j.last_seq - self._run.writer.copied
        if not quiet or behind > self.cfg.slice_entries:
            t0 = time.perf_counter()
            self._run.writer.copy(self.cfg.slice_entries)
            self.slices.append(time.perf_counter() - t0)
            return
        t0 = time.perf_counter()
        first, last = self._seal(now)
        t1 = time.perf_counter()
        carried = self._restart(now)  # the same round: nothing (not even a deposit) may be journaled in between
        t2 = time.perf_counter()
        self.pauses.append(t2 - t0)
        self.cuts.append(Cut(t1 - t0, t2 - t1, last - first + 1, carried))
        log.info("retention: the cut took %.1f ms (seal and archive %.1f, live restart %.1f, %d entries carried)",
                 (t2 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3, carried)

    def _last_entry_ts(self) -> float:
        """When a transaction's record was last journaled (echoes, deposits, checkpoints do not count)."""
        row = self.svc.journal._db().execute("SELECT ts FROM entries WHERE txn IS NOT NULL ORDER BY seq DESC LIMIT 1"
                                             ).fetchone()
        return float(row[0]) if row else 0.0

    # -- deciding ------------------------------------------------------------------------------

    def live_data_bytes(self) -> int:
        """Bytes of the live file's pages in use (freed pages are reused, not returned: no VACUUM)."""
        c = self.svc.journal._db()
        pages = c.execute("PRAGMA page_count").fetchone()[0] - c.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages) * int(c.execute("PRAGMA page_size").fetchone()[0])

    def due(self, now: float) -> tuple[float, str] | None:
        """(cut-off, reason) if a run is due now, else None."""
        c = self.svc.journal._db()
        row = c.execute("SELECT ts FROM entries ORDER BY seq LIMIT 1").fetchone()
        if row is None:
            return None
        window = max(horizon_s(self.svc.engine.cfg.policy), self.cfg.min_keep_s)
        keep = max(self.cfg.retain_s, window)
        if self.cfg.retain_s > 0 and row[0] < now - 2 * keep:
            return now - keep, "age"
        start_at = self.cfg.max_live_bytes * BUDGET_START_FRACTION
        if self.cfg.max_live_bytes and self.live_data_bytes() > start_at and row[0] < now - window:
            return now - window, "budget"
        return None

    def _start(self, now: float) -> None:
        d = self.due(now)
        if d is None:
            return
        j = self.svc.journal
        self.cfg.archive_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        w = ArchiveWriter(j, self.cfg.archive_dir)
        w.start(now)
        self._run = Run(w, d[0], now, d[1])
        log.info("retention: archiving final transactions older than %.1f days (%s)", (now - d[0]) / DAY_S, d[1])

    # -- the cut -------------------------------------------------------------------------------

    def _seal(self, now: float) -> tuple[int, int]:
        """A sealing checkpoint, the archive completed, durable and in place; (first, last) archived seq."""
        run = self._run
        assert run is not None
        j = self.svc.journal
        try:
            j.checkpoint(now)
            run.archived = run.writer.finish()
        except BaseException:
            run.writer.abort()
            self._run = None
            raise
        first = run.archived[0]
        for stale in self.cfg.archive_dir.glob(f"{Path(j.path).stem}.{first:012d}-*.archive.db"):
            if stale != run.writer.dest:  # an interrupted run's shorter archive: a prefix of this one
                stale.chmod(0o600)
                stale.unlink()
        return run.archived

    def _restart(self, now: float) -> int:
        """Restart the live file (nothing journaled since the seal); returns the entries carried."""
        run = self._run
        assert run is not None and run.archived is not None and run.writer.dest is not None
        self._run = None
        j, eng = self.svc.journal, self.svc.engine
        (first, last), final = run.archived, run.writer.dest
        name = final.name
        carry = self._carry(run.cutoff)
        seg_seq = j.last_seq + 1
        bits = eng.key_filter()
        recs: list[tuple[str, str | None, dict[str, Any]]] = []
        if eng.last_stan:
            recs.append((Kind.STAN_USE.value, None, {"stan": eng.last_stan, "purpose": "carry_over"}))
        config = j.last_of_kind(Kind.CONFIG_LOADED.value)
        if config is not None:
            recs.append((Kind.CONFIG_LOADED.value, None, {**config.payload, "carried_from_seq": config.seq}))
        recs.append((Kind.SNAPSHOT.value, None, {"from_seq": seg_seq, "open": [], "stan": eng.last_stan,
                                                  "digest": hashlib.sha256(bits).hexdigest(),
                                                  "horizon_s": horizon_s(eng.cfg.policy)}))
        note = {"retention": run.reason, "cutoff": run.cutoff, "archive": name}
        _, carried = j.restart_segment(carry, records=recs, note=note, now=now, archive=str(final.resolve()), snapshot_bits=bits)
        snaps = self.svc.snapshots
        if snaps is not None:
            snaps.restart(seg_seq)
        self.runs += 1
        log.info("retention: archived entries %d-%d to %s, carried %d transactions", first, last, name, len(carry))
        return carried

    def _carry(self, cutoff: float) -> set[str]:
        """Transactions the restarted file keeps (module docstring, step 3)."""
        j, eng = self.svc.journal, self.svc.engine
        c = j._db()
        # entries after a checkpoint are no older than it: carry from the newest one before the cut-off
        row = c.execute(f"SELECT seq FROM entries WHERE {MARKED_KINDS_SQL} AND kind = 'checkpoint' AND ts <= ? "
                        "ORDER BY seq DESC LIMIT 1", (cutoff,)).fetchone()
        young_from = row[0] if row else 1
        keep = set(eng.open_keys())
        keep.update(k for (k,) in c.execute("SELECT DISTINCT txn FROM entries WHERE seq >= ? AND txn IS NOT NULL",
                                           (young_from,)))
        keep.update(k for (k,) in c.execute(f"SELECT DISTINCT txn FROM entries WHERE {MARKED_KINDS_SQL} AND kind = ?",
                                           (Kind.NEEDS_MANUAL.value,)) if k)
        todo = list(keep)
        while todo:  # a VOID or refund and the sale it refers to stay together
            x = self._txn(todo.pop())
            if x is None:
                continue
            for k in (x.original, x.voided_by, *x.refunds):
                if k and k not in keep:
                    keep.add(k)
                    todo.append(k)
        return keep

    def _txn(self, key: str) -> Txn | None:
        t = self.svc.engine.txns.get(key)
        return t if t is not None else rebuild(key, self.svc.journal.entries_for(key))

    # -- archives ------------------------------------------------------------------------------

    def _watch_deposit(self) -> None:
        eng = self.svc.engine
        if eng.deposit_stan is not None and (self._dep is None or self._dep[0] != eng.deposit_stan):
            self._dep = (eng.deposit_stan, self.svc._deposited_cp_seq)
        elif self._dep is not None and eng.deposit_stan is None:
            if eng.deposit_result in eng.cfg.rc_approved:
                self.confirmed_seq = max(self.confirmed_seq, self._dep[1])
            self._dep = None

    def _drop_orphans(self) -> None:
        """At start: an archive written by a run that died before restarting the live file covers
        entries the live file still holds (a copy, not the only one): removed, as is a ``.tmp``."""
        if not self.cfg.archive_dir.is_dir():
            return
        j = self.svc.journal
        stem = Path(j.path).stem
        live_first = int(j._db().execute("SELECT min(seq) FROM entries").fetchone()[0])
        for a in self.cfg.archive_dir.glob(f"{stem}.*.archive.*"):
            try:
                first = int(a.name[len(stem) + 1:].split(".")[0].split("-")[0])
            except ValueError:
                continue
            if a.name.endswith(".tmp") or first >= live_first:
                a.chmod(0o600)
                a.unlink()
                log.warning("retention: removed %s, left by a run that did not finish", a.name)

    def _delete_old_archives(self, now: float) -> None:
        if self.cfg.archive_keep_s <= 0 or not self.cfg.archive_dir.is_dir():
            return
        stem = Path(self.svc.journal.path).stem
        for a in sorted(self.cfg.archive_dir.glob(f"{stem}.*-*.archive.db")):
            try:
                last = int(a.name[len(stem) + 1:].split(".")[0].split("-")[1])
                old = now - _archived_at(a) > self.cfg.archive_keep_s
            except (ValueError, IndexError, OSError, sqlite3.Error):
                continue
            if old and last < self.confirmed_seq:
                a.chmod(0o600)
                a.unlink()
                self.deleted += 1
                log.info("retention: deleted %s (older than %.0f days, a later checkpoint is with the host)",
                         a.name, self.cfg.archive_keep_s / DAY_S)


def _archived_at(path: Path) -> float:
    """When the archive was cut (its meta, on the daemon's clock)."""
    c = _connect(path, mode="ro")
    try:
        row = c.execute("SELECT v FROM meta WHERE k = 'archived_at'").fetchone()
    finally:
        c.close()
    return float(row[0]) if row else float("inf")
