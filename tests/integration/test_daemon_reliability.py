"""Issue 15, reliability of the daemon: real ``posguard run`` processes, ptys, SQLite files.

One writer per journal (a second daemon exits 3 JOURNAL_BUSY and changes nothing), a reader port
that disappears or is missing at start (the daemon keeps running and reopens it), what the log
says (structured lines, SIGHUP, one line per start error), the final checkpoint on a clean stop,
and journals on read-only media.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge import messages as M
from firmware_bridge.nullmodem import NullModem
from firmware_bridge.serial_port import open_port
from guard.core.model import TxnState
from guard.journal.keys import DeviceKeys
from guard.ops.export import latest_checkpoint, open_readonly
from guard.simulation.hostserver import HostServer
from guard.simulation.hostsim import HostCore
from guard.simulation.readersim import ReaderSim
from tests.support import ROOT, cli, free_port, subprocess_env, write_guard_toml

TID, MID = "RELTERM1", "RELMERCHANT0001"
PAN = "4761739001010119"
WAIT_S = 30.0


def config(tmp: Path, reader_url: str, host_port: int, **extra: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "terminal": {"terminal_id": TID, "merchant_id": MID},
        "reader": {"url": reader_url, "reader_id": "R1"},
        "host": {"address": "127.0.0.1", "port": host_port, "timeout": 2.0, "reversal_timeout": 1.0},
        "journal": {"path": str(tmp / "journal.db"), "keys": str(tmp / "keys")},
        "policy": {"double_swipe_window": 0, "card_max_count": 0, "card_max_amount": 0, "terminal_max_count": 0},
    }
    for section, body in extra.items():
        cfg.setdefault(section, {}).update(body)
    return cfg


class Daemon:
    """``posguard run`` as a child process; its stderr lines collected by a thread."""

    def __init__(self, config_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "posguard.cli", "run", "--config", str(config_path), *args],
                                     stderr=subprocess.PIPE, text=True, env=env or subprocess_env(), cwd=ROOT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line[line.index("{"):]))
            except ValueError:
                pass
        return out

    def wait_event(self, name: str, timeout: float = WAIT_S) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for ev in self.events():
                if ev.get("event") == name:
                    return ev
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}: {self.text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no {name} event within {timeout} s: {self.text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(timeout=5)
        return rc

    def exit_code(self, timeout: float = 60.0) -> int:
        """Wait for the process to end on its own."""
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=10)


def journal_tail(path: Path) -> tuple[int, bytes]:
    """(last seq, hash of the last entry), read-only."""
    conn = open_readonly(path)
    try:
        seq, h = conn.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return int(seq), bytes(h)
    finally:
        conn.close()


def kinds(path: Path) -> list[str]:
    conn = open_readonly(path)
    try:
        return [k for (k,) in conn.execute("SELECT kind FROM entries ORDER BY seq")]
    finally:
        conn.close()


# --- 1: one daemon per journal; 6: the final checkpoint on a clean stop -------------------------------


def test_second_daemon_on_one_journal_exits_3_busy_and_changes_nothing(
        tmp_path: Path, keys: DeviceKeys, host_server: Callable[..., tuple[HostServer, int]],
        daemons: list[Daemon]) -> None:
    _, port = host_server(HostCore(seed=3, dup_detection=True))
    cfg = write_guard_toml(tmp_path / "guard.toml", config(tmp_path, "loop://", port))
    first = Daemon(cfg)
    daemons.append(first)
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end and not (
            (tmp_path / "journal.db").exists() and "config_loaded" in kinds(tmp_path / "journal.db")):
        assert first.proc.poll() is None, first.text()
        time.sleep(0.05)
    time.sleep(0.5)  # the first daemon is in its loop (host connected, idle)
    before = journal_tail(tmp_path / "journal.db")
    size = os.path.getsize(tmp_path / "journal.db")

    second = Daemon(cfg, "--max-seconds", "3")
    daemons.append(second)
    assert second.exit_code() == 3, second.text()
    errors = [ev for ev in second.events() if ev.get("level") == "ERROR"]
    assert len(errors) == 1 and errors[0]["code"] == "JOURNAL_BUSY", second.text()
    assert "Traceback" not in second.text()
    assert journal_tail(tmp_path / "journal.db") == before, "the second daemon wrote to the journal"
    assert os.path.getsize(tmp_path / "journal.db") == size
    assert first.proc.poll() is None, "the first daemon must keep running"

    assert first.stop() == 0, first.text()
    stopped = first.events()[-1]
    assert stopped["event"] == "stopped" and isinstance(stopped["counters"], dict), "counters are JSON fields"
    # 6: the clean stop signed a checkpoint over everything it wrote; the anchor covers it all
    last_seq, _ = journal_tail(tmp_path / "journal.db")
    assert kinds(tmp_path / "journal.db")[-1] == "checkpoint"
    assert latest_checkpoint(tmp_path / "journal.db")["covers_seq"] == last_seq - 1
    code, out, err = cli("journal", "anchor", tmp_path / "journal.db")
    assert code == 0 and json.loads(out)["covers_seq"] == last_seq - 1 and "warning" not in err


def test_anchor_that_covers_nothing_is_printed_with_a_warning(journal: Path) -> None:
    code, out, err = cli("journal", "anchor", journal)
    assert code == 0 and json.loads(out)["covers_seq"] == 0
    assert "covers nothing" in err


# --- 2: a reader port that disappears, or is not there yet ------------------------------------------


def _sale(cable: NullModem, seed: int) -> Any:
    r = ReaderSim(open_port(cable.b), reader_id="R1", rng=random.Random(seed), boot_counter=seed)
    try:
        r.sync(timeout=WAIT_S)
        return r.auth(r.new_txn_id(), 1000 + seed, "978", PAN, "2912", timeout=WAIT_S)
    finally:
        r.close()


def test_reader_port_missing_at_start_then_lost_is_reopened_and_the_daemon_keeps_running(
        tmp_path: Path, keys: DeviceKeys, host_server: Callable[..., tuple[HostServer, int]],
        daemons: list[Daemon]) -> None:
    core = HostCore(seed=5, dup_detection=True)
    _, port = host_server(core)
    link = tmp_path / "reader-port"  # the device path the config names (a symlink, as a udev rule makes)
    cfg = write_guard_toml(tmp_path / "guard.toml", config(tmp_path, str(link), port))
    d = Daemon(cfg)
    daemons.append(d)
    missing = d.wait_event("reader_port_unavailable")
    assert missing["code"] == "READER_PORT_UNAVAILABLE" and missing["level"] == "ERROR"
    d.wait_event("host_connected")  # the loop runs without the reader: reversals and deposits go on

    cable = NullModem()
    try:
        link.symlink_to(cable.a)
        res = _sale(cable, 1)
        assert isinstance(res, M.ResultMessage) and res.state is TxnState.APPROVED
        d.wait_event("reader_port_open")
        os.unlink(link)
        link.symlink_to(tmp_path / "nowhere")  # the adapter is unplugged: its device node is gone
    finally:
        cable.close()
    lost = d.wait_event("reader_port_lost")
    assert lost["code"] == "READER_PORT_UNAVAILABLE"
    assert d.proc.poll() is None, "the daemon must survive its reader port"

    cable2 = NullModem()
    try:
        os.unlink(link)
        link.symlink_to(cable2.a)  # plugged in again
        res = _sale(cable2, 2)
        assert isinstance(res, M.ResultMessage) and res.state is TxnState.APPROVED
    finally:
        cable2.close()
    assert d.stop() == 0, d.text()
    assert "Traceback" not in d.text() and PAN not in d.text()
    assert core.total_net_debits() == 2
    assert sum(1 for ev in d.events() if ev.get("event") == "reader_port_open") >= 2


def test_readersim_reports_a_vanished_port_without_a_traceback(tmp_path: Path) -> None:
    cable = NullModem()
    proc = subprocess.Popen([sys.executable, "-m", "posguard.cli", "readersim", "--port", cable.b, "--sales", "1",
                             "--timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=ROOT)
    try:
        time.sleep(1.0)  # readersim is waiting for a SYNC_ACK nobody sends
        cable.close()  # the cable goes away under it
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "readersim: port" in err and "failed" in err, err


# --- 3: what the log says -------------------------------------------------------------------------------


def test_sighup_is_ignored_and_logged_start_errors_are_one_line(
        tmp_path: Path, keys: DeviceKeys, daemons: list[Daemon]) -> None:
    port = free_port()  # nothing listens: the host is unreachable
    cfg = write_guard_toml(tmp_path / "guard.toml", config(tmp_path, "loop://", port))
    d = Daemon(cfg)
    daemons.append(d)
    down = d.wait_event("host_unreachable")
    assert down["reason"] == "CONNECT_REFUSED" and down["level"] == "WARNING" and down["host"].endswith(f":{port}")
    assert down["utc"].endswith("Z") and "T" in down["utc"] and isinstance(down["ts"], float)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_event("sighup_ignored")
    assert d.proc.poll() is None, "SIGHUP must not stop the daemon"
    assert d.stop() == 0, d.text()

    bad = write_guard_toml(tmp_path / "bad.toml", config(tmp_path, "loop://", port, journal={
        "path": str(tmp_path / "no-such-dir" / "journal.db")}))
    d2 = Daemon(bad)
    daemons.append(d2)
    assert d2.exit_code() == 2, "a journal path in a directory that does not exist is a config error"
    assert len(d2.lines) == 1 and "JOURNAL_CREATE_FAILED" in d2.lines[0], d2.text()


def test_journald_priority_prefix_only_when_stderr_is_the_journal(tmp_path: Path, keys: DeviceKeys) -> None:
    cfg = write_guard_toml(tmp_path / "guard.toml", config(tmp_path, "loop://", free_port()))
    log = tmp_path / "stderr.log"
    for journald in (True, False):
        with open(log, "w") as f:
            st = os.fstat(f.fileno())
            stream = f"{st.st_dev}:{st.st_ino}" if journald else f"{st.st_dev}:{st.st_ino + 1}"
            subprocess.run([sys.executable, "-m", "posguard.cli", "run", "--config", str(cfg), "--max-seconds", "0.5"],
                           stderr=f, env=subprocess_env(JOURNAL_STREAM=stream), cwd=ROOT, timeout=60, check=True)
        lines = log.read_text().splitlines()
        assert lines
        if journald:
            assert all(line.startswith(("<3>{", "<4>{", "<6>{")) for line in lines), lines
            assert any(line.startswith("<4>") and '"host_unreachable"' in line for line in lines)
        else:
            assert all(line.startswith("{") for line in lines), lines


# --- 5: read-only media ------------------------------------------------------------------------------------


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind /tmp /tmp && mount -o remount,ro,bind /tmp"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def _on_read_only_mount(directory: Path, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run each command in a private mount namespace where ``directory`` is a read-only bind mount
    (as an auditor's read-only medium); returns their results."""
    out = []
    for cmd in commands:
        script = ('mount --bind "$D" "$D" && mount -o remount,ro,bind "$D" && exec "$@"')
        out.append(subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd], capture_output=True, text=True,
                                  timeout=120, env=subprocess_env(D=str(directory)), cwd=ROOT))
    return out


@pytest.mark.skipif(not _can_mount_read_only(), reason="needs unshare -m and mount (root in a mount namespace); "
                    "root ignores chmod, so a read-only directory cannot stand in for read-only media")
def test_journal_on_read_only_media_verifies_and_reads_normally(tmp_path: Path, keys: DeviceKeys, journal: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(journal, media / "journal.db")
    cfg = write_guard_toml(tmp_path / "guard.toml", config(media, "loop://", free_port(), journal={
        "path": str(media / "new.db"), "keys": str(tmp_path / "keys")}))
    py = [sys.executable, "-m", "posguard.cli"]
    j = str(media / "journal.db")
    verify, show, export, anchor, run = _on_read_only_mount(
        media,
        [*py, "journal", "verify", j, "--k0", str(tmp_path / "keys" / "k0.escrow"),
         "--pubkey", str(tmp_path / "keys" / "verify.pub")],
        [*py, "journal", "show", j],
        [*py, "journal", "export", j, "--format", "csv"],
        [*py, "journal", "anchor", j],
        [*py, "run", "--config", str(cfg), "--max-seconds", "0.5"])
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
    for r in (show, export, anchor):
        assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(anchor.stdout)["terminal"] == "TERM0001"
    assert run.returncode == 3 and "JOURNAL_CREATE_FAILED" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (media / "journal.db-shm").exists() and not (media / "new.db").exists()


def test_dns_failure_is_logged_once_as_host_unreachable_with_its_reason(tmp_path: Path, keys: DeviceKeys) -> None:
    import logging

    from posguard.config import parse
    from posguard.run import JsonFormatter, build

    lines: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter().format(record)))

    cfg = config(tmp_path, "loop://", 1, host={"address": "posguard-test.invalid"})
    svc, bridge = build(parse(cfg))
    cap = Capture()
    logger = logging.getLogger("posguard.service")
    logger.addHandler(cap)
    logger.setLevel(logging.INFO)
    svc.reconnect_s = 0.05
    try:
        end = time.monotonic() + WAIT_S
        while time.monotonic() < end and sum(1 for x in lines if x.get("event") == "host_unreachable") < 1:
            svc.step(0.01)
        for _ in range(40):  # more failed attempts for the same reason: no more lines within a minute
            svc.step(0.01)
    finally:
        logger.removeHandler(cap)
        svc.close()
    down = [x for x in lines if x.get("event") == "host_unreachable"]
    assert len(down) == 1 and down[0]["reason"] == "DNS_FAILED", lines
    assert down[0]["host"] == "posguard-test.invalid:1" and down[0]["level"] == "WARNING"
