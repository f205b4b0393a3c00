"""Fleet-wide reconciliation in SQL: every enrolled terminal's transactions (``txns``) against the
acquirer's settlement files, with the categories and actions of ``guard.ops.reconcile`` (its module
docstring defines them; tests compare the two on the same data).

Settlement files are validated row by row (``guard.ops.reconcile.read_settlement``: the same
errors, line and column) and loaded with COPY; a file already loaded (same SHA-256) is not loaded
again. Per terminal, only its rows (``tid``) are used and only its sales of the dates those rows
cover are compared, as the single-terminal command does. Rows of terminals the fleet does not know
are counted, not judged. Each run's findings go to ``discrepancies`` (run id), which
``fleet report`` reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.fleet.schema import connect
from guard.ops.reconcile import BOOKED_CODES, CATEGORIES, read_settlement

_JUDGE = """
CREATE TEMP TABLE s_run ON COMMIT DROP AS
  SELECT s.*, array_position(%(files)s::int[], s.file_id) AS fpos
  FROM settlement s WHERE s.file_id = ANY(%(files)s::int[]) AND s.tid IN (SELECT terminal FROM terminals);
CREATE TEMP TABLE hk ON COMMIT DROP AS
WITH h AS (
  SELECT tid, mid, stan, date,
    array_agg(amount ORDER BY fpos, line) FILTER (WHERE type IN ('SALE', 'REFUND') AND response = ANY(%(booked)s)) AS amts,
    array_agg(rrn ORDER BY fpos, line) FILTER (WHERE type IN ('SALE', 'REFUND') AND response = ANY(%(booked)s)) AS rrns,
    (array_agg(response ORDER BY fpos, line) FILTER (WHERE type = 'REVERSAL'))[1] AS first_rev
  FROM s_run GROUP BY tid, mid, stan, date),
h2 AS (
  SELECT tid, mid, stan, date, coalesce(cardinality(amts), 0) AS debits,
         coalesce(first_rev = '00' AND coalesce(cardinality(amts), 0) > 0, false) AS rev1, amts, rrns FROM h),
h3 AS (
  SELECT tid, mid, stan, date, debits - rev1::int AS net,
         CASE WHEN rev1 THEN amts[2:] ELSE amts END AS ra, CASE WHEN rev1 THEN rrns[2:] ELSE rrns END AS rr FROM h2)
SELECT tid, mid, stan, date, net, (SELECT sum(a) FROM unnest(ra) a)::bigint AS host_amount,
       ra[cardinality(ra)] AS last_amount, rr[cardinality(rr)] AS last_rrn FROM h3;
CREATE TEMP TABLE j ON COMMIT DROP AS
  SELECT DISTINCT ON (ktid, t.mid, kstan, t.date) t.terminal, t.txn, t.state, t.amount, t.masked_pan, t.rrn,
         ktid, t.mid, kstan, t.date
  FROM (SELECT t.*, CASE WHEN t.tid = '' THEN t.terminal ELSE t.tid END AS ktid, lpad(t.stan::text, 6, '0') AS kstan
        FROM txns t) t
  JOIN (SELECT DISTINCT tid, date FROM s_run) cov ON cov.tid = t.terminal AND cov.date = t.date
  WHERE t.kind <> 'VOID'
  ORDER BY ktid, t.mid, kstan, t.date, t.last_seq DESC;
INSERT INTO discrepancies
SELECT %(run)s, terminal, category, action, txn, mid, kstan, date, state, amount, host_amount, net, rrn, masked_pan
FROM (
  SELECT j.terminal, j.txn, j.state, j.amount, j.mid, j.kstan, j.date, j.masked_pan,
         coalesce(hk.net, 0) AS net, hk.host_amount,
         CASE WHEN hk.last_amount IS NOT NULL THEN hk.last_rrn ELSE j.rrn END AS rrn,
         CASE
           WHEN j.state = 'APPROVED' THEN CASE
             WHEN coalesce(hk.net, 0) = 0 THEN 'APPROVED_MISSING_AT_HOST'
             WHEN hk.net > 1 THEN 'DOUBLE_DEBIT'
             WHEN hk.last_amount <> j.amount THEN 'AMOUNT_MISMATCH' END
           WHEN coalesce(hk.net, 0) = 0 THEN NULL
           WHEN j.state = 'REVERSED' THEN 'REVERSED_BUT_SETTLED'
           ELSE 'FAILED_BUT_DEBITED' END AS category,
         CASE
           WHEN j.state = 'APPROVED' THEN CASE
             WHEN coalesce(hk.net, 0) = 0 THEN 'NONE'
             WHEN hk.net > 1 THEN 'FLAG_REFUND'
             WHEN hk.last_amount > j.amount THEN 'FLAG_REFUND' ELSE 'NONE' END
           WHEN j.state = 'REVERSED' THEN 'FLAG_REFUND'
           WHEN j.state IN ('DECLINED', 'NEEDS_MANUAL') THEN 'QUEUE_REVERSAL'
           WHEN j.state IN ('DEFERRED', 'REVERSAL_PENDING', 'JOURNALED', 'SENT') THEN 'NONE'
           ELSE 'FLAG_REFUND' END AS action
  FROM j LEFT JOIN hk ON hk.tid = j.terminal AND hk.tid = j.ktid AND hk.mid = j.mid AND hk.stan = j.kstan
                        AND hk.date = j.date
) judged WHERE category IS NOT NULL
UNION ALL
SELECT %(run)s, hk.tid, 'FAILED_BUT_DEBITED', 'FLAG_REFUND', NULL, hk.mid, hk.stan, hk.date, '', NULL,
       hk.last_amount, hk.net, hk.last_rrn, ''
FROM hk WHERE hk.net > 0 AND NOT EXISTS (
  SELECT 1 FROM j WHERE j.ktid = hk.tid AND j.mid = hk.mid AND j.kstan = hk.stan AND j.date = hk.date);
"""


@dataclass
class FleetReconcileReport:
    run: int
    files: list[str]
    rows_used: int
    rows_unknown_terminal: int
    sales_compared: int
    discrepancies: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in CATEGORIES}
        for d in self.discrepancies:
            out[d["category"]] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "files": self.files, "rows_used": self.rows_used,
                "rows_unknown_terminal": self.rows_unknown_terminal, "sales_compared": self.sales_compared,
                "counts": self.counts(), "discrepancies": self.discrepancies}


def load_settlement(conn: Any, path: Path) -> int:
    """Validate and COPY one settlement file; returns its id (an already loaded file keeps its id)."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    row = conn.execute("SELECT id FROM settlement_files WHERE sha256 = %s", (digest,)).fetchone()
    if row is not None:
        return int(row[0])
    rows = read_settlement(path)
    with conn.transaction():
        fid = _one(conn, "INSERT INTO settlement_files (name, sha256, rows) VALUES (%s, %s, %s) RETURNING id",
                   (str(path), digest, len(rows)))
        with conn.cursor() as cur, cur.copy("COPY settlement (file_id, line, date, tid, mid, stan, rrn, amount, type, "
                                            "response) FROM STDIN") as cp:
            for r in rows:
                cp.write_row((fid, r.line, r.date, r.tid, r.mid, r.stan, r.rrn, r.amount, r.type, r.response))
    return fid


def reconcile(dsn: str, paths: Iterable[Path], *, booked_codes: frozenset[str] = BOOKED_CODES) -> FleetReconcileReport:
    paths = [Path(p) for p in paths]
    with connect(dsn) as conn:
        ids = [load_settlement(conn, p) for p in paths]
        with conn.transaction():
            run = _one(conn, "INSERT INTO reconcile_runs (files) VALUES (%s) RETURNING id", (ids,))
            params = {"files": ids, "booked": sorted(booked_codes), "run": run}
            for stmt in filter(str.strip, _JUDGE.split(";\n")):
                conn.execute(stmt.encode(), {k: v for k, v in params.items() if f"%({k})s" in stmt})
            used = _one(conn, "SELECT count(*) FROM s_run", ())
            total = _one(conn, "SELECT count(*) FROM settlement WHERE file_id = ANY(%s)", (ids,))
            compared = _one(conn, "SELECT count(*) FROM j", ())
            cols = ("terminal", "category", "action", "txn", "mid", "stan", "date", "terminal_state",
                    "terminal_amount", "host_amount", "host_net_debits", "rrn", "masked_pan")
            found = [dict(zip(cols, r)) for r in conn.execute(
                f"SELECT {', '.join(cols)} FROM discrepancies WHERE run = %s ORDER BY terminal, date, stan, category",
                (run,))]
    return FleetReconcileReport(run, [str(p) for p in paths], int(used), int(total) - int(used), int(compared), found)


def _one(conn: Any, sql: str, args: tuple[Any, ...]) -> int:
    row = conn.execute(sql, args).fetchone()
    return int(row[0])
