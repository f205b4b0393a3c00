"""Journal compaction: final transactions move to a sealed archive; the terminal's disk stays bounded.

Design. The journal is ONE logical chain: seq numbers, the hash chain and the forward-secure MAC
ratchet (k_seq from the escrowed k0) never restart. Compaction cuts that chain into files without
re-MACing anything, because MACs of the past can only come from keys that no longer exist:

1. Open the live journal EXCLUSIVELY (SQLite's exclusive lock; JOURNAL_BUSY while the daemon or
   a reader has it open) and rebuild every transaction with the engine's own restore.
2. Plan: a transaction is archived if it is final (APPROVED, DECLINED, REVERSED, and with
   ``archive_needs_manual`` NEEDS_MANUAL) and its last entry is older than the cut-off;
   everything else is carried: non-final transactions (pending reversals, held sales, intents
   without outcome), young ones (idempotency and counter rules look at them), NEEDS_MANUAL (by
   default: an operator still has to act, and ``posguard reconcile --apply`` needs them live),
   and both sides of a VOID if either is carried.
3. Seal: a signed checkpoint at the tail (seq C).
4. Archive: entries first..C are copied VERBATIM into ``<stem>.<first>-<C>.archive.db`` (same
   entries table, meta ``segment_role`` = archive, no vault, mode 0400), fsynced and renamed into
   place. Its ratchet row holds SHA256(domain || k_{C+1}), not the key: with k0 an auditor checks
   that the archive ends exactly at C (truncation shows), yet the archive reveals no MAC key.
   It verifies on its own: ``posguard journal verify ARCHIVE --k0 k0.escrow --pubkey verify.pub``.
5. Restart the live file IN PLACE, in ONE SQLite transaction (so a crash leaves either the old
   or the new state, never a mix): delete every entry and the vault blobs of archived
   transactions; append a signed ``segment`` record at C+1 (covers C and its hash, carries the
   checkpoint counter, the signing key in force and every key rotation so far), then verbatim
   copies (same ts, kind, txn, payload; new seq, link and MAC) of every entry of the carried
   transactions in journal order, a ``stan_use`` record with the last STAN (STANs never go back),
   a copy of the last ``config_loaded`` (with ``carried_from_seq``: the daemon's unsigned-change
   check compares the config with it, so compaction cannot reset that check), and a checkpoint. The engine restores carried transactions exactly as before (same records,
   same timestamps); the MAC ratchet simply continues. The same commit records every archived
   transaction's key and archive path in an ``archived_txns`` index (beside the chain, not part
   of it): their ids stay taken, a re-sent id gets its archived result, and an archive that went
   missing refuses the request (ARCHIVE_UNAVAILABLE) instead of taking it as a new sale.
6. VACUUM (optional, default on): the file shrinks to the carried data.

Verifying the live file alone: the verifier starts at the ``segment`` record, ratchets k0 forward
to C+1 and continues; only the holder of k_{C+1} could have MACed a segment record there, so a
deleted prefix still shows, and with k0 it checks ``covers_mac`` (entry C's MAC under k_C, which
the holder of k_{C+1} cannot make). But root at C+1 can start such a file from edited history, so
``posguard journal verify`` fails a segment file unless its archives are given (ARCHIVE_REQUIRED).
``verify_chain`` (``posguard journal verify-chain``) also checks that the files link up (each
segment covers its archive's last entry: hash and MAC), that carried entries are
verbatim copies of complete transaction histories, and that no non-final transaction was
dropped. An anchor older than the segment start must be checked against the archive that holds it.

Crash safety: a crash after step 4 but before step 5 commits leaves the live file intact (with
the seal); running compaction again archives first..C' (a superset) under the same first seq and
deletes the shorter archive. Archive files are never modified afterwards.

Cost: entries of carried transactions appear in the archive and again, as copies, in the live
file (and in the next archive): compact with an age well above the compaction interval.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guard.core.errors import JournalError
from guard.ops.export import JournalView, build_view, iter_entries, open_readonly, read_meta
from guard.core.records import Kind
from guard.journal.format import CHECKPOINT_KIND, ROLE_ARCHIVE, ROTATION_KIND, SEGMENT_KIND, Entry
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys
from guard.core.model import TxnState
from guard.journal.verify import VerifyReport, verify_journal

DAY_S = 86_400.0
NOT_COPIED = (CHECKPOINT_KIND, SEGMENT_KIND, ROTATION_KIND)


@dataclass
class Plan:
    cutoff: float
    keep: set[str]
    archive: set[str]
    last_stan: int


@dataclass
class CompactionResult:
    archive: Path | None
    first_seq: int = 0
    last_seq: int = 0
    segment_seq: int = 0
    archived_txns: int = 0
    kept_txns: int = 0
    carried_entries: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["archive"] = str(self.archive) if self.archive else None
        return d


def plan_compaction(view: JournalView, *, older_than_s: float, now: float,
                    archive_needs_manual: bool = False) -> Plan:
    """Which transactions stay live (``keep``) and which go to the archive (module docstring, step 2)."""
    cutoff = now - older_than_s
    keep: set[str] = set()
    for key, t in view.txns.items():
        if (not t.final or t.updated >= cutoff
                or (t.state == TxnState.NEEDS_MANUAL.value and not archive_needs_manual)):
            keep.add(key)
    for key, t in view.txns.items():  # a VOID and its original live or go together
        if t.original and (key in keep or t.original in keep):
            keep.update((key, t.original))
    keep &= set(view.txns)
    return Plan(cutoff, keep, set(view.txns) - keep, view.engine.last_stan)


def journal_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (Path(f"{path}{s}") for s in ("", "-wal", "-shm")) if p.exists())


def compact(journal_path: Path, keys: DeviceKeys, archive_dir: Path, *, older_than_days: float, now: float,
            vacuum: bool = True, archive_needs_manual: bool = False,
            progress: Callable[[str, int, int], None] | None = None) -> CompactionResult:
    """Compact ``journal_path`` (module docstring). Nothing to archive: nothing changes (archive None)."""
    if not older_than_days >= 0:
        raise ValueError("older_than_days must be >= 0")
    path = Path(journal_path)
    meta = read_meta(path)
    before = journal_bytes(path)
    j = Journal.open_exclusive(path, keys, terminal_id=meta.get("terminal_id", ""))
    try:
        config: dict[str, Any] = {}
        view = build_view(meta, _watch_config(j.entries(), config),
                          (lambda d, t: progress("reading", d, t)) if progress else None, j.last_seq)
        plan = plan_compaction(view, older_than_s=older_than_days * DAY_S, now=now,
                               archive_needs_manual=archive_needs_manual)
        if not plan.archive:
            return CompactionResult(None, kept_txns=len(plan.keep), bytes_before=before, bytes_after=before)
        if progress:
            progress("archiving", 0, 1)
        seal = j.checkpoint(now)
        archive_dir = Path(archive_dir)
        archive_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = archive_name(path, view.first_seq, seal)
        first, last = j.write_archive(archive_dir / name, now=now)
        for stale in archive_dir.glob(f"{path.stem}.{first:012d}-*.archive.db"):
            if stale.name != name:  # an interrupted run's shorter archive: a prefix of this one
                stale.chmod(0o600)
                stale.unlink()
        if progress:
            progress("carrying over", 0, 1)
        recs: list[tuple[str, str | None, dict[str, Any]]] = [("stan_use", None, {"stan": plan.last_stan, "purpose": "carry_over"})] \
            if plan.last_stan else []
        if config:
            recs.append((Kind.CONFIG_LOADED.value, None, {**config["payload"], "carried_from_seq": config["seq"]}))
        note = {"older_than_days": older_than_days, "cutoff": plan.cutoff, "archive": name,
                "archived_txns": len(plan.archive)}
        seg, carried = j.restart_segment(plan.keep, records=recs, note=note, now=now,
                                         archive=str((archive_dir / name).resolve()))
        if vacuum:
            if progress:
                progress("vacuum", 0, 1)
            j.vacuum()
    finally:
        j.close()
    return CompactionResult(archive_dir / name, first, last, seg, len(plan.archive), len(plan.keep), carried,
                            before, journal_bytes(path))


def _watch_config(entries: Iterable[Entry], last: dict[str, Any]) -> Iterator[Entry]:
    """Pass ``entries`` through, keeping the last ``config_loaded`` (``payload`` and ``seq``) in ``last``."""
    for e in entries:
        if e.kind == Kind.CONFIG_LOADED.value:
            last["payload"], last["seq"] = e.payload, e.seq
        yield e


def archive_name(journal_path: Path, first: int, last: int) -> str:
    return f"{Path(journal_path).stem}.{first:012d}-{last:012d}.archive.db"


# --- verifying a chain of files --------------------------------------------------------------


@dataclass
class FileInfo:
    path: Path
    first: int
    last: int
    role: str
    report: VerifyReport


@dataclass
class ChainReport:
    files: list[FileInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(f.report.ok for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems,
                "files": [{"path": str(f.path), "first_seq": f.first, "last_seq": f.last, "role": f.role,
                           "report": f.report.__dict__} for f in self.files]}


def verify_chain(paths: Sequence[Path], *, k0: bytes | None = None, public_keys: Sequence[Ed25519PublicKey] = (),
                 progress: Callable[[str, int, int], None] | None = None) -> ChainReport:
    """Verify archives and the live journal as one chain (module docstring): each file on its own,
    the links between them, and the carry-over of every non-final transaction."""
    rep = ChainReport()
    infos = []
    for p in paths:
        p = Path(p)
        meta = read_meta(p)
        conn = open_readonly(p)
        try:
            lo, hi = conn.execute("SELECT min(seq), max(seq) FROM entries").fetchone()
        finally:
            conn.close()
        infos.append((lo or 0, hi or 0, meta.get("segment_role", "live"), p))
    infos.sort()
    for i, (lo, hi, role, p) in enumerate(infos):
        cb = (lambda d, t, name=p.name: progress(f"verifying {name}", d, t)) if progress else None
        r = verify_journal(p, k0=k0, public_keys=public_keys, progress=cb)
        rep.files.append(FileInfo(p, lo, hi, role, r))
        if not r.ok:
            rep.problems.append(f"{p.name}: {r.reason} at entry {r.first_bad_seq}: {r.detail}")
    if not infos:
        rep.problems.append("no files given")
        return rep
    if infos[0][0] != 1:
        rep.problems.append(f"{infos[0][3].name} starts at seq {infos[0][0]}: the archive(s) before it are missing")
    for (_, ahi, arole, a), (blo, _, _, b) in itertools.pairwise(infos):
        if arole != ROLE_ARCHIVE:
            rep.problems.append(f"{a.name} is not an archive but is followed by {b.name}")
        if blo != ahi + 1:
            rep.problems.append(f"{b.name} starts at seq {blo}, {a.name} ends at {ahi}: entries missing or overlapping")
            continue
        rep.problems += _link_problems(a, b, ahi)
    return rep


def _link_problems(a: Path, b: Path, a_last: int) -> list[str]:
    ca, cb = open_readonly(a), open_readonly(b)
    try:
        last_hash, last_mac = ca.execute("SELECT entry_hash, mac FROM entries WHERE seq = ?", (a_last,)).fetchone()
        first = cb.execute("SELECT seq, kind, payload FROM entries ORDER BY seq LIMIT 1").fetchone()
        if first is None or first[1] != SEGMENT_KIND:
            return [f"{b.name} does not start with a segment record"]
        seg = json.loads(first[2])
        if seg.get("covers_seq") != a_last or seg.get("covers_hash") != last_hash.hex():
            return [f"{b.name}'s segment record does not cover {a.name}'s last entry {a_last}"]
        if seg.get("covers_mac") != bytes(last_mac).hex():
            return [f"{b.name}'s segment record does not carry the MAC of {a.name}'s last entry {a_last}"]
        n = int(seg.get("carried", -1))
        carried = cb.execute("SELECT ts, kind, txn, payload FROM entries WHERE seq > ? AND seq <= ? ORDER BY seq",
                             (first[0], first[0] + n)).fetchall()
        if len(carried) != n:
            return [f"{b.name}: the segment record announces {n} carried entries, {len(carried)} follow"]
        kept = {r[2] for r in carried}
        if None in kept:
            return [f"{b.name}: a carried entry belongs to no transaction"]
        src = [r for r in ca.execute("SELECT ts, kind, txn, payload FROM entries ORDER BY seq")
               if r[2] in kept and r[1] not in NOT_COPIED]
        if src != carried:
            return [f"{b.name}: carried entries are not verbatim, complete copies of {a.name}'s entries"]
        view = build_view(dict(ca.execute("SELECT k, v FROM meta").fetchall()), iter_entries(ca))
        dropped = sorted(k for k, t in view.txns.items() if not t.final and k not in kept)
        if dropped:
            return [(f"{b.name}: {len(dropped)} transaction(s) not final in {a.name} were not carried over "
                     f"(first: {dropped[0]})")]
        return []
    except (sqlite3.DatabaseError, JournalError, ValueError, TypeError) as e:
        return [f"{a.name} -> {b.name}: cannot compare ({e})"]
    finally:
        ca.close()
        cb.close()


def archives_in(dir: Path, stem: str | None = None) -> list[Path]:
    """Archive files in ``dir`` (optionally of one journal), in seq order."""
    pat = f"{stem}.*.archive.db" if stem else "*.archive.db"
    return sorted(Path(dir).glob(pat))
