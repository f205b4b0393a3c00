"""The fleet database (PostgreSQL 15): schema, migrations and day partitions.

``entries`` holds every terminal's journal entries verbatim (masked PANs and keyed tokens only:
exactly what the terminal journal holds; vaults never leave a terminal). It is partitioned by
business day (UTC date of ``ts``; RANGE) and each day by terminal (HASH, ``fleet_meta.hash_parts``
ways), so a day is dropped or archived as a unit and a terminal's rows of a day sit in one small
table. Its only index is the primary key (terminal, seq, day): the witness compares hashes by
(terminal, seq range), verify walks (terminal, seq). ``txns`` is one row per transaction (its
state as the engine restores it), the input of reconcile and report. ``terminals`` holds the
enrolled keys and the verified chain state (the witness). Nothing else is indexed.

Citus: ``entries``, ``txns``, ``terminals``, ``ingests``, ``rejections`` are distributed by
``terminal`` (co-located); settlement rows by ``tid`` (same values): docs/FLEET.md.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import psycopg

SCHEMA_VERSION = 1
DEFAULT_HASH_PARTS = 16

_V1 = """
CREATE TABLE fleet_meta (k text PRIMARY KEY, v text NOT NULL);
CREATE TABLE terminals (
    terminal    text PRIMARY KEY,
    k0          bytea NOT NULL,          -- escrowed MAC ratchet key (the auditor's secret)
    pubs        text[] NOT NULL,         -- enrolled checkpoint keys, oldest first (hex)
    state       jsonb NOT NULL,          -- guard.fleet.chain.ChainState after the last accepted entry
    audit       jsonb,                   -- the same, after the last entry `fleet verify` re-checked
    audit_problem text,                  -- what `fleet verify` found wrong in the stored rows (NULL: nothing)
    witness_seq bigint NOT NULL DEFAULT 0,  -- seq of the newest verified checkpoint
    witness_cp  text,                    -- its payload, verbatim
    last_seen   timestamptz,
    first_seq   bigint NOT NULL DEFAULT 1
);
CREATE TABLE entries (
    terminal   text NOT NULL,
    day        date NOT NULL,
    seq        bigint NOT NULL,
    ts         double precision NOT NULL,
    kind       text NOT NULL,
    txn        text,
    payload    text NOT NULL,
    prev_hash  bytea NOT NULL,
    entry_hash bytea NOT NULL,
    mac        bytea NOT NULL,
    PRIMARY KEY (terminal, seq, day)
) PARTITION BY RANGE (day);
CREATE TABLE txns (
    terminal   text NOT NULL,
    txn        text NOT NULL,
    kind       text NOT NULL,
    state      text NOT NULL,
    stan       integer NOT NULL,
    date       text NOT NULL,
    amount     bigint NOT NULL,
    tid        text NOT NULL,
    mid        text NOT NULL,
    masked_pan text NOT NULL,
    rrn        text NOT NULL,
    last_seq   bigint NOT NULL,
    updated    double precision NOT NULL,
    PRIMARY KEY (terminal, txn)
);
CREATE TABLE ingests (
    id        bigserial PRIMARY KEY,
    terminal  text NOT NULL,
    file      text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq  bigint NOT NULL,
    added     bigint NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE rejections (
    id       bigserial PRIMARY KEY,
    terminal text NOT NULL,
    seq      bigint,
    code     text NOT NULL,
    reason   text NOT NULL,
    file     text NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE settlement_files (
    id     serial PRIMARY KEY,
    name   text NOT NULL,
    sha256 text UNIQUE NOT NULL,
    rows   bigint NOT NULL
);
CREATE TABLE settlement (
    file_id  integer NOT NULL,
    line     integer NOT NULL,
    date     text NOT NULL,
    tid      text NOT NULL,
    mid      text NOT NULL,
    stan     text NOT NULL,
    rrn      text NOT NULL,
    amount   bigint NOT NULL,
    type     text NOT NULL,
    response text NOT NULL
);
CREATE INDEX settlement_file ON settlement (file_id);
CREATE TABLE discrepancies (
    run        bigint NOT NULL,
    terminal   text NOT NULL,
    category   text NOT NULL,
    action     text NOT NULL,
    txn        text,
    mid        text NOT NULL,
    stan       text NOT NULL,
    date       text NOT NULL,
    terminal_state text NOT NULL,
    terminal_amount bigint,
    host_amount bigint,
    host_net_debits integer NOT NULL,
    rrn        text NOT NULL,
    masked_pan text NOT NULL
);
CREATE TABLE reconcile_runs (id bigserial PRIMARY KEY, files integer[] NOT NULL, at timestamptz NOT NULL DEFAULT now());
"""

MIGRATIONS: dict[int, str] = {1: _V1}


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


def init(dsn: str, *, hash_parts: int = DEFAULT_HASH_PARTS) -> int:
    """Create or migrate the schema (one transaction, idempotent); returns the version found."""
    with connect(dsn) as conn, conn.transaction():
        conn.execute("CREATE TABLE IF NOT EXISTS fleet_migrations (version integer PRIMARY KEY, "
                     "applied timestamptz NOT NULL DEFAULT now())")
        conn.execute("LOCK TABLE fleet_migrations IN EXCLUSIVE MODE")
        row = conn.execute("SELECT max(version) FROM fleet_migrations").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        for v in range(found + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[v].encode())
            conn.execute("INSERT INTO fleet_migrations (version) VALUES (%s)", (v,))
        if found == 0:
            conn.execute("INSERT INTO fleet_meta VALUES ('hash_parts', %s)", (str(hash_parts),))
    return found


def day_of(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).date()


def ensure_days(conn: psycopg.Connection[Any], days: Iterable[dt.date], known: set[dt.date] | None = None) -> None:
    """Create the partitions of these business days (each hashed by terminal), in their own
    transactions so an ingest never holds the parent's lock; concurrent creators are tolerated."""
    parts = int(_meta(conn, "hash_parts"))
    for day in sorted(set(days)):
        if known is not None and day in known:
            continue
        name = f"entries_{day:%Y%m%d}"
        exists = conn.execute("SELECT 1 FROM pg_class WHERE relname = %s", (name,)).fetchone()
        if exists is None:
            try:
                with conn.transaction():
                    nxt = day + dt.timedelta(days=1)
                    conn.execute(f"CREATE TABLE {name} PARTITION OF entries FOR VALUES FROM ('{day}') TO ('{nxt}') "
                                 "PARTITION BY HASH (terminal)")
                    for r in range(parts):
                        conn.execute(f"CREATE TABLE {name}_{r} PARTITION OF {name} "
                                     f"FOR VALUES WITH (MODULUS {parts}, REMAINDER {r})")
            except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
                pass
        if known is not None:
            known.add(day)


def _meta(conn: psycopg.Connection[Any], k: str) -> str:
    row = conn.execute("SELECT v FROM fleet_meta WHERE k = %s", (k,)).fetchone()
    if row is None:
        raise psycopg.ProgrammingError("the fleet schema is not initialised: run posguard fleet init")
    return str(row[0])

