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

from tests.support import cli

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


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
