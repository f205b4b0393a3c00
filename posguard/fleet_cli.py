"""``posguard fleet ...``: thin CLI twins of ``guard.fleet`` (docs/FLEET.md). Exit status: 0 all
good, 1 something was found (a rejected upload, an entry that no longer verifies, a discrepancy),
2 bad input or the database cannot be used."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from guard.core.errors import PosguardError
from posguard.cli_helpers import die, progress

DSN = click.option("--dsn", envvar="POSGUARD_FLEET_DSN", required=True,
                   help="PostgreSQL connection string (libpq), or $POSGUARD_FLEET_DSN.")
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _db_errors() -> tuple[type[BaseException], ...]:
    import psycopg

    return (psycopg.Error, PosguardError)


@click.group("fleet")
def fleet() -> None:
    """Many terminals' journals on PostgreSQL: ingest (witness), verify, reconcile, report.

    Exit status: 0 all good; 1 something was found (a rejected upload, an entry that no longer
    verifies, a discrepancy); 2 bad input or the database cannot be used.
    """


@fleet.command("init")
@DSN
@click.option("--hash-parts", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Hash partitions per business day (fixed at creation).")
def init_cmd(dsn: str, hash_parts: int) -> None:
    """Create or migrate the fleet schema (idempotent).

    Exit status: 0 the schema is current; 2 the database cannot be used.
    """
    from guard.fleet.schema import SCHEMA_VERSION, init

    try:
        found = init(dsn, hash_parts=hash_parts)
    except _db_errors() as e:
        die(2, e)
    click.echo(f"fleet schema version {SCHEMA_VERSION} (found {found})")


@fleet.command("enroll")
@DSN
@click.argument("terminal")
@click.argument("keys_dir", metavar="KEYDIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
def enroll_cmd(dsn: str, terminal: str, keys_dir: Path) -> None:
    """Register TERMINAL's escrowed k0 and public key chain from KEYDIR (keys export-verifier output).

    Exit status: 0 enrolled; 2 bad key files or the database cannot be used.
    """
    from guard.fleet.ingest import enroll

    try:
        enroll(dsn, terminal, keys_dir)
    except _db_errors() as e:
        die(2, e)
    click.echo(f"enrolled {terminal}")


@fleet.command("ingest")
@DSN
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (each takes a disjoint set of terminals).")
@JSON
def ingest_cmd(dsn: str, paths: tuple[Path, ...], jobs: int, as_json: bool) -> None:
    """Verify and store journal files and archives (FILES or DIRS); rejects rollbacks, forks, gaps.

    Exit status: 0 every file accepted (or already held); 1 an upload was rejected (terminal, seq
    and reason printed and kept in the database); 2 bad input or the database cannot be used.
    """
    from guard.fleet.ingest import ingest

    try:
        with progress("ingest") as update:
            results = ingest(dsn, paths, progress=update, jobs=jobs)
    except _db_errors() as e:
        die(2, e)
    if as_json:
        click.echo(json.dumps([vars(r) for r in results], indent=1))
    else:
        for r in results:
            if r.status != "unchanged":
                click.echo(r.line())
        n = {s: sum(r.status == s for r in results) for s in ("added", "unchanged", "rejected")}
        click.echo(f"{len(results)} files: {n['added']} added ({sum(r.added for r in results)} entries), "
                   f"{n['unchanged']} unchanged, {n['rejected']} rejected")
    sys.exit(1 if any(r.status == "rejected" for r in results) else 0)


@fleet.command("verify")
@DSN
@click.option("--terminal", "terminals", multiple=True, help="Only these terminals (default: all).")
@JSON
def verify_cmd(dsn: str, terminals: tuple[str, ...], as_json: bool) -> None:
    """Re-check the entries stored since the last run (chain, MACs, signatures), per terminal.

    Exit status: 0 everything verifies; 1 a stored entry no longer verifies; 2 the database cannot
    be used.
    """
    from guard.fleet.verify import verify

    try:
        with progress("verify") as update:
            done = [0]

            def tick(_: object) -> None:
                done[0] += 1
                update(done[0], len(terminals))

            results = verify(dsn, list(terminals) or None, progress=tick)
    except _db_errors() as e:
        die(2, e)
    if as_json:
        click.echo(json.dumps([vars(r) for r in results], indent=1))
    else:
        for r in results:
            if not r.ok:
                click.echo(f"FAILED {r.terminal} seq {r.seq}: {r.reason}")
        click.echo(f"{len(results)} terminals, {sum(r.checked for r in results)} new entries checked, "
                   f"{sum(not r.ok for r in results)} failed")
    sys.exit(0 if all(r.ok for r in results) else 1)


@fleet.command("reconcile")
@DSN
@click.argument("settlement", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@JSON
def reconcile_cmd(dsn: str, settlement: tuple[Path, ...], as_json: bool) -> None:
    """Every terminal's sales against SETTLEMENT files (categories of posguard reconcile), in SQL.

    Exit status: 0 no discrepancy; 1 discrepancies listed; 2 a bad settlement file or the database
    cannot be used.
    """
    from guard.fleet.reconcile import reconcile

    try:
        rep = reconcile(dsn, settlement)
    except _db_errors() as e:
        die(2, e)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=1))
    else:
        for d in rep.discrepancies:
            click.echo(f"{d['terminal']} {d['date']} stan {d['stan']}: {d['category']} -> {d['action']} "
                       f"(terminal {d['terminal_state'] or '-'} {d['terminal_amount']}, host {d['host_amount']} "
                       f"x{d['host_net_debits']})")
        click.echo(f"run {rep.run}: {rep.rows_used} rows, {rep.sales_compared} sales compared, "
                   f"{rep.rows_unknown_terminal} rows of unknown terminals; " +
                   ", ".join(f"{k} {v}" for k, v in rep.counts().items()))
    sys.exit(1 if rep.discrepancies else 0)


@fleet.command("report")
@DSN
@JSON
def report_cmd(dsn: str, as_json: bool) -> None:
    """Per terminal: last seen, accepted/verified up to, pending reversals, NEEDS_MANUAL, discrepancies.

    Exit status: 0 printed; 2 the database cannot be used.
    """
    from guard.fleet.report import report

    try:
        rows = report(dsn)
    except _db_errors() as e:
        die(2, e)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo("terminal  last_seen  accepted  verified  witness  pending_rev  needs_manual  discrepancies  rejected")
    for r in rows:
        click.echo(f"{r['terminal']}  {r['last_seen'] or '-'}  {r['accepted_upto']}  {r['verified_upto']}  "
                   f"{r['witness_seq']}  {r['pending_reversals']}  {r['needs_manual']}  {r['discrepancies']}  "
                   f"{r['rejections']}" + (f"  VERIFY: {r['verify_problem']}" if r["verify_problem"] else ""))


@fleet.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen_cmd(path: Path) -> None:
    """Create the fleet's Ed25519 receipt-signing key at PATH (0600); prints its public key.

    Exit status: 0 created; 2 the file cannot be created.
    """
    from guard.fleet.report import generate_fleet_key

    try:
        click.echo(generate_fleet_key(path))
    except OSError as e:
        die(2, f"cannot create {path}: {e.strerror}")


@fleet.command("receipt")
@DSN
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("terminal")
def receipt_cmd(dsn: str, key_path: Path, terminal: str) -> None:
    """The fleet's countersigned receipt of TERMINAL's newest accepted checkpoint (JSON).

    Exit status: 0 printed; 2 bad key file, unknown terminal or the database cannot be used.
    """
    from guard.fleet.report import load_fleet_key, receipt

    try:
        click.echo(json.dumps(receipt(dsn, terminal, load_fleet_key(key_path), now=time.time()), indent=1))
    except _db_errors() as e:
        die(2, e)


@fleet.command("serve")
@DSN
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8443, show_default=True)
@click.option("--cert", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Server certificate (PEM).")
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Server private key (PEM).")
@click.option("--ca", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA that issues the terminals' client certificates (CN = terminal id).")
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), default=Path("fleet-spool"),
              show_default=True, help="Where uploads wait while they are ingested.")
@click.option("--receipt-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The fleet's receipt key (fleet keygen): enables GET /v1/receipt.")
def serve_cmd(dsn: str, host: str, port: int, cert: Path, key_path: Path, ca: Path, spool: Path,
              receipt_key: Path | None) -> None:
    """HTTPS upload endpoint with per-terminal mTLS: PUT /v1/journal, GET /v1/receipt (docs/FLEET.md).

    Exit status: 0 stopped cleanly (Ctrl-C, SIGTERM); 2 bad certificates or keys, the port cannot be
    bound, or the database cannot be used.
    """
    from guard.fleet.serve import serve

    try:
        serve(dsn, host=host, port=port, cert=cert, key=key_path, ca=ca, spool=spool, receipt_key=receipt_key)
    except (OSError, ImportError) as e:
        die(2, e)


def register(main: click.Group) -> None:
    main.add_command(fleet)
