"""The `posguard` command line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from guard.core.errors import PosguardError


def _bad_input(e: PosguardError) -> NoReturn:
    """Exit 2 (bad input) with the error's code and message (JSON too with --json);
    click.ClickException would exit 1, which these commands reserve for "found a problem"."""
    from posguard.cli_helpers import die

    die(2, e)


class _JsonUsageGroup(click.Group):
    """A usage error (unknown option, bad value) of a command run with ``--json`` is also printed
    as JSON on stdout, like every other failure of such a command; Ctrl-C anywhere exits 3 (could
    not complete) with one line, not click's "Aborted!" and exit 1 ("found a problem")."""

    def invoke(self, ctx: click.Context) -> object:
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if "--json" not in args:
                raise
            e.show()
            _json_failure(2, e.format_message())
        except KeyboardInterrupt:
            click.echo("posguard: interrupted (Ctrl-C) before the command finished; run it again", err=True)
            if "--json" in args:
                _json_failure(3, "interrupted (Ctrl-C) before the command finished; run it again")
            sys.exit(3)


def _json_failure(code: int, message: str) -> NoReturn:
    click.echo(json.dumps({"error": "POSGUARD_ERROR", "message": message, "exit_code": code}, sort_keys=True))
    sys.exit(code)


@click.group(cls=_JsonUsageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="posguard")
def main() -> None:
    """posguard: a terminal-side transaction guard for card-payment terminals.

    Every reader request is journaled before anything goes to the host; timeouts are reversed
    from a persisted queue, so retries, crashes and power loss never produce a second debit.

    Exit status, for every command (each --help says what it means there): 0 all good; 1 the
    command worked and found a problem; 2 bad input, nothing changed; 3+ could not complete
    (journal in use, write failed, host unreachable, interrupted): run it again.
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
@click.option("--max-steps", type=click.IntRange(min=0), default=0,
              help="Events one seed may process (0: sized from --sales, 200,000 + 400 per sale). A seed that "
                   "reaches it is reported as 'STEP LIMIT REACHED', not judged.")
def sim(seed: int | None, seeds: int, sales: int, no_dup_detection: bool, operator_rate: float, acquirer: bool,
        trace: bool, keep_dir: Path | None, max_steps: int) -> None:
    """Deterministic fault simulation: crashes, host faults, reader re-sends; checks invariants.

    A progress bar (sales submitted in the current seed, seeds done) is shown on a terminal,
    never when the output is piped. A seed's cost grows faster than --sales: each simulated
    crash (about one per ten sales) restores the journal from its start. Measured on the
    project's 2-core VM: 1,500 sales 6 s, 11,000 sales 3.2 CPU minutes.

    Exit status: 0 every seed held its invariants; 1 a seed failed (its violations, a command
    reproducing it and its trace are printed); 2 bad arguments; 3 a seed reached its step limit
    (not judged) and none failed, or interrupted (Ctrl-C).
    """
    from posguard.cli_helpers import interrupted, progress

    if sales < 0 or seeds < 0:
        raise click.UsageError("--sales and --seeds must be >= 0")
    todo = [seed] if seed is not None else list(range(1, seeds + 1))
    failed = limited = 0
    try:
        with progress("simulating") as update:
            for n, s in enumerate(todo):
                rep = _sim_seed(s, n, len(todo), sales, no_dup_detection, operator_rate, acquirer, trace, keep_dir,
                                max_steps, update, seed is not None)
                failed += not rep.ok and not rep.step_limit_reached
                limited += rep.step_limit_reached
    except KeyboardInterrupt:
        interrupted("simulation stopped")
    click.echo(f"{len(todo) - failed - limited} passed, {failed} failed"
               + (f", {limited} stopped at the step limit (not judged)" if limited else ""))
    sys.exit(1 if failed else 3 if limited else 0)


def _sim_seed(s: int, n: int, seeds: int, sales: int, no_dup_detection: bool, operator_rate: float, acquirer: bool,
              trace: bool, keep_dir: Path | None, max_steps: int, update: Any, one: bool) -> Any:
    """One seed of `posguard sim`: run, print its summary (and violations, reproduction, trace)."""
    from guard.simulation.deterministic import SimConfig, run_seed

    wd = None if keep_dir is None else (keep_dir if one else keep_dir / f"seed-{s}")
    if wd is not None:
        if (wd / "journal.db").exists():
            raise click.UsageError(f"{wd} already holds a journal")
        wd.mkdir(parents=True, exist_ok=True)
    rep = run_seed(SimConfig(seed=s, sales=sales, dup_detection=not no_dup_detection, operator_rate=operator_rate,
                             acquirer=acquirer, max_steps=max_steps), workdir=wd, keep_trace=trace,
                   progress=lambda done, total: update(done, total, f"seed {s} ({n + 1}/{seeds}): sales"))
    click.echo(rep.summary())
    if not rep.ok and not rep.step_limit_reached:
        for v in rep.violations:
            click.echo(f"  VIOLATION {v}")
        click.echo(f"  reproduce: posguard sim --seed {s} --sales {sales}"
                   + (" --no-dup-detection" if no_dup_detection else "")
                   + (f" --operator-rate {operator_rate}" if operator_rate else "")
                   + (" --acquirer" if acquirer else "") + " --trace")
    if trace or not rep.ok:
        for line in rep.trace:
            click.echo(f"    {line}")
    return rep


@main.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="guard.toml; default: $POSGUARD_CONFIG, else /etc/posguard/guard.toml "
                   "(`posguard config-example` prints one).")
@click.option("--max-seconds", type=float, default=None, help="Stop after this long (tests, smoke runs).")
def run_cmd(config_path: Path | None, max_seconds: float | None) -> None:
    """Run the guard daemon: reader port <-> engine <-> host, reversals drained in the background.

    Logs JSON lines to stderr. SIGTERM/SIGINT stop it cleanly (with a final signed checkpoint);
    SIGHUP is ignored (no reload: restart to apply a changed config). A missing or failing reader
    port is retried, not fatal. Exit status: 0 on a clean stop, 2 on a bad config or key files (the
    message names the key), 3 on a journal failure (JOURNAL_BUSY: another daemon or an operator
    command holds it), 4 on an internal error. After 3 or 4, restart: recovery reverses anything
    left in flight.
    """
    from posguard.config import discover
    from posguard.run import run

    try:
        path = discover(config_path)
    except PosguardError as e:
        _bad_input(e)
    sys.exit(run(path, max_seconds=max_seconds))


@main.command("config-example")
def config_example() -> None:
    """Print a guard.toml with every key, its default and its meaning.

    Exit status: 0 printed.
    """
    from posguard.config import documented_example

    click.echo(documented_example(), nl=False)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Run every benchmark and print one table of medians and ratios (they ship with posguard:
    posguard.bench). `posguard bench --quick` for a short run, `--only startup` for one.

    Exit status: 0 every benchmark ran; 2 bad arguments; 3 a benchmark failed, or interrupted
    (Ctrl-C).
    """
    from posguard.bench.__main__ import main as bench_main
    from posguard.cli_helpers import interrupted

    if {"-h", "--help"} & set(ctx.args):
        click.echo(ctx.get_help())
        click.echo("\nOptions of python -m posguard.bench: --quick (smaller runs), --only NAMES (comma-separated), "
                   "--out DIR (each benchmark's full output).")
        sys.exit(0)
    try:
        sys.exit(bench_main(list(ctx.args)))
    except KeyboardInterrupt:
        interrupted("benchmarks stopped")


@main.group("config")
def config_group() -> None:
    """Signed configuration (terminal/merchant ids and host cannot change silently).

    Exit status: see each command (0 done, 2 bad input).
    """


@config_group.command("init-signer")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def config_init_signer(directory: Path) -> None:
    """Create a config-signing key pair; put config.pub in each terminal's key directory and keep
    config-signer.key off the terminals.

    Exit status: 0 created; 2 the directory already holds a key or cannot be written.
    """
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
    keyfile, spec) into CONFIG_FILE.sig.

    Exit status: 0 signed; 2 bad config, key or named file, or the signature cannot be written.
    """
    from posguard.config_signing import sign

    try:
        out = sign(config_file, key_file)
    except PosguardError as e:
        _bad_input(e)
    click.echo(f"wrote {out}")


@main.command("nullmodem")
@click.option("--seconds", type=click.FloatRange(0.1, 7 * 86400), default=3600.0, show_default=True,
              help="Close the cable after this long (Ctrl-C or SIGTERM close it earlier).")
def nullmodem(seconds: float) -> None:
    """A virtual null-modem cable: two pty devices joined back to back, to run a reader against
    `posguard run` with no hardware.

    \b
    Prints two lines, then keeps the cable up:
      guard /dev/pts/N     put this in guard.toml: [reader] url = "/dev/pts/N"
      reader /dev/pts/M    open this from your reader (or: posguard readersim --port /dev/pts/M)
    Both ends are real ttys (raw mode; the baud rate is ignored). Bytes written to one end
    arrive at the other until Ctrl-C, SIGTERM or --seconds.

    Exit status: 0 the cable was closed (Ctrl-C, SIGTERM or time up); 3 the ptys cannot be created.
    """
    import signal
    import threading

    from firmware_bridge.nullmodem import NullModem
    from posguard.cli_helpers import die

    try:
        cable = NullModem()
    except OSError as e:
        die(3, f"cannot create the pty pair: {e.strerror}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with cable:
        click.echo(f"guard {cable.a}")
        click.echo(f"reader {cable.b}")
        click.echo(f"null modem up for at most {seconds:g} s; Ctrl-C closes it", err=True)
        sys.stdout.flush()
        try:
            stop.wait(seconds)
        except KeyboardInterrupt:
            pass
    click.echo(f"null modem closed ({cable.bytes_relayed} bytes relayed)", err=True)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def readersim(ctx: click.Context) -> None:
    """Reference card reader (firmware side) with link fault injection (`posguard readersim --help`)."""
    from guard.simulation.readercli import main as reader_main

    sys.exit(reader_main(ctx.args))


@main.group()
def keys() -> None:
    """Device keys: signing key, MAC ratchet seed k0, vault key, card-token key.

    Exit status: see each command (0 done, 2 bad input, 3 journal in use).
    """


@keys.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def keys_init(directory: Path) -> None:
    """Create the device keys in DIRECTORY (files 0600). Move k0.escrow off the device to the auditor.

    Exit status: 0 created; 2 keys already exist there or the directory cannot be written.
    """
    from guard.journal.keys import init_keys

    try:
        init_keys(directory)
    except PosguardError as e:
        _bad_input(e)
    click.echo(f"keys created in {directory}; give k0.escrow and verify.pub to your auditor, then remove k0.escrow "
               "from the terminal once the journal exists (it is only needed to create it).")


@main.group()
def journal() -> None:
    """Inspect and verify a journal.

    Exit status: see each command (0 all good, 1 a check failed, 2 bad input, 3 journal in use).
    """


@journal.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--k0", "k0_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Escrowed initial MAC key (checks every entry's MAC).")
@click.option("--pubkey", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Terminal's Ed25519 public key(s): verify.pub, or verify.pubs (every key `keys rotate` "
                   "recorded, one per line; any key of the chain will do). Checks checkpoint signatures.")
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
    2 bad input: a key file or the anchor file cannot be read, or PATH is not a SQLite file
    (not a journal at all).
    """
    from rich.progress import Progress

    from guard.journal.keys import load_k0, load_public_keys
    from guard.journal.verify import verify_journal
    from posguard.cli_helpers import not_a_journal

    try:
        k0 = load_k0(k0_file) if k0_file else None
        pubs = load_public_keys(pubkey) if pubkey else []
    except PosguardError as e:
        _bad_input(e)
    problem = not_a_journal(path)
    if problem:
        _bad_input(PosguardError(problem, code="JOURNAL_NOT_INITIALISED"))
    try:
        anc = json.loads(anchor.read_text(encoding="utf-8")) if anchor else None
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        _bad_input(PosguardError(f"--anchor {anchor} is not a JSON checkpoint (`posguard journal anchor` writes "
                                 "one)", code="ANCHOR_UNREADABLE"))
    from rich.console import Console

    with Progress(transient=True, disable=as_json, console=Console(stderr=True)) as progress:
        task = progress.add_task("verifying", total=None)
        rep = verify_journal(path, k0=k0, public_keys=pubs, anchor=anc,
                             progress=lambda done, total: progress.update(task, completed=done, total=total))
    from posguard.journal_cli import whole_history

    rep = whole_history(path, rep, archives, k0, pubs)
    if as_json:
        click.echo(json.dumps(rep.__dict__, default=str))
    elif rep.ok:
        click.echo(f"OK: {rep.entries} entries, {rep.checkpoints} checkpoints verified"
                   + ("" if k0 else " (MACs not checked: no --k0)") + ("" if pubs else " (signatures not checked: no --pubkey)"))
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
    from posguard.fleet_cli import register as register_fleet

    register_fleet(main)


_register_operator_commands()

if __name__ == "__main__":
    main()
