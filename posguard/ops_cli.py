"""Operator and auditor commands: replay, reconcile, journal show/export/anchor/compact/verify-chain,
keys rotate/export-verifier. Thin click wrappers around guard.ops.replay, guard.ops.reconcile,
guard.ops.export, guard.ops.compact and guard.ops.rotation; registered by ``posguard.cli``."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from guard.core.errors import PosguardError

PATH_FILE = click.Path(dir_okay=False, path_type=Path)
PATH_DIR = click.Path(file_okay=False, path_type=Path)


def register(main: click.Group, journal: click.Group, keys: click.Group) -> None:
    """Add the operator commands to the ``posguard``, ``posguard journal`` and ``posguard keys`` groups."""
    main.add_command(replay)
    main.add_command(reconcile)
    for cmd in (journal_anchor, journal_show, journal_export, journal_compact, journal_verify_chain):
        journal.add_command(cmd)
    keys.add_command(keys_rotate)
    keys.add_command(keys_export_verifier)


# --- helpers ---------------------------------------------------------------------------------


def _die(code: int, err: BaseException | str) -> NoReturn:
    click.echo(f"posguard: {err}", err=True)
    sys.exit(code)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def _progress(label: str, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (only on a terminal); yields ``update(done, total[, label])``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _stderr_console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=quiet or not console.is_terminal) as p:
        task = p.add_task(label, total=None)

        def update(done: int, total: int, what: str | None = None) -> None:
            if what:
                p.update(task, description=what)
            p.update(task, completed=done, total=total or None)

        yield update


def _load_cfg(config_path: Path) -> Any:
    from posguard.config import load

    try:
        return load(config_path)
    except PosguardError as e:
        _die(2, e)


def _atomic_text_out(out: Path | None) -> Any:
    """stdout, or a temp file renamed over ``out`` on success (0600: exports name card tokens)."""
    if out is None:
        return contextlib.nullcontext(sys.stdout)

    @contextlib.contextmanager
    def cm() -> Iterator[Any]:
        tmp = out.with_name(out.name + f".tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    return cm()


# --- journal anchor / show / export ----------------------------------------------------------


@click.command("anchor")
@click.argument("journal_path", metavar="JOURNAL", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def journal_anchor(journal_path: Path) -> None:
    """Print the newest signed checkpoint of JOURNAL as JSON (an anchor).

    Keep it away from the terminal; later `posguard journal verify JOURNAL --anchor anchor.json
    --pubkey verify.pub` proves the journal still holds, unchanged, everything up to it
    (detects truncation and rollback). Needs no keys; the daemon may keep running.

    Exit status: 0 printed; 2 the file is not a readable journal.
    """
    from guard.ops.export import latest_checkpoint

    try:
        cp = latest_checkpoint(journal_path)
    except PosguardError as e:
        _die(2, e)
    click.echo(json.dumps(cp, sort_keys=True))


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
        view = None
        if per == "txn" or st:
            with _progress("reading journal", quiet) as update:
                view = load_view(journal_path, progress=update)
    except PosguardError as e:
        _die(2, e)
    if per == "txn":
        assert view is not None
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

    Exit status: 0 shown; 2 bad filter or unreadable journal.
    """
    from collections import deque

    from rich.table import Table

    from guard.ops.export import iso

    rows = _rows(journal_path, per, since, states, quiet=False)
    total = 0
    tail: deque[dict[str, Any]] = deque(maxlen=limit or None)
    try:
        for r in rows:
            total += 1
            tail.append(r)
    except PosguardError as e:
        _die(2, e)
    if per == "txn":
        table = Table(title=f"{journal_path.name}: {len(tail)} of {total} transactions")
        for col in ("created", "txn", "state", "stan", "amount", "masked_pan", "rc", "approval", "rrn", "reason",
                    "entries"):
            table.add_column(col, justify="right" if col in ("stan", "amount", "entries") else "left")
        for r in tail:
            table.add_row(r["created"], r["txn"], r["state"], f"{r['stan']:06d}", f"{r['amount']} {r['currency']}",
                          r["masked_pan"], r["rc"], r["approval"], r["rrn"], r["reason"], str(r["entries"]))
    else:
        table = Table(title=f"{journal_path.name}: {len(tail)} of {total} entries")
        for col in ("seq", "time", "kind", "txn", "state", "payload"):
            table.add_column(col)
        for r in tail:
            p = json.dumps(r["payload"], sort_keys=True)
            table.add_row(str(r["seq"]), iso(r["ts"]), r["kind"], r["txn"] or "", r["state"],
                          p if len(p) <= 80 else p[:77] + "...")
    _wide_console().print(table)


def _wide_console() -> Any:
    """stdout console; piped output gets a wide fixed width instead of 80 columns."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=220)


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

    Exit status: 0 exported; 2 bad filter, unreadable journal or unwritable --out; 141 when the
    reading end of a pipe closed early (`| head`).
    """
    from guard.ops.export import ENTRY_COLUMNS, TXN_COLUMNS, write_csv, write_jsonl

    rows = _rows(journal_path, per, since, states, quiet=out is None)
    try:
        with _atomic_text_out(out) as f:
            n = write_jsonl(rows, f) if fmt == "jsonl" else write_csv(rows, TXN_COLUMNS if per == "txn" else ENTRY_COLUMNS, f)
    except BrokenPipeError:  # `... | head`: the reader left; end quietly, as `cat` would (128 + SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except OSError as e:
        _die(2, f"cannot write {out}: {e.strerror}")
    except PosguardError as e:
        _die(2, e)
    if out is not None:
        click.echo(f"{n} rows written to {out}", err=True)


# --- compaction and chain verification --------------------------------------------------------


def _keys_dir(keys_dir: Path | None, config_path: Path | None) -> Path:
    if keys_dir is not None:
        return keys_dir
    if config_path is not None:
        return Path(_load_cfg(config_path)["journal.keys"])
    _die(2, "give --keys DIR or --config guard.toml (the device keys sign the seal and the segment record)")


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

    Exit status: 0 compacted (or nothing old enough); 2 bad arguments or key files; 3 journal
    in use, unreadable or the write failed (nothing changed unless the result was printed).
    """
    from guard.ops.compact import compact
    from guard.core.errors import JournalError
    from guard.journal.keys import load_keys

    kd = _keys_dir(keys_dir, config_path)
    try:
        keys = load_keys(kd)
    except PosguardError as e:
        _die(2, e)
    if older_than < 1:
        click.echo("warning: transactions younger than a day feed idempotency (reader re-sends) and the counter "
                   "rules; archived ones are forgotten by the guard", err=True)
    try:
        with _progress("compacting", as_json) as update:
            res = compact(journal_path, keys, archive_dir, older_than_days=older_than, now=time.time(),
                          vacuum=not no_vacuum, archive_needs_manual=archive_needs_manual,
                          progress=lambda what, d, t: update(d, t, what))
    except JournalError as e:
        _die(3, e)
    except PosguardError as e:
        _die(2, e)
    except (OSError, sqlite3.Error) as e:
        _die(3, f"compaction failed: {e}")
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
        with _progress("verifying", as_json) as update:
            rep = verify_chain(paths, k0=k0, public_keys=pubs, progress=lambda what, d, t: update(d, t, what))
    except PosguardError as e:
        _die(2, e)
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


# --- keys ------------------------------------------------------------------------------------


@click.command("rotate")
@click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--journal", "journal_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The journal whose checkpoints the key signs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def keys_rotate(directory: Path, journal_path: Path, as_json: bool) -> None:
    """Replace the checkpoint signing key in DIR and record the new public key in the journal.

    \b
    1. a new Ed25519 key is written as DIR/signing.key.next (0600) and verify.pub.next;
    2. one journal commit: a `key_rotation` entry (signed by the old key, with the new key's
       proof of possession), a checkpoint signed by the OLD key covering it, and a checkpoint
       signed by the NEW key. Verifiers follow this chain: older checkpoints still verify with
       the old key, and any key of the chain anchors it;
    3. DIR/verify.pubs (every key, oldest first) gains the new key, then verify.pub and
       signing.key are replaced (atomic renames).
    Interrupted at any point? Run the same command again: it finishes the pending rotation (the
    daemon refuses to start meanwhile with JOURNAL_KEY_MISMATCH, never signs with a stale key).
    The journal is opened exclusively: stop the guard daemon first. Token, vault and k0 keys do
    not change. Give the auditor the new key: `posguard keys export-verifier DIR OUTDIR`.

    Exit status: 0 rotated (or an interrupted rotation finished); 2 bad key files or journal;
    3 journal in use or the commit failed.
    """
    from guard.core.errors import JournalError
    from guard.ops.rotation import rotate_keys

    try:
        res = rotate_keys(directory, journal_path, now=time.time())
    except JournalError as e:
        _die(3 if e.code in ("JOURNAL_BUSY", "JOURNAL_FAILED", "JOURNAL_ERROR", "JOURNAL_WRITE_FAILED") else 2, e)
    except PosguardError as e:
        _die(2, e)
    if as_json:
        click.echo(json.dumps(res.__dict__, sort_keys=True))
    else:
        how = f"rotation recorded at entry {res.rotation_seq}" if res.rotation_seq else "pending rotation finished"
        click.echo(f"signing key rotated: {res.old_pub[:16]}... -> {res.new_pub[:16]}... ({how}); "
                   f"give the auditor the new key (posguard keys export-verifier)")


@click.command("export-verifier")
@click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("outdir", metavar="OUTDIR", type=PATH_DIR)
def keys_export_verifier(directory: Path, outdir: Path) -> None:
    """Write what an auditor needs to verify journals into OUTDIR (created 0700).

    verify.pub (current signing key), verify.pubs (every signing key, oldest first),
    k0.escrow (0600, if still in DIR) and README.txt. Existing files are never overwritten.

    Exit status: 0 written; 1 written but DIR no longer holds k0.escrow (fetch it from escrow);
    2 bad key directory or a file already exists in OUTDIR.
    """
    from guard.journal.keys import K0_FILE, export_verifier

    try:
        written = export_verifier(directory, outdir)
    except PosguardError as e:
        _die(2, e)
    except OSError as e:
        _die(2, f"cannot write to {outdir}: {e.strerror}")
    for p in written:
        click.echo(str(p))
    if not any(p.name == K0_FILE for p in written):
        click.echo(f"note: {directory / K0_FILE} is gone from the terminal; the auditor needs it from escrow", err=True)
        sys.exit(1)


# --- replay ----------------------------------------------------------------------------------


def _open_replay(cfg: Any, window: int, backoff_base: float, backoff_max: float) -> Any:
    """Like posguard.run.build, minus the reader port: keys, uplink, EngineConfig(saf_window=window)."""
    from guard.core.engine import EngineConfig
    from guard.journal.keys import load_keys
    from guard.ops.replay import open_replay

    from posguard.config import host_profile, make_uplink, offline_config, policy_config

    keys = load_keys(Path(cfg["journal.keys"]))
    uplink = make_uplink(cfg)
    ecfg = EngineConfig(
        cfg["terminal.terminal_id"], cfg["terminal.merchant_id"],
        host_timeout_s=float(cfg["host.timeout"]), reversal_timeout_s=float(cfg["host.reversal_timeout"]),
        reversal_max_attempts=cfg["host.reversal_max_attempts"], echo_idle_s=float(cfg["host.echo_idle"]),
        backoff_base_s=backoff_base, backoff_max_s=backoff_max, saf_window=window,
        policy=policy_config(cfg), offline=offline_config(cfg), **host_profile(cfg),
    )
    return open_replay(Path(cfg["journal.path"]), keys, ecfg, uplink, rng=random.Random())


@click.command("replay")
@click.option("--config", "config_path", required=True, type=PATH_FILE, help="guard.toml (host, journal, keys).")
@click.option("--window", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Reversals in flight at once (matched by STAN).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              help="Give up after this many seconds; what is left stays queued.")
@click.option("--backoff-base", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Seconds before the first repeat (0401) of an unanswered reversal; doubles per failure.")
@click.option("--backoff-max", type=click.FloatRange(min=0.01), default=60.0, show_default=True,
              help="Longest wait between repeats.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (no progress bar).")
def replay(config_path: Path, window: int, timeout: float, backoff_base: float, backoff_max: float,
           as_json: bool) -> None:
    """Drain everything pending in the journal against the host, in journal order.

    \b
    Pending: queued reversals (0400, then 0401 repeats with backoff, up to --window in flight),
    intents without an outcome (recovery queues their reversal first), and offline (DEFERRED)
    sales, forwarded as 0220 advices; an unanswered advice is reversed before a fresh one with
    a new STAN is sent. When all is drained, a fresh signed checkpoint is deposited with the
    host (0800, field 70 = 880, field 48) as an anchor held off the terminal.
    Only advices, reversals and network messages ever leave (0200 is refused): running it
    twice, or killing it and running it again, never sends anything as a new charge; a repeated
    reversal is answered idempotently by the host. Items that reach host.reversal_max_attempts
    become NEEDS_MANUAL and are listed with the reason; offline sales the host declines are
    listed as "advice declined" (the merchant must collect). Uses guard.toml like `posguard run`,
    without the reader port; opens the journal exclusively (stop the daemon first).

    Exit status: 0 queue drained; 1 drained, but items need manual action (or an advice was
    declined); 2 bad config, keys or journal (or it is in use); 3 items still pending at
    --timeout (host unreachable?) or interrupted; 4 journal failure while running (run again:
    nothing is lost).
    """
    from guard.ops.replay import EXIT_JOURNAL, EXIT_USAGE

    cfg = _load_cfg(config_path)
    try:
        svc = _open_replay(cfg, window, backoff_base, backoff_max)
    except PosguardError as e:
        _die(EXIT_USAGE, e)
    stop = {"flag": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["flag"] = True

    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    from guard.ops.replay import run_replay

    try:
        with _progress("reversing", as_json) as update:
            rep = run_replay(svc, timeout=timeout, progress=update, stop=lambda: stop["flag"])
    except (PosguardError, sqlite3.Error, OSError) as e:  # fail-stop: the journal holds what was done
        with contextlib.suppress(Exception):
            svc.close()
        _die(EXIT_JOURNAL, e)
    svc.close()
    if as_json:
        click.echo(json.dumps(rep.to_json(), sort_keys=True))
    else:
        _print_replay(rep)
    sys.exit(rep.exit_code)


def _print_replay(rep: Any) -> None:
    from rich.table import Table

    console = _wide_console()
    t = Table(title=f"replay: {rep.started_pending} pending at start, {rep.seconds:.1f} s, {rep.rate:.0f} items/s")
    t.add_column("outcome")
    t.add_column("items", justify="right")
    t.add_row("reversed", str(len(rep.reversed)))
    t.add_row("offline sales forwarded (0220)", str(len(rep.forwarded)))
    t.add_row("offline sales declined by the host", str(len(rep.advice_declined)))
    t.add_row("needs manual", str(len(rep.needs_manual)))
    t.add_row("still pending", str(len(rep.pending)))
    console.print(t)
    for title, items in (("needs manual action", rep.needs_manual), ("offline sales declined: collect payment",
                                                                      rep.advice_declined), ("still pending", rep.pending)):
        if not items:
            continue
        d = Table(title=title + (f" (first 50 of {len(items)})" if len(items) > 50 else ""))
        for col in ("txn", "stan", "amount", "masked_pan", "attempts", "reason"):
            d.add_column(col)
        for it in items[:50]:
            d.add_row(it.txn, f"{it.stan:06d}", str(it.amount), it.masked_pan, str(it.attempts), it.reason)
        console.print(d)
    if rep.sent:
        console.print("sent: " + ", ".join(f"{k} x{v}" for k, v in sorted(rep.sent.items())))
    if rep.checkpoint_rc == "00" and rep.checkpoint:
        console.print(f"checkpoint covering entry {rep.checkpoint['covers_seq']} deposited with the host")
    elif rep.checkpoint is not None:
        console.print(f"the host did not keep the checkpoint (answer {rep.checkpoint_rc or 'none'})")


# --- reconcile -------------------------------------------------------------------------------


@click.command("reconcile")
@click.argument("journal_path", metavar="JOURNAL", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("settlement", metavar="SETTLEMENT.csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--date", "dates", multiple=True, metavar="MMDD",
              help="Compare sales of these dates (default: the dates in the file for this terminal).")
@click.option("--apply", "do_apply", is_flag=True, help="Queue the safe actions (reversals) in the journal.")
@click.option("--config", "config_path", type=PATH_FILE, default=None, help="guard.toml (keys), needed by --apply.")
@click.option("--archive", "archive_paths", multiple=True, type=PATH_FILE,
              help="An archive written by `journal compact` (repeatable); those still where compaction put them "
                   "are read without it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def reconcile(journal_path: Path, settlement: Path, dates: tuple[str, ...], do_apply: bool, config_path: Path | None,
              archive_paths: tuple[Path, ...], as_json: bool) -> None:
    """Compare JOURNAL with the host's settlement report.

    \b
    SETTLEMENT.csv columns (what the host simulator writes; header required, any order, any
    case, extra columns ignored; 41, 42, 11, 37, 39, 4 are accepted for tid, mid, stan, rrn,
    response, amount):
      date      MMDD of the original sale's field 7      tid, mid   fields 41 / 42
      stan      the original sale's STAN (6 digits)      rrn        field 37 or empty
      amount    minor units                              type       SALE or REVERSAL
      response  field 39 the host answered
    SALE rows include declines and 94 duplicates: only 00 is a debit. The first REVERSAL row of
    a sale decides (00: its earliest debit was reversed; later reversal rows change nothing).
    Only this terminal's rows, and journal sales of the dates they cover, are compared; sales
    `journal compact` archived are compared too (an archived sale debited in error is flagged
    for a refund: too old to reverse). If an archive the journal names cannot be read, a debit
    unknown to the journal gets action NONE ("pass --archive"), never a refund.
    \b
    Reported (category: action):
      FAILED_BUT_DEBITED  host debited, terminal shows DECLINED/NEEDS_MANUAL: QUEUE_REVERSAL;
                          REVERSAL_PENDING or no outcome: NONE (replay reverses it);
                          HELD or unknown to the journal: FLAG_REFUND
      REVERSED_BUT_SETTLED  terminal REVERSED, debit settled: FLAG_REFUND
      APPROVED_MISSING_AT_HOST  terminal APPROVED, no debit: NONE (investigate; never re-sent)
      AMOUNT_MISMATCH     amounts differ: FLAG_REFUND if the host took more, else NONE
      DOUBLE_DEBIT        two or more net debits: FLAG_REFUND
    --apply appends, in one commit, a reversal_pending (reason RECONCILE) for each
    QUEUE_REVERSAL item, nothing else; `posguard replay` then sends it. Needs --config for the
    keys; opens the journal exclusively (stop the daemon first).

    Exit status: 0 no discrepancies; 1 discrepancies found (also after --apply); 2 bad input:
    the CSV (the message names line and column) or arguments; nothing applied; 3 --apply could
    not write (journal in use or failed); nothing applied.
    """
    from guard.core.errors import JournalError
    from guard.ops.export import load_view, recorded_archives
    from guard.ops.reconcile import apply, read_settlement
    from guard.ops.reconcile import reconcile as compare

    for d in dates:
        if not (len(d) == 4 and d.isdigit()):
            _die(2, f"--date {d!r} is not MMDD")
    if do_apply and config_path is None:
        _die(2, "--apply needs --config guard.toml (the device keys)")
    try:
        rows = read_settlement(settlement)
        with _progress("reading journal", as_json) as update:
            view = load_view(journal_path, progress=update)
            given = {str(p.resolve()) for p in archive_paths}
            recorded = set(recorded_archives(journal_path))
            readable = sorted(given | {p for p in recorded if Path(p).is_file()})
            archives = []
            for a in readable:
                update(0, 0, f"reading {Path(a).name}")
                archives.append((a, load_view(Path(a), progress=update)))
    except PosguardError as e:
        _die(2, e)
    missing = sorted(p for p in recorded if p not in readable and Path(p).name not in {Path(g).name for g in given})
    rep = compare(view, rows, dates=dates, archives=archives, missing_archives=missing)
    if do_apply and rep.discrepancies:
        from guard.journal.store import Journal
        from guard.journal.keys import load_keys

        cfg = _load_cfg(config_path)  # type: ignore[arg-type]
        try:
            keys = load_keys(Path(cfg["journal.keys"]))
        except PosguardError as e:
            _die(2, e)
        try:
            j = Journal.open_exclusive(journal_path, keys, terminal_id=view.meta.get("terminal_id", ""))
            try:
                rep.applied = apply(j, rep.discrepancies, now=time.time())
            finally:
                j.close()
        except (JournalError, sqlite3.Error, OSError) as e:  # one commit: nothing or everything applied
            _die(3, e)
    if as_json:
        click.echo(json.dumps(rep.to_json(), sort_keys=True))
    else:
        _print_reconcile(rep, do_apply)
    sys.exit(1 if rep.discrepancies else 0)


def _print_reconcile(rep: Any, applied: bool) -> None:
    from rich.table import Table

    console = _wide_console()
    console.print(f"terminal {rep.terminal}, dates {', '.join(rep.dates) or '-'}: {rep.sales_compared} sales compared "
                  f"with {rep.rows_used} settlement rows ({rep.rows_other_terminals} rows of other terminals ignored)")
    if rep.archives:
        console.print(f"archives read: {', '.join(rep.archives)}")
    if rep.missing_archives:
        console.print(f"[bold]archives named by the journal but not readable here[/]: {', '.join(rep.missing_archives)} "
                      "(pass --archive FILE)")
    if not rep.discrepancies:
        console.print("no discrepancies")
        return
    t = Table(title=f"{len(rep.discrepancies)} discrepancies")
    for col in ("category", "action", "date", "stan", "terminal", "term. amount", "host amount", "net", "rrn", "txn",
                "note"):
        t.add_column(col)
    for d in rep.discrepancies:
        t.add_row(d.category, d.action, d.date, d.stan, d.terminal_state or "-",
                  "" if d.terminal_amount is None else str(d.terminal_amount),
                  "" if d.host_amount is None else str(d.host_amount), str(d.host_net_debits), d.rrn, d.txn or "-",
                  d.note)
    console.print(t)
    if applied:
        console.print(f"{rep.applied} reversal(s) queued in the journal: run posguard replay")
