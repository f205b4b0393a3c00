"""The command line as a new user meets it (issue 15, "Tools and docs"): a null-modem command,
exit codes that follow the documented rule in every command and its --help, JSON failures with
--json, and a verifier key file from `keys rotate` accepted."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from tests.support import cli, free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return subprocess_env()


def _two_lines(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> list[str]:
    """The first two stdout lines (written with one flush), waiting at most ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output from the command"
    return [proc.stdout.readline().decode(), proc.stdout.readline().decode()]


def test_nullmodem_prints_both_ends_relays_both_ways_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "posguard.cli", "nullmodem", "--seconds", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        guard_line, reader_line = (ln.split() for ln in _two_lines(proc))
        assert guard_line[0] == "guard" and reader_line[0] == "reader"
        a = os.open(guard_line[1], os.O_RDWR | os.O_NOCTTY)
        b = os.open(reader_line[1], os.O_RDWR | os.O_NOCTTY)
        try:
            for src, dst, data in ((a, b, b"\x10\x02from guard"), (b, a, b"\x10\x02from reader")):
                os.write(src, data)
                got = b""
                end = time.monotonic() + 10
                while len(got) < len(data) and time.monotonic() < end:
                    if select.select([dst], [], [], 0.5)[0]:
                        got += os.read(dst, 100)
                assert got == data
        finally:
            os.close(a)
            os.close(b)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert b"closed" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_nullmodem_lifetime_is_bounded() -> None:
    r = subprocess.run([sys.executable, "-m", "posguard.cli", "nullmodem", "--seconds", "0.3"], capture_output=True,
                       env=_env(), timeout=30)
    assert r.returncode == 0 and r.stdout.decode().splitlines()[0].startswith("guard /dev/")


def _commands(cmd: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            out += _commands(sub, [*path, name])
    return out


def test_every_help_lists_its_exit_codes() -> None:
    from posguard.cli import main

    missing = []
    for path, _ in _commands(main, []):
        code, out, _ = cli(*path, "--help")
        if code != 0 or "exit status" not in out.lower():
            missing.append(" ".join(["posguard", *path]))
    assert not missing, f"--help without an 'Exit status' section: {missing}"


@pytest.fixture()
def small_journal(tmp_path: Path) -> tuple[Path, Path]:
    from guard.simulation.hostsim import HostCore
    from tests.support.ops_support import Gen

    g = Gen(tmp_path, HostCore(seed=3, dup_detection=True))
    g.host_up()
    g.sales(5)
    g.close()
    return g.path, tmp_path / "keys"


def test_verify_accepts_the_verify_pubs_file_that_keys_rotate_maintains(small_journal: tuple[Path, Path]) -> None:
    path, keys = small_journal
    assert cli("keys", "rotate", keys, "--journal", path)[0] == 0
    assert (keys / "verify.pubs").read_text().count("\n") >= 2
    code, out, err = cli("journal", "verify", path, "--k0", keys / "k0.escrow", "--pubkey", keys / "verify.pubs")
    assert code == 0 and out.startswith("OK") and "signatures not checked" not in out, out + err


def test_verify_of_a_file_that_is_no_journal_is_bad_input_and_json_failures_are_json(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("not a journal\n")
    code, out, err = cli("journal", "verify", other)
    assert code == 2 and "JOURNAL_NOT_INITIALISED" in err and out == ""
    code, out, _ = cli("journal", "verify", other, "--json")
    assert code == 2 and json.loads(out) == {"error": "JOURNAL_NOT_INITIALISED", "exit_code": 2,
                                             "message": f"{other} is not a posguard journal (not a SQLite database)"}
    code, out, _ = cli("replay", "--config", other, "--json")
    assert code == 2 and json.loads(out)["error"] == "CONFIG_INVALID"
    code, out, err = cli("journal", "verify", other, "--json", "--no-such-option")
    assert code == 2 and "--no-such-option" in json.loads(out)["message"] and "Usage:" in err
    from guard.journal.keys import init_keys

    init_keys(tmp_path / "keys")
    for args in (("journal", "show", other), ("journal", "anchor", other), ("journal", "verify-chain", other),
                 ("journal", "compact", other, "--older-than", "1", "--archive", tmp_path / "a", "--keys",
                  tmp_path / "keys")):
        code, out, err = cli(*args, "--json") if args[1] in ("verify-chain", "compact") else cli(*args)
        assert code == 2 and "JOURNAL_CORRUPT" in err, (args, code, err)


def test_a_journal_in_use_is_could_not_complete_exit_3_everywhere(small_journal: tuple[Path, Path], tmp_path: Path) -> None:
    from guard.journal.keys import load_keys
    from guard.journal.store import Journal
    from tests.support.ops_support import TID, guard_toml

    path, keys = small_journal
    cfg = guard_toml(tmp_path / "guard.toml", journal=path, keys=keys, port=9)
    with Journal.open_exclusive(path, load_keys(keys), terminal_id=TID):
        for args in (("replay", "--config", cfg, "--timeout", "1"), ("keys", "rotate", keys, "--journal", path),
                     ("journal", "compact", path, "--older-than", "0", "--archive", tmp_path / "a", "--keys", keys)):
            code, out, err = cli(*args, "--json")
            assert code == 3 and "JOURNAL_BUSY" in err, (args, code, err)
            assert json.loads(out)["error"] == "JOURNAL_BUSY"


def test_show_and_reconcile_are_readable_at_80_columns_with_money_amounts(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 17: at 80 columns the tables cut every column to 4 characters and showed
    amounts as `2000 978`. Now: no line over 80, whole state and category names, `20.00 EUR`."""
    import re

    from rich.console import Console

    import posguard.journal_cli
    import posguard.ops_cli
    from guard.simulation.hostsim import HostCore
    from tests.support.ops_support import mixed_journal

    core = HostCore(seed=5, dup_detection=True)
    g = mixed_journal(tmp_path / "t", core, approved=8, lost_debited=2, lost_unprocessed=1, needs_manual=2, no_host=1)
    core.write_settlement_csv(tmp_path / "s.csv")
    for mod in (posguard.journal_cli, posguard.ops_cli):
        monkeypatch.setattr(mod, "wide_console", lambda: Console(width=80, color_system=None))
    outputs = []
    for args in (("journal", "show", g.path), ("journal", "show", g.path, "--per", "entry"),
                 ("reconcile", g.path, tmp_path / "s.csv")):
        code, out, _ = cli(*args)
        assert code in (0, 1), out
        outputs.append(out)
        assert max(len(ln) for ln in out.splitlines()) <= 80, out
    show, _, rec = outputs
    assert "NEEDS_MANUAL" in show and "REVERSAL_PENDING" in show and re.search(r"\b\d+\.\d\d EUR\b", show), show
    assert " 978" not in show
    assert "FAILED_BUT_DEBITED -> QUEUE_REVERSAL" in rec and re.search(r"terminal NEEDS_MANUAL \d+\.\d\d EUR", rec), rec


def test_export_csv_zero_pads_stans_and_fills_state_per_entry(small_journal: tuple[Path, Path]) -> None:
    import csv as csvmod
    import io

    path, _ = small_journal
    code, out, _ = cli("journal", "export", path, "--format", "csv")
    rows = list(csvmod.DictReader(io.StringIO(out)))
    assert code == 0 and rows and all(len(r["stan"]) == 6 and r["stan"].isdigit() for r in rows)
    code, out, _ = cli("journal", "export", path, "--format", "csv", "--per", "entry")
    rows = [r for r in csvmod.DictReader(io.StringIO(out)) if r["txn"]]
    assert code == 0 and rows and all(r["state"] == "APPROVED" for r in rows), rows[:3]


def test_replay_names_the_unreachable_host_and_the_missing_checkpoint(tmp_path: Path) -> None:
    """Issue 15 item 19: with the host down, replay said nothing about why; now it names the host
    and the connection error, says no checkpoint was deposited, and reports the real elapsed time."""
    from guard.simulation.hostsim import HostCore
    from tests.support.ops_support import guard_toml, mixed_journal

    core = HostCore(seed=6, dup_detection=True)
    g = mixed_journal(tmp_path, core, approved=3, lost_debited=2, lost_unprocessed=0, no_host=0)
    port = free_port()  # nobody listens on it
    cfg = guard_toml(tmp_path / "guard.toml", journal=g.path, keys=tmp_path / "keys", port=port)
    code, out, _ = cli("replay", "--config", cfg, "--timeout", "1.5")
    assert code == 3, out
    assert f"could not connect to the host 127.0.0.1:{port} (CONNECT_REFUSED)" in " ".join(out.split()), out
    assert "no checkpoint deposited: items are still pending" in " ".join(out.split()), out
    code, out, _ = cli("replay", "--config", cfg, "--timeout", "1.5", "--json")
    rep = json.loads(out)
    assert code == 3 and rep["connect_error"] == "CONNECT_REFUSED" and rep["connected"] is False
    assert rep["checkpoint_deposited"] is None and rep["checkpoint_note"]
    assert rep["elapsed"] >= rep["seconds"] >= 1.5  # the whole run: opening, draining, giving up
    proc = subprocess.Popen([sys.executable, "-m", "posguard.cli", "replay", "--config", str(cfg), "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        time.sleep(2.0)  # let it start draining (a Ctrl-C during start-up is reported the same way)
        proc.send_signal(signal.SIGINT)
        out_b, err_b = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3 and b"interrupted" in out_b + err_b and b"Traceback" not in err_b, (out_b, err_b)


def test_config_discovery_env_then_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 23: `run` and `replay` find their config without --config: $POSGUARD_CONFIG,
    then /etc/posguard/guard.toml; with neither, the message says all three ways."""
    from posguard import config as C
    from posguard.config import discover

    assert discover(Path("given.toml"), {"POSGUARD_CONFIG": "env.toml"}) == Path("given.toml")
    assert discover(None, {"POSGUARD_CONFIG": "env.toml"}) == Path("env.toml")
    monkeypatch.setattr(C, "DEFAULT_CONFIG", tmp_path / "etc" / "guard.toml")
    monkeypatch.delenv("POSGUARD_CONFIG", raising=False)
    for cmd in (("run", "--max-seconds", "0.1"), ("replay", "--timeout", "0.2")):
        code, _, err = cli(*cmd)
        assert code == 2 and "POSGUARD_CONFIG" in err and "--config" in err, (cmd, err)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "guard.toml").write_text("[terminal]\nterminal_id = 'SHORT'\n")
    code, _, err = cli("replay", "--timeout", "0.2")
    assert code == 2 and "terminal_id" in err  # the default file was read
    monkeypatch.setenv("POSGUARD_CONFIG", str(tmp_path / "other.toml"))
    code, _, err = cli("replay", "--timeout", "0.2")
    assert code == 2 and "other.toml" in err


def test_ctrl_c_in_compact_and_rotate_exits_3_without_a_traceback(small_journal: tuple[Path, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import guard.ops.compact
    import guard.ops.rotation

    def ctrl_c(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(guard.ops.compact, "compact", ctrl_c)
    monkeypatch.setattr(guard.ops.rotation, "rotate_keys", ctrl_c)
    path, keys = small_journal
    code, out, err = cli("journal", "compact", path, "--older-than", "1", "--archive", tmp_path / "a", "--keys", keys,
                         "--json")
    assert code == 3 and "interrupted" in err and json.loads(out)["exit_code"] == 3
    code, _, err = cli("keys", "rotate", keys, "--journal", path)
    assert code == 3 and "interrupted" in err and "run the same command again" in err


def test_bench_exit_3_when_a_benchmark_fails_or_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import posguard.bench.__main__ as bench

    monkeypatch.setattr(bench, "BENCHES", [("no_such_bench", [], [], [])])  # python -m fails: exit 1
    assert bench.main(["--out", str(tmp_path)]) == 3
    code, out, _ = cli("bench", "--help")
    assert code == 0 and "Exit status" in out and "--only" in out


def test_ctrl_c_in_any_command_exits_3_not_clicks_aborted_1(small_journal: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import guard.journal.verify

    def ctrl_c(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(guard.journal.verify, "verify_journal", ctrl_c)
    path, _ = small_journal
    code, out, err = cli("journal", "verify", path, "--json")
    assert code == 3 and "interrupted" in err and "Aborted" not in err and json.loads(out)["exit_code"] == 3
