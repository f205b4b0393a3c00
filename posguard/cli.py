"""The `posguard` command line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import NoReturn

import click

from guard.core.errors import PosguardError


def _bad_input(e: PosguardError) -> NoReturn:
    """Exit 2 (bad input) with the error's code and message; click.ClickException would exit 1,
    which these commands reserve for "found a problem"."""
    click.echo(f"posguard: {e}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="posguard")
def main() -> None:
    """posguard: a terminal-side transaction guard for card-payment terminals.

    Every reader request is journaled before anything goes to the host; timeouts are reversed
    from a persisted queue, so retries, crashes and power loss never produce a second debit.
    """


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("posguard-demo"),
              show_default=True, help="Where the journal, keys and host ledger are left for inspection.")
@click.option("--seed", type=int, default=7, show_default=True, help="Seed for the host simulator.")
@click.option("--host-timeout", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              help="Seconds to wait for the host (0.1-60).")
def demo(directory: Path, seed: int, host_timeout: float) -> None:
    """The whole path with faults: reference reader -> pty null-modem -> `posguard run` -> host simulator.

    Eighteen transactions (sales, a refund, an offline sale), each meeting one host, serial-line,
    reader or guard fault; prints what the reader was told and what the host's ledger holds.
    Exit status 0 only if every APPROVED sale has exactly one net debit at the host, every other
    sale has none, and the journal verifies; 1 if not; 2 if --dir is not a demo directory.
    Loopback and ptys only, no hardware.
    """
    from guard.simulation.demo import run_demo

    if math.isnan(host_timeout):  # NaN passes FloatRange
        raise click.BadParameter("must be a number of seconds", param_hint="--host-timeout")
    sys.exit(run_demo(directory, seed=seed, host_timeout=host_timeout))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def hostsim(ctx: click.Context) -> None:
    """Stateful acquirer simulator on 127.0.0.1 with seeded faults (`posguard hostsim --help`)."""
    from guard.simulation.hostcli import main as host_main

    sys.exit(host_main(ctx.args))


@main.command()
@click.option("--seed", type=int, default=None, help="Run (and trace) one seed.")
@click.option("--seeds", type=int, default=100, show_default=True, help="Run seeds 1..N.")
@click.option("--sales", type=int, default=12, show_default=True, help="Sales per seed.")
@click.option("--no-dup-detection", is_flag=True, help="Host without duplicate detection.")
@click.option("--operator-rate", type=float, default=0.0, show_default=True,
              help="Fraction of sales the reader later VOIDs or REFUNDs.")
@click.option("--acquirer", is_flag=True,
              help="The host answers like real acquirers (08/10/11/16, wait and unknown codes it may have booked, "
                   "wrong MTIs, silent or refusing reversal answers); the simulated operator accepts or cancels partials.")
@click.option("--trace", is_flag=True, help="Print the event trace (always printed for a failing seed).")
@click.option("--keep-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Leave each seed's journal and keys in DIR/seed-S (DIR itself with --seed); "
                   "the directory must not hold a journal yet. A seed's journal is byte-identical run after run.")
def sim(seed: int | None, seeds: int, sales: int, no_dup_detection: bool, operator_rate: float, acquirer: bool,
        trace: bool, keep_dir: Path | None) -> None:
    """Deterministic fault simulation: crashes, host faults, reader re-sends; checks invariants."""
    from guard.simulation.deterministic import SimConfig, run_seed

    todo = [seed] if seed is not None else list(range(1, seeds + 1))
    failed = 0
    for s in todo:
        wd = None if keep_dir is None else (keep_dir if seed is not None else keep_dir / f"seed-{s}")
        if wd is not None:
            if (wd / "journal.db").exists():
                raise click.UsageError(f"{wd} already holds a journal")
            wd.mkdir(parents=True, exist_ok=True)
        rep = run_seed(SimConfig(seed=s, sales=sales, dup_detection=not no_dup_detection, operator_rate=operator_rate,
                                 acquirer=acquirer), workdir=wd, keep_trace=trace)
        click.echo(rep.summary())
        if not rep.ok:
            failed += 1
            for v in rep.violations:
                click.echo(f"  VIOLATION {v}")
            click.echo(f"  reproduce: posguard sim --seed {s} --sales {sales}"
                       + (" --no-dup-detection" if no_dup_detection else "")
                       + (f" --operator-rate {operator_rate}" if operator_rate else "")
                       + (" --acquirer" if acquirer else "") + " --trace")
        if trace or not rep.ok:
            for line in rep.trace:
                click.echo(f"    {line}")
    click.echo(f"{len(todo) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


@main.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="guard.toml (see `posguard config-example`).")
@click.option("--max-seconds", type=float, default=None, help="Stop after this long (tests, smoke runs).")
def run_cmd(config_path: Path, max_seconds: float | None) -> None:
    """Run the guard daemon: reader port <-> engine <-> host, reversals drained in the background.

    Logs JSON lines to stderr. SIGTERM/SIGINT stop it cleanly. Exit 0 on a clean stop, 2 on a bad
    config or key files (the message names the key), 3 on a journal failure, 4 on an internal
    error. After 3 or 4, restart: recovery reverses anything left in flight.
    """
    from posguard.run import run

    sys.exit(run(config_path, max_seconds=max_seconds))


@main.command("config-example")
def config_example() -> None:
    """Print a guard.toml with every key, its default and its meaning."""
    from posguard.config import documented_example

    click.echo(documented_example(), nl=False)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Run every benchmark and print one table of medians and ratios (they ship with posguard:
    posguard.bench). `posguard bench --quick` for a short run, `--only startup` for one."""
    from posguard.bench.__main__ import main as bench_main

    sys.exit(bench_main(list(ctx.args)))


@main.group("config")
def config_group() -> None:
    """Signed configuration (terminal/merchant ids and host cannot change silently)."""


@config_group.command("init-signer")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def config_init_signer(directory: Path) -> None:
    """Create a config-signing key pair; put config.pub in each terminal's key directory and keep
    config-signer.key off the terminals."""
    from posguard.config_signing import init_signer

    try:
        pub = init_signer(directory)
    except PosguardError as e:
        _bad_input(e)
    click.echo(f"created {directory / 'config-signer.key'} (keep it off the terminal) and {pub}")


@config_group.command("sign")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="config-signer.key")
def config_sign(config_file: Path, key_file: Path) -> None:
    """Sign CONFIG_FILE's exact bytes and the digests of the files it names (host.cafile, certfile,
    keyfile, spec) into CONFIG_FILE.sig."""
    from posguard.config_signing import sign

    try:
        out = sign(config_file, key_file)
    except PosguardError as e:
        _bad_input(e)
    click.echo(f"wrote {out}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def readersim(ctx: click.Context) -> None:
    """Reference card reader (firmware side) with link fault injection (`posguard readersim --help`)."""
    from guard.simulation.readercli import main as reader_main

    sys.exit(reader_main(ctx.args))


@main.group()
def keys() -> None:
    """Device keys: signing key, MAC ratchet seed k0, vault key, card-token key."""


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def keys_init(directory: Path) -> None:
    """Create the device keys in DIRECTORY (files 0600). Move k0.escrow off the device to the auditor."""
    from guard.journal.keys import init_keys

    try:
        init_keys(directory)
    except PosguardError as e:
        _bad_input(e)
    click.echo(f"keys created in {directory}; give k0.escrow and verify.pub to your auditor, then remove k0.escrow "
               "from the terminal once the journal exists (it is only needed to create it).")


@main.group()
def journal() -> None:
    """Inspect and verify a journal."""


@journal.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--k0", "k0_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Escrowed initial MAC key (checks every entry's MAC).")
@click.option("--pubkey", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Terminal's Ed25519 public key (checks checkpoint signatures).")
@click.option("--anchor", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A checkpoint JSON held elsewhere (detects truncation and rollback).")
@click.option("--archive", "archives", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Archive(s) holding the entries before a segment file (required for one).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def journal_verify(path: Path, k0_file: Path | None, pubkey: Path | None, anchor: Path | None,
                   archives: tuple[Path, ...], as_json: bool) -> None:
    """Verify the chain, MACs, checkpoints and an anchor.

    A file that starts with a segment record (after compaction) fails unless the archives before
    it are given (--archive): on its own it says nothing about the history it claims to continue.

    Exit status: 0 all holds; 1 verification failed (the first bad entry and why are printed);
    2 bad input: a key file or the anchor file cannot be read.
    """
    from rich.progress import Progress

    from guard.journal.keys import load_k0, load_public_key
    from guard.journal.verify import verify_journal

    try:
        k0 = load_k0(k0_file) if k0_file else None
        pub = load_public_key(pubkey) if pubkey else None
    except PosguardError as e:
        _bad_input(e)
    try:
        anc = json.loads(anchor.read_text(encoding="utf-8")) if anchor else None
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        _bad_input(PosguardError(f"--anchor {anchor} is not a JSON checkpoint (`posguard journal anchor` writes "
                                 "one)", code="ANCHOR_UNREADABLE"))
    from rich.console import Console

    with Progress(transient=True, disable=as_json, console=Console(stderr=True)) as progress:
        task = progress.add_task("verifying", total=None)
        rep = verify_journal(path, k0=k0, public_key=pub, anchor=anc,
                             progress=lambda done, total: progress.update(task, completed=done, total=total))
    from posguard.journal_cli import whole_history

    rep = whole_history(path, rep, archives, k0, [pub] if pub else [])
    if as_json:
        click.echo(json.dumps(rep.__dict__, default=str))
    elif rep.ok:
        click.echo(f"OK: {rep.entries} entries, {rep.checkpoints} checkpoints verified"
                   + ("" if k0 else " (MACs not checked: no --k0)") + ("" if pub else " (signatures not checked: no --pubkey)"))
    else:
        click.echo(f"FAILED at entry {rep.first_bad_seq}: {rep.reason}: {rep.detail}" if rep.first_bad_seq
                   else f"FAILED: {rep.reason}: {rep.detail}")
    sys.exit(0 if rep.ok else 1)


def _register_operator_commands() -> None:
    """Operator and auditor commands (replay, reconcile, export, keys rotation, compaction)."""
    try:
        from posguard.ops_cli import register
    except ImportError:
        return
    register(main, journal, keys)


_register_operator_commands()

if __name__ == "__main__":
    main()
