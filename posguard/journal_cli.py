"""``posguard journal anchor/show/export/compact/verify-chain``: thin click wrappers around
guard.ops.export and guard.ops.compact; registered by ``posguard.ops_cli.register``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from guard.core.errors import PosguardError
from posguard.cli_helpers import PATH_DIR, PATH_FILE, atomic_text_out, die, die_for, interrupted, load_cfg, progress, wide_console


@click.command("anchor")
@click.argument("journal_path", metavar="JOURNAL", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def journal_anchor(journal_path: Path) -> None:
    """Print the newest signed checkpoint of JOURNAL as JSON (an anchor).

    Keep it away from the terminal; later `posguard journal verify JOURNAL --anchor anchor.json
    --pubkey verify.pub` proves the journal still holds, unchanged, everything up to it
    (detects truncation and rollback). Needs no keys; the daemon may keep running. Warns on
    stderr when the anchor covers nothing but the genesis, or newer entries follow it.

    Exit status: 0 printed (warning or not); 2 the file is not a readable journal; 3 it is locked
    by a maintenance command (JOURNAL_BUSY).
    """
    from guard.ops.export import anchor_coverage, latest_checkpoint

    try:
        cp = latest_checkpoint(journal_path)
        warning = anchor_coverage(journal_path, cp)
    except PosguardError as e:
        die_for(e)
    click.echo(json.dumps(cp, sort_keys=True))
    if warning:
        click.echo(f"posguard: warning: {warning}", err=True)


_FILTER_HELP = {
    "since": "Only entries with seq >= N, or at/after an ISO 8601 date/time (UTC unless an offset is given); "
             "per transaction: transactions with such an entry.",
    "state": "Only transactions in this state (repeatable or comma-separated): JOURNALED (no outcome), APPROVED, "
             "DECLINED, REVERSAL_PENDING, REVERSED, NEEDS_MANUAL, HELD.",
    "per": "One row per transaction (state, stan, amount, rc, approval, rrn, reason, history of (seq, kind, ts)) "
           "or per journal entry.",
}


def _filters(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--per", type=click.Choice(["txn", "entry"]), default="txn", show_default=True,
                     help=_FILTER_HELP["per"])(f)
    f = click.option("--state", "states", multiple=True, metavar="STATE", help=_FILTER_HELP["state"])(f)
    f = click.option("--since", metavar="ISO-DATE|SEQ", help=_FILTER_HELP["since"])(f)
    return click.argument("journal_path", metavar="JOURNAL",
                          type=click.Path(exists=True, dir_okay=False, path_type=Path))(f)


def _rows(journal_path: Path, per: str, since: str | None, states: tuple[str, ...], quiet: bool) -> Iterator[dict[str, Any]]:
    from guard.ops.export import entry_rows, load_view, parse_since, parse_states, txn_rows

    try:
        s, st = parse_since(since), parse_states(states)
        with progress("reading journal", quiet) as update:  # per entry too: every row's `state` is filled
            view = load_view(journal_path, progress=update)
    except PosguardError as e:
        die_for(e)
    if per == "txn":
        return txn_rows(view, s, st)
    return entry_rows(journal_path, view, s, st)


@click.command("show")
@_filters
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="Show the last N rows (0: all).")
def journal_show(journal_path: Path, per: str, since: str | None, states: tuple[str, ...], limit: int) -> None:
    """Print a table of JOURNAL's transactions (or entries), newest last.

    Read-only: needs no keys, never opens the vault (masked PANs only); the daemon may keep
    running. For scripts use `posguard journal export`.

    Exit status: 0 shown; 2 bad filter or unreadable journal; 3 journal locked by a maintenance
    command (JOURNAL_BUSY).
    """
    from collections import deque

    from posguard.tables import entry_table, txn_table

    rows = _rows(journal_path, per, since, states, quiet=False)
    total = 0
    tail: deque[dict[str, Any]] = deque(maxlen=limit or None)
    try:
        for r in rows:
            total += 1
            tail.append(r)
    except PosguardError as e:
        die(2, e)
    console = wide_console()
    if per == "txn":
        table = txn_table(f"{journal_path.name}: {len(tail)} of {total} transactions", tail, console.width)
    else:
        table = entry_table(f"{journal_path.name}: {len(tail)} of {total} entries", tail, console.width)
    console.print(table)


@click.command("export")
@_filters
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), required=True,
              help="jsonl: one JSON object per line; csv: a header, history as seq/kind/time items joined by ';'.")
@click.option("--out", type=PATH_FILE, default=None, help="Write here (atomically, mode 0600) instead of stdout.")
def journal_export(journal_path: Path, per: str, since: str | None, states: tuple[str, ...], fmt: str,
                   out: Path | None) -> None:
    """Export JOURNAL's transactions (or entries) as JSON lines or CSV.

    Per transaction: txn, kind, state, stan, date (MMDD), amount, currency, masked_pan, rc,
    approval, rrn, reason, created, updated, entries, history ([seq, kind, ts] list).
    Per entry: seq, time, ts, kind, txn, state (of its transaction), payload.
    Read-only: needs no keys, never opens the vault; only masked PANs and keyed card tokens appear.

    Exit status: 0 exported; 2 bad filter, unreadable journal or unwritable --out; 3 journal
    locked by a maintenance command (JOURNAL_BUSY); 141 when the
    reading end of a pipe closed early (`| head`).
    """
    from guard.ops.export import ENTRY_COLUMNS, TXN_COLUMNS, write_csv, write_jsonl

    rows = _rows(journal_path, per, since, states, quiet=out is None)
    try:
        with atomic_text_out(out) as f:
            n = write_jsonl(rows, f) if fmt == "jsonl" else write_csv(rows, TXN_COLUMNS if per == "txn" else ENTRY_COLUMNS, f)
    except BrokenPipeError:  # `... | head`: the reader left; end quietly, as `cat` would (128 + SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except OSError as e:
        die(2, f"cannot write {out}: {e.strerror}")
    except PosguardError as e:
        die(2, e)
    if out is not None:
        click.echo(f"{n} rows written to {out}", err=True)


# --- compaction and chain verification --------------------------------------------------------


def _keys_dir(keys_dir: Path | None, config_path: Path | None) -> Path:
    if keys_dir is not None:
        return keys_dir
    if config_path is not None:
        return Path(load_cfg(config_path)["journal.keys"])
    die(2, "give --keys DIR or --config guard.toml (the device keys sign the seal and the segment record)")


@click.command("compact")
@click.argument("journal_path", metavar="JOURNAL", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), required=True, metavar="DAYS",
              help="Archive final transactions whose last entry is older than this many days.")
@click.option("--archive", "archive_dir", type=PATH_DIR, required=True, help="Directory for the archive file.")
@click.option("--keys", "keys_dir", type=PATH_DIR, default=None, help="Device key directory (or --config).")
@click.option("--config", "config_path", type=PATH_FILE, default=None, help="guard.toml naming journal.keys.")
@click.option("--archive-needs-manual", is_flag=True, help="Also archive NEEDS_MANUAL transactions (kept by default).")
@click.option("--no-vacuum", is_flag=True, help="Do not shrink the file (free pages are reused by later appends).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def journal_compact(journal_path: Path, older_than: float, archive_dir: Path, keys_dir: Path | None,
                    config_path: Path | None, archive_needs_manual: bool, no_vacuum: bool, as_json: bool) -> None:
    """Move old final transactions of JOURNAL into a sealed archive in DIR.

    \b
    Design: the journal is one chain (seq, hash chain, MAC ratchet from k0) cut into files.
    1. seal the live journal with a signed checkpoint (seq C);
    2. copy entries first..C VERBATIM to DIR/<stem>.<first>-<C>.archive.db (0400): it verifies
       on its own: posguard journal verify ARCHIVE --k0 k0.escrow --pubkey verify.pub
       (its ratchet row holds a commitment to k_{C+1}, not the key);
    3. in ONE transaction restart the live file: a signed `segment` record at C+1 (covers C,
       carries the checkpoint counter, the signing key and the key rotations), verbatim copies of
       every entry of the transactions that stay (non-final, younger than DAYS, NEEDS_MANUAL
       unless --archive-needs-manual, VOIDs with their sale), the last STAN, a checkpoint;
    4. VACUUM. The live file then verifies from its segment record; `posguard journal
       verify-chain ARCHIVE... JOURNAL` checks the links and the carry-over.
    Copies of carried entries also stay in the archive: compact rarely relative to DAYS.
    The journal is opened exclusively: stop the guard daemon first. Archives are meant to leave
    the terminal; what stays is bounded by what is live and young.

    Exit status: 0 compacted (or nothing old enough); 2 bad arguments, key files or not a live
    journal; 3 journal in use, the write failed or interrupted (Ctrl-C; nothing changed unless the
    result was printed).
    """
    from guard.ops.compact import compact
    from guard.core.errors import JournalError
    from guard.journal.keys import load_keys

    kd = _keys_dir(keys_dir, config_path)
    try:
        keys = load_keys(kd)
    except PosguardError as e:
        die(2, e)
    if older_than < 1:
        click.echo("warning: transactions younger than a day feed idempotency (reader re-sends) and the counter "
                   "rules; archived ones are forgotten by the guard", err=True)
    try:
        with progress("compacting", as_json) as update:
            res = compact(journal_path, keys, archive_dir, older_than_days=older_than, now=time.time(),
                          vacuum=not no_vacuum, archive_needs_manual=archive_needs_manual,
                          progress=lambda what, d, t: update(d, t, what))
    except PosguardError as e:
        die(3 if isinstance(e, JournalError) and e.code not in ("JOURNAL_NOT_INITIALISED", "JOURNAL_MISSING",
                                                                "JOURNAL_IS_ARCHIVE", "JOURNAL_NOT_A_FILE",
                                                                "JOURNAL_CORRUPT", "JOURNAL_SCHEMA_UNEXPECTED") else 2, e)
    except (OSError, sqlite3.Error) as e:
        die(3, f"compaction failed: {e}")
    except KeyboardInterrupt:
        interrupted("the live journal is unchanged unless a result was printed; run the command again")
    if as_json:
        click.echo(json.dumps(res.to_json(), sort_keys=True))
    elif res.archive is None:
        click.echo(f"nothing to compact: no final transaction older than {older_than:g} days "
                   f"({res.kept_txns} transactions stay live)")
    else:
        click.echo(f"archived {res.archived_txns} transactions (entries {res.first_seq}..{res.last_seq}) to "
                   f"{res.archive}\n{res.kept_txns} transactions ({res.carried_entries} entries) carried into the "
                   f"live journal, which now starts at seq {res.segment_seq}; "
                   f"{res.bytes_before:,} -> {res.bytes_after:,} bytes")


@click.command("verify-chain")
@click.argument("paths", metavar="ARCHIVE... JOURNAL", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--k0", "k0_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Escrowed initial MAC key (checks every MAC and where each file ends).")
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public key file(s): verify.pub or verify.pubs (one key per line); any key of the chain will do.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def journal_verify_chain(paths: tuple[Path, ...], k0_file: Path | None, pubkeys: tuple[Path, ...], as_json: bool) -> None:
    """Verify archives and the live journal as one chain.

    Each file is verified on its own (as `posguard journal verify`), then: the files follow each
    other without gap, each segment record covers the previous file's last entry, carried
    entries are verbatim copies of complete transaction histories, and no transaction that was
    not final was dropped. Files may be given in any order.

    Exit status: 0 all holds; 1 a check failed (reported); 2 bad input (key files, not journals).
    """
    from guard.ops.compact import verify_chain
    from guard.journal.keys import load_k0, load_public_keys

    try:
        k0 = load_k0(k0_file) if k0_file else None
        pubs = [k for p in pubkeys for k in load_public_keys(p)]
        with progress("verifying", as_json) as update:
            rep = verify_chain(paths, k0=k0, public_keys=pubs, progress=lambda what, d, t: update(d, t, what))
    except PosguardError as e:
        die(2, e)
    if as_json:
        click.echo(json.dumps(rep.to_json(), default=str, sort_keys=True))
    else:
        for f in rep.files:
            click.echo(f"{'OK  ' if f.report.ok else 'FAIL'} {f.path} [{f.role}] seq {f.first}..{f.last}: {f.report.detail}")
        for p in rep.problems:
            click.echo(f"PROBLEM: {p}")
        click.echo("chain OK" + ("" if k0 else " (MACs not checked: no --k0)") + ("" if pubs else " (signatures not "
                   "checked: no --pubkey)") if rep.ok else "chain FAILED")
    sys.exit(0 if rep.ok else 1)



def whole_history(path: Path, rep: Any, archives: tuple[Path, ...], k0: bytes | None, pubs: list[Any]) -> Any:
    """``journal verify``'s report once the history before the file is accounted for.

    A file that does not start at genesis (a segment) proves nothing about seq 1..S-1 on its own:
    whoever holds the device's keys at T can start a file with a forged segment record. It fails
    (ARCHIVE_REQUIRED) unless ``archives`` are given; then the whole chain must verify.
    """
    import dataclasses

    from guard.ops.compact import verify_chain

    if not rep.ok or (rep.first_seq <= 1 and not archives):
        return rep
    if not archives:
        return dataclasses.replace(rep, ok=False, first_bad_seq=rep.first_seq, reason="ARCHIVE_REQUIRED", detail=(
            f"{path.name} starts at seq {rep.first_seq} (a segment), not at genesis: entries 1..{rep.first_seq - 1} "
            "are not verified; give the archive(s) covering them (--archive ARCHIVE, or `posguard journal "
            "verify-chain ARCHIVE... JOURNAL`)"))
    chain = verify_chain([*archives, path], k0=k0, public_keys=pubs)
    if chain.ok:
        return dataclasses.replace(rep, detail=rep.detail + f"; chain from seq 1 with {len(archives)} archive(s) ok")
    return dataclasses.replace(rep, ok=False, first_bad_seq=None, reason="CHAIN_INVALID", detail="; ".join(
        chain.problems or [f"{f.path.name}: {f.report.reason}: {f.report.detail}" for f in chain.files
                           if not f.report.ok]))
