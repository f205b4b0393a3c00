"""Operator and auditor commands: replay, reconcile, keys rotate/export-verifier (thin click wrappers
around guard.ops.replay, guard.ops.reconcile and guard.ops.rotation), and ``register``, which adds
them and the journal commands (posguard.journal_cli) to the groups of ``posguard.cli``."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import click

from guard.core.errors import PosguardError
from posguard.cli_helpers import CONFIG_HELP, PATH_DIR, PATH_FILE, die, die_for, exit_for, interrupted, load_cfg, progress, wide_console
from posguard.journal_cli import journal_anchor, journal_compact, journal_export, journal_show, journal_verify_chain


def register(main: click.Group, journal: click.Group, keys: click.Group) -> None:
    """Add the operator commands to the ``posguard``, ``posguard journal`` and ``posguard keys`` groups."""
    main.add_command(replay)
    main.add_command(reconcile)
    for cmd in (journal_anchor, journal_show, journal_export, journal_compact, journal_verify_chain):
        journal.add_command(cmd)
    keys.add_command(keys_rotate)
    keys.add_command(keys_export_verifier)


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
    from guard.ops.rotation import rotate_keys

    try:
        res = rotate_keys(directory, journal_path, now=time.time())
    except PosguardError as e:
        die_for(e)
    except KeyboardInterrupt:
        interrupted("run the same command again to finish the rotation")
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
        die(2, e)
    except OSError as e:
        die(2, f"cannot write to {outdir}: {e.strerror}")
    for p in written:
        click.echo(str(p))
    if not any(p.name == K0_FILE for p in written):
        click.echo(f"note: {directory / K0_FILE} is gone from the terminal; the auditor needs it from escrow", err=True)
        sys.exit(1)


# --- replay ----------------------------------------------------------------------------------


def _open_replay(cfg: Any, window: int, backoff_base: float, backoff_max: float) -> Any:
    """Like posguard.run.build, minus the reader port: keys, uplink, EngineConfig(saf_window=window)."""
    from guard.journal.keys import load_keys
    from guard.ops.replay import open_replay

    from posguard import config_signing
    from posguard.config import engine_config, make_uplink

    if cfg.source is not None:  # replay talks to the host the config names: the same signature check as run
        config_signing.check(cfg.source, Path(cfg["journal.keys"]), cfg.raw, config_signing.named_files(cfg))
    keys = load_keys(Path(cfg["journal.keys"]))
    uplink = make_uplink(cfg)
    ecfg = engine_config(cfg, backoff_base_s=backoff_base, backoff_max_s=backoff_max, saf_window=window)
    return open_replay(Path(cfg["journal.path"]), keys, ecfg, uplink, rng=random.Random())


@click.command("replay")
@click.option("--config", "config_path", type=PATH_FILE, default=None, help="Host, journal and keys: " + CONFIG_HELP)
@click.option("--window", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Reversals in flight at once (matched by STAN).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              help="Give up after this many seconds; what is left stays queued.")
@click.option("--backoff-base", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Seconds before the first repeat (0401) of an unanswered reversal; doubles per failure.")
@click.option("--backoff-max", type=click.FloatRange(min=0.01), default=60.0, show_default=True,
              help="Longest wait between repeats.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (no progress bar).")
def replay(config_path: Path | None, window: int, timeout: float, backoff_base: float, backoff_max: float,
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
    declined); 2 bad config, keys or journal; 3 journal in use (JOURNAL_BUSY), items still
    pending at --timeout (the host and the connection error are named) or interrupted (Ctrl-C,
    SIGTERM); 4 journal failure while running (run again: nothing is lost).
    """
    from guard.ops.replay import EXIT_JOURNAL, EXIT_PENDING, EXIT_USAGE

    started = time.monotonic()
    cfg = load_cfg(config_path)
    try:
        svc = _open_replay(cfg, window, backoff_base, backoff_max)
    except PosguardError as e:
        die(EXIT_PENDING if exit_for(e) == 3 else EXIT_USAGE, e)
    except KeyboardInterrupt:
        interrupted("nothing was sent; run replay again")
    stop = {"flag": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["flag"] = True

    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    from guard.ops.replay import run_replay

    try:
        with progress("reversing", as_json) as update:
            rep = run_replay(svc, timeout=timeout, progress=update, stop=lambda: stop["flag"], started=started)
    except (PosguardError, sqlite3.Error, OSError) as e:  # fail-stop: the journal holds what was done
        with contextlib.suppress(Exception):
            svc.close()
        die(EXIT_JOURNAL, e)
    svc.close()
    if as_json:
        click.echo(json.dumps(rep.to_json(), sort_keys=True))
    else:
        _print_replay(rep)
    sys.exit(rep.exit_code)


def _print_replay(rep: Any) -> None:
    from rich.table import Table

    from posguard.tables import money

    console = wide_console()
    t = Table(title=f"replay: {rep.started_pending} pending at start, {rep.elapsed:.1f} s"
                    + (f" ({rep.rate:.0f} items/s)" if rep.rate else ""))
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
            d.add_row(it.txn, f"{it.stan:06d}", money(it.amount, it.currency), it.masked_pan, str(it.attempts), it.reason)
        console.print(d)
    if rep.sent:
        console.print("sent: " + ", ".join(f"{k} x{v}" for k, v in sorted(rep.sent.items())))
    if rep.interrupted:
        console.print(f"interrupted: {len(rep.pending)} item(s) still pending stay queued; run replay again")
    if rep.pending and not rep.connected:
        console.print(f"could not connect to the host {rep.host}"
                      + (f" ({rep.connect_error})" if rep.connect_error else "") + ": check host.address, host.port "
                      "and the network; what is pending stays queued")
    if rep.checkpoint_rc == "00" and rep.checkpoint:
        console.print(f"checkpoint covering entry {rep.checkpoint['covers_seq']} deposited with the host")
    else:
        console.print(f"no checkpoint deposited: {rep.checkpoint_note}"
                      + (f" ({rep.connect_error} at {rep.host})" if "not reachable" in rep.checkpoint_note
                         and rep.connect_error else ""))


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
      amount    minor units                              type       SALE, REFUND or REVERSAL
      response  field 39 the host answered
    A spreadsheet's save is read too: UTF-8 BOM, ';' or tab delimiters, STANs/dates/codes
    without leading zeros, lower-case types.
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
    from guard.ops.reconcile import BOOKED_CODES
    from guard.ops.reconcile import reconcile as compare
    from posguard.config import host_profile

    for d in dates:
        if not (len(d) == 4 and d.isdigit()):
            die(2, f"--date {d!r} is not MMDD")
    if do_apply and config_path is None:
        die(2, "--apply needs --config guard.toml (the device keys)")
    try:
        rows = read_settlement(settlement)
        with progress("reading journal", as_json) as update:
            view = load_view(journal_path, progress=update)
            given = {str(p.resolve()) for p in archive_paths}
            recorded = set(recorded_archives(journal_path))
            readable = sorted(given | {p for p in recorded if Path(p).is_file()})
            archives = []
            for a in readable:
                update(0, 0, f"reading {Path(a).name}")
                archives.append((a, load_view(Path(a), progress=update)))
    except PosguardError as e:
        die(2, e)
    missing = sorted(p for p in recorded if p not in readable and Path(p).name not in {Path(g).name for g in given})
    booked = BOOKED_CODES
    if config_path is not None:  # this host's profile says which codes book a debit
        profile = host_profile(load_cfg(config_path))
        booked = profile["rc_approved"] | profile["rc_partial"]
    rep = compare(view, rows, dates=dates, archives=archives, missing_archives=missing, booked_codes=booked)
    if do_apply and rep.discrepancies:
        from guard.journal.store import Journal
        from guard.journal.keys import load_keys

        cfg = load_cfg(config_path)
        try:
            keys = load_keys(Path(cfg["journal.keys"]))
        except PosguardError as e:
            die(2, e)
        try:
            j = Journal.open_exclusive(journal_path, keys, terminal_id=view.meta.get("terminal_id", ""))
            try:
                rep.applied = apply(j, rep.discrepancies, now=time.time())
            finally:
                j.close()
        except PosguardError as e:  # one commit: nothing or everything applied
            die_for(e)
        except (sqlite3.Error, OSError) as e:
            die(3, e)
    if as_json:
        click.echo(json.dumps(rep.to_json(), sort_keys=True))
    else:
        _print_reconcile(rep, do_apply)
    sys.exit(1 if rep.discrepancies else 0)


def _print_reconcile(rep: Any, applied: bool) -> None:
    from posguard.tables import print_discrepancies

    console = wide_console()
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
    print_discrepancies(console, rep.discrepancies)
    if applied:
        console.print(f"{rep.applied} reversal(s) queued in the journal: run posguard replay")
