"""``fleet verify``: re-check, from the database, the entries each terminal added since the last
run (chain linkage, MACs from the escrowed k0, checkpoint signatures, key rotations, segment
records), continuing from the chain state stored in ``terminals.audit``.

Ingest already verified every entry before storing it; this pass proves the stored rows still are
what was verified (a database administrator, a restore from the wrong backup or a bad migration
would show here) and advances "verified up to" in ``fleet report``. Only new entries are read: the
cost of a run is the day's entries, not the history. A failure stops that terminal's pass at the
entry, is stored in ``terminals.audit_problem`` (code FLEET_VERIFY_FAILED) and reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guard.fleet.chain import ChainReject, ChainState
from guard.fleet.schema import connect
from guard.journal.format import SEGMENT_KIND

BATCH = 50_000


@dataclass
class VerifyResult:
    terminal: str
    checked: int
    verified_upto: int
    ok: bool
    seq: int | None = None
    reason: str = ""


def verify(dsn: str, terminals: list[str] | None = None,
           progress: Callable[[VerifyResult], None] | None = None) -> list[VerifyResult]:
    out: list[VerifyResult] = []
    with connect(dsn) as conn:
        names = terminals or [r[0] for r in conn.execute("SELECT terminal FROM terminals ORDER BY terminal")]
        for t in names:
            res = verify_terminal(conn, t)
            out.append(res)
            if progress is not None:
                progress(res)
    return out


def verify_terminal(conn: Any, terminal: str) -> VerifyResult:
    """One terminal, one transaction (its row locked: an ingest of the same terminal waits)."""
    with conn.transaction():
        row = conn.execute("SELECT audit, state->>'next_seq' FROM terminals WHERE terminal = %s FOR UPDATE",
                           (terminal,)).fetchone()
        if row is None:
            return VerifyResult(terminal, 0, 0, False, None, "FLEET_UNKNOWN_TERMINAL: not enrolled")
        st = ChainState.from_json(row[0])
        upto = int(row[1]) - 1
        checked = 0
        problem: ChainReject | None = None
        while st.next_seq <= upto and problem is None:
            hi = min(upto, st.next_seq + BATCH - 1)
            rows = conn.execute("SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries "
                                "WHERE terminal = %s AND seq BETWEEN %s AND %s ORDER BY seq",
                                (terminal, st.next_seq, hi)).fetchall()
            if not rows:
                problem = ChainReject("ENTRY_MISSING", st.next_seq, f"entries {st.next_seq}..{hi} are not in the database")
                break
            try:
                for r in rows:
                    r = (r[0], r[1], r[2], r[3], r[4], bytes(r[5]), bytes(r[6]), bytes(r[7]))
                    st.feed((r,), file_first_seq=r[0] if r[2] == SEGMENT_KIND else -1)
                    checked += 1
            except ChainReject as e:
                problem = e
        if problem is None:
            conn.execute("UPDATE terminals SET audit = %s, audit_problem = NULL WHERE terminal = %s",
                         (json.dumps(st.to_json()), terminal))
            return VerifyResult(terminal, checked, st.next_seq - 1, True)
        why = f"FLEET_VERIFY_FAILED: {problem.reason} at seq {problem.seq}: {problem.detail}"
        conn.execute("UPDATE terminals SET audit = %s, audit_problem = %s WHERE terminal = %s",
                     (json.dumps(st.to_json()), why, terminal))
        return VerifyResult(terminal, checked, st.next_seq - 1, False, problem.seq, why)
