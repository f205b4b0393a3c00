"""Snapshots: start-up in O(work in flight), not O(history).

A restart must rebuild exactly the engine that was running. Most of what a journal holds is
final and only ever read back on demand (a re-sent id, a VOID, a refund: ``Load``), so the engine
needs at start only (1) the transactions still open, (2) what the counter rules look back on
(their widest window, ``horizon_s``), (3) the last STAN and (4) a filter of every key the
journal holds, so a re-sent old id is looked up and never taken as new.

The daemon writes a ``snapshot`` record now and then (``Snapshotter``, from the loop, between
two sales), in one ordinary commit with the key filter (table ``snapshot_filter``) and a signed
checkpoint right after it::

    {"from_seq": L, "open": [keys], "stan": n, "digest": sha256(filter), "horizon_s": H}

``L`` is the first entry written less than ``H`` seconds before the snapshot. Restore
(``guard.runtime.restore.restore``) loads the filter, applies the entries before ``L`` of each ``open``
transaction, then every entry from ``L`` on, through ``Engine.apply`` like a full restore (the
snapshot record itself sets the STAN). Any snapshot that checks out yields the same open
transactions, queues, STAN and rule windows as reading every entry (tests/integration/
test_snapshot.py compares the two); one that does not, or one whose ``H`` is shorter than the
rules now configured, is ignored and every entry is read.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque

from guard.core.engine import Engine
from guard.core.policies import horizon_s
from guard.core.records import Kind
from guard.journal.format import canonical_json
from guard.journal.records import MAX_PAYLOAD_CHARS
from guard.journal.store import Journal

log = logging.getLogger("posguard.snapshot")
SNAPSHOT_EVERY_ENTRIES = 4096  # a restart replays at most about this many entries beyond the rules' window
SAMPLES = 256  # (time, seq) marks kept per horizon to find L


class Snapshotter:
    """Writes a snapshot every SNAPSHOT_EVERY_ENTRIES entries (``maybe``, from the daemon loop
    once a round, when nothing is buffered). ``floor``: the ``from_seq`` of the snapshot the
    engine was restored from (or the file's first entry): no later snapshot starts before it
    needs to, and none starts after it before the loop has seen ``horizon_s`` pass."""

    def __init__(self, engine: Engine, journal: Journal, floor: int, *, every: int = SNAPSHOT_EVERY_ENTRIES) -> None:
        self.engine = engine
        self.journal = journal
        self.every = every
        self.floor = max(1, floor)
        self.horizon = horizon_s(engine.cfg.policy)
        # (time, last seq at that time), oldest first: seeded with the checkpoints since ``floor``
        self.samples: deque[tuple[float, int]] = deque(journal.checkpoint_marks(self.floor))
        self.last_seq = journal.last_seq
        self.written = 0
        self.skipped = 0
        self.seconds: list[float] = []  # wall time of each snapshot commit (a loop round a sale may wait for)

    def restart(self, floor: int) -> None:
        """The live file was restarted at ``floor`` (retention) with a snapshot: start over from there."""
        self.floor = max(1, floor)
        self.samples = deque(self.journal.checkpoint_marks(self.floor))
        self.last_seq = self.journal.last_seq

    def note(self, now: float) -> None:
        """Remember where the journal stood at ``now`` (every horizon/SAMPLES seconds at most)."""
        if not self.samples or now - self.samples[-1][0] >= self.horizon / SAMPLES:
            self.samples.append((now, self.journal.last_seq))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.horizon:
            self.samples.popleft()

    def from_seq(self, now: float) -> int:
        """The first entry a restore must replay to see ``horizon`` seconds back from ``now``."""
        cut = now - self.horizon
        best = self.floor
        for t, seq in self.samples:
            if t > cut:
                break
            best = max(best, seq + 1)
        return best

    def due(self) -> bool:
        return self.journal.last_seq - self.last_seq >= self.every

    def maybe(self, now: float) -> bool:
        self.note(now)
        if not self.due():
            return False
        self.write(now)
        return True

    def write(self, now: float) -> int | None:
        """Commit a snapshot now; returns its seq (None: skipped, its open list would not fit)."""
        eng = self.engine
        bits, open_keys = eng.key_filter(), eng.open_keys()
        payload = {"from_seq": self.from_seq(now), "open": open_keys, "stan": eng.last_stan,
                   "digest": hashlib.sha256(bits).hexdigest(), "horizon_s": self.horizon}
        self.last_seq = self.journal.last_seq
        if len(canonical_json(payload)) > MAX_PAYLOAD_CHARS:
            self.skipped += 1
            log.warning("snapshot skipped: %d open transactions do not fit one record", len(open_keys))
            return None
        t0 = time.perf_counter()
        res = self.journal.append([(Kind.SNAPSHOT.value, None, payload)], now=now, snapshot_bits=bits)
        self.seconds.append(time.perf_counter() - t0)
        self.last_seq = self.journal.last_seq
        self.written += 1
        return res.seqs[-1]
