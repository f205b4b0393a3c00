"""Power loss, not just SIGKILL: every write not yet fsynced is lost at the cut.

A SIGKILL loses nothing SQLite handed to the kernel; a power cut loses everything the kernel had not
flushed. ``tests/powerloss_shim.c`` (LD_PRELOAD) wraps fsync/fdatasync and keeps, per file of the
journal directory, a shadow copy of what the last successful sync made durable (and the directory
listing as of the last directory sync). A child process runs sales through the real GuardService,
journal file and ISO codec (HostCore in-process, with dropped requests and responses so reversals
run too) and prints an ``ACK`` line after every reply to the reader (= after the commit it reports
returned) and a ``SENT`` line for every message handed to the host. At the cut the parent SIGKILLs
the child (at the Nth sync, before or after it, or at a random moment), replaces the journal files
with the shadow ("strict": nothing unsynced survives; "torn": each 512-byte sector of unsynced data
independently survives or not) and checks: Journal.open succeeds, PRAGMA integrity_check is ok,
verify_journal(k0, public key) is ok, every acknowledged transaction has the acknowledged outcome,
every message the host saw has its write-ahead record. The next child continues on the recovered
journal, so recovery after a cut is itself cut.

With the journal patched (in the child, test-only) to synchronous=NORMAL, SQLite does not sync the
WAL at commit and the same checker reports acknowledged outcomes lost; SIGKILL alone loses none.

Children are forked from a zygote started under LD_PRELOAD (imports paid once), so a cut costs
~50 ms. Run: ``python -m pytest tests/test_power_loss.py -q``. Also ``python tests/test_power_loss.py
zygote|child`` is the child side (not for humans).
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from guard.core.engine import Engine, EngineConfig
from guard.simulation.hostsim import HostCore
from guard.hostlink.iso import HostCodec, HostMessage
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, init_keys, load_keys
from guard.core.model import CardData, Request, Result, TxnKind, TxnState
from guard.core.policies import OFF
from guard.runtime.service import JournalCrypto, open_guard
from guard.hostlink.uplink import SendOutcome
from guard.journal.verify import verify_journal
from tests.support import subprocess_env

SHIM_SRC = Path(__file__).with_name("powerloss_shim.c")
TID, MID = "PWRLOSS1", "PWRLOSSMERCHANT"
PANS = ("4761739001010119", "5413330089020011")
DB = "journal.db"
SECTOR = 512
CUT_DEADLINE_S = 20.0  # one child run, generous: a healthy one takes ~50 ms
NON_FINAL_NEXT = {TxnState.REVERSAL_PENDING: {TxnState.REVERSAL_PENDING, TxnState.REVERSED, TxnState.NEEDS_MANUAL}}


# --------------------------------------------------------------------------------------------------
# Child side (runs forked from the zygote, under the shim)


class ChildUplink:
    """HostCore in-process behind the real codec; announces every message before the host sees it."""

    connected = True

    def __init__(self, core: HostCore, emit: Any) -> None:
        self.core, self.codec, self.emit = core, HostCodec(), emit
        self.host_dec = self.codec.decoder(side="host")
        self.term_dec = self.codec.decoder()
        self.inbox: list[Any] = []

    def send(self, fields: dict[str, str]) -> SendOutcome:
        self.emit("SENT", fields.get("t", ""), fields.get("11", ""))
        for m in self.host_dec.feed(self.codec.encode(fields)):
            assert isinstance(m, HostMessage), m
            for r in self.core.handle(m.fields, time.time()):
                if r.fields is not None and r.action == "send":
                    self.inbox.extend(self.term_dec.feed(self.codec.encode(r.fields)))
        return SendOutcome.SENT

    def poll(self) -> list[Any]:
        out, self.inbox = self.inbox, []
        return out

    def connect(self) -> bool:
        return True

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


def request(i: int) -> Request:
    return Request("PL", i.to_bytes(16, "big"), TxnKind.SALE, 1000 + 7 * i, "978", CardData(PANS[i % 2], "2912"))


def child_run(cmd: dict[str, Any]) -> None:
    """One child: open (and recover) the journal, run sales, report ACK/SENT lines on fd 1."""
    for k, v in cmd["env"].items():
        os.environ[k] = v  # putenv: the shim re-reads its settings in this new pid
    import guard.journal.schema as gj
    import guard.runtime.service as gs

    if cmd["sync"] != "FULL":  # the deliberately broken journal, patched here only
        gj.REQUIRED_PRAGMAS = tuple(("synchronous", cmd["sync"], {"NORMAL": 1, "OFF": 0}[cmd["sync"]])
                                    if p[0] == "synchronous" else p for p in gj.REQUIRED_PRAGMAS)
    real_open, real_create = gs.Journal.open, gs.Journal.create
    every = int(cmd["checkpoint_every"])
    gs.Journal.open = lambda *a, **kw: real_open(*a, **{"checkpoint_every": every, **kw})  # type: ignore[method-assign]
    gs.Journal.create = lambda *a, **kw: real_create(*a, **{"checkpoint_every": every, **kw})  # type: ignore[method-assign]

    def emit(*parts: Any) -> None:
        os.write(1, (" ".join(str(p) for p in parts) + "\n").encode())

    def on_reply(r: Result) -> None:
        if not r.in_progress:
            emit("ACK", r.key, r.state.value, r.approval_code or "-", r.rrn or "-", r.response_code or "-")

    keys = load_keys(Path(cmd["keys"]))
    ecfg = EngineConfig(TID, MID, host_timeout_s=0.02, reversal_timeout_s=0.03, backoff_base_s=0.005,
                        backoff_max_s=0.02, reversal_max_attempts=50, policy=OFF)
    core = HostCore(seed=cmd["seed"], dup_detection=True, faults=cmd["faults"])
    up = ChildUplink(core, emit)
    svc = open_guard(Path(cmd["dir"]) / DB, keys, ecfg, up, rng=random.Random(cmd["seed"]), on_reply=on_reply)  # type: ignore[arg-type]

    def pump() -> None:
        while up.inbox:
            for m in up.poll():
                svc.execute(svc.engine.host_message(m.fields, time.time()))

    def answered(key: str) -> Callable[[], bool]:
        return lambda: key in svc.replies and not svc.replies[key].in_progress

    svc.tickers.append(pump)
    svc.execute(svc.engine.on_host_up(time.time()))
    pump()
    for i in range(cmd["start"], cmd["start"] + cmd["count"]):
        req = request(i)
        svc.submit(req)
        pump()
        svc.run_until(answered(req.key), 2.0)
    svc.drain(2.0)
    emit("DONE")


def zygote_main() -> int:
    """Read one JSON command per line; fork a child for each; report PID and EXIT lines."""
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child_run(cmd)
            except BaseException as e:  # noqa: BLE001 - reported to the parent, never swallowed
                os.write(1, f"ERROR {type(e).__name__}: {e}\n".encode())
                code = 3
            os._exit(code)
        os.write(1, f"PID {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        os.write(1, f"EXIT {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
    return 0


# --------------------------------------------------------------------------------------------------
# Parent side


@dataclass
class Run:
    """What one child told us before it died."""

    acks: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    sent: list[tuple[str, str]] = field(default_factory=list)
    exit_code: int | None = None
    killed_by_us: bool = False
    done: bool = False
    errors: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    problems: list[str]
    lost: list[str]  # acknowledged outcomes the journal no longer holds as told

    @property
    def ok(self) -> bool:
        return not self.problems and not self.lost


class Zygote:
    """A python process under LD_PRELOAD that forks one child per cut."""

    def __init__(self, shim: Path, shadow: Path, watch: Path, extra_env: dict[str, str] | None = None) -> None:
        env = subprocess_env(LD_PRELOAD=str(shim), POSGUARD_SHADOW_DIR=str(shadow), POSGUARD_SHADOW_WATCH=str(watch),
                             **(extra_env or {}))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "zygote"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""

    def lines(self, deadline: float) -> Iterator[str]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                yield line.decode()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("child did not finish in time")
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"zygote died: {err[-2000:]}")
                self._buf += chunk

    def run(self, cmd: dict[str, Any], *, kill_after_acks: int | None = None, delay: float = 0.0) -> Run:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        run, pid, tried = Run(), None, False
        for line in self.lines(time.monotonic() + CUT_DEADLINE_S):
            kind, _, rest = line.partition(" ")
            if kind == "PID":
                pid = int(rest)
            elif kind == "ACK":
                key, state, approval, rrn, rc = rest.split(" ")
                run.acks[key] = (state, approval, rrn, rc)
            elif kind == "SENT":
                mti, stan = rest.split(" ")
                run.sent.append((mti, stan))
            elif kind == "DONE":
                run.done = True
            elif kind == "ERROR":
                run.errors.append(rest)
            elif kind == "EXIT":
                run.exit_code = int(rest.split(" ")[1])
                return run
            if (pid is not None and kill_after_acks is not None and not tried
                    and len(run.acks) >= kill_after_acks):
                tried = True
                if delay:
                    time.sleep(delay)
                try:
                    os.kill(pid, signal.SIGKILL)  # our own grandchild, by pid
                    run.killed_by_us = True
                except ProcessLookupError:  # it finished its sales first: not a cut, EXIT follows
                    pass
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def _read(p: Path) -> bytes | None:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None


def torn(synced: bytes | None, current: bytes | None, rng: random.Random) -> bytes | None:
    """One possible disk state: each sector written since the last sync survived or not; so did the size."""
    if synced == current or current is None:
        return synced  # unchanged, or an unlink that was never made durable
    if synced is None and rng.random() < 0.5:
        return None  # created, entry never made durable
    base = synced or b""
    lo, hi = sorted((len(base), len(current)))
    size = rng.choice((len(base), len(current), rng.randint(lo, hi)))  # metadata may lag or lead the data
    out = bytearray()
    for off in range(0, size, SECTOR):
        n = min(SECTOR, size - off)
        pick = current if rng.random() < 0.5 else base
        out += pick[off:off + n].ljust(n, b"\0")
    return bytes(out)


def power_cut(jdir: Path, shadow: Path, mode: str, rng: random.Random) -> bool:
    """Replace the journal files with a post-power-loss state. True if some unsynced data survived
    (torn mode), i.e. the state differs from the strict one."""
    names = {n for d in (jdir, shadow) for n in os.listdir(d) if not n.startswith(".")}
    kept_unsynced = False
    for n in names:
        synced = _read(shadow / n)
        content = synced if mode == "strict" else torn(synced, _read(jdir / n), rng)
        kept_unsynced |= content != synced and not n.endswith("-shm")
        if n.endswith("-shm") or content is None:  # SQLite rebuilds the wal-index from the WAL
            (jdir / n).unlink(missing_ok=True)
        else:
            (jdir / n).write_bytes(content)
    return kept_unsynced


def rebaseline(jdir: Path, shadow: Path) -> None:
    """The state the checker left on disk is the durable state the next child starts from."""
    for n in os.listdir(shadow):
        (shadow / n).unlink()
    for n in os.listdir(jdir):
        shutil.copyfile(jdir / n, shadow / n)
        (shadow / f".ino.{n}").write_text(f"{os.stat(jdir / n).st_ino}\n")  # the shim's inode note


def check(jdir: Path, keys: DeviceKeys, run: Run) -> Verdict:
    """The invariants after a cut (problems), and acknowledged outcomes not held as told (lost)."""
    problems: list[str] = []
    lost: list[str] = []
    path = jdir / DB
    if not path.exists():
        return Verdict([], [f"{k}: journal file gone" for k in run.acks])
    try:
        j = Journal.open(path, keys, terminal_id=TID)
    except Exception as e:  # noqa: BLE001 - reported as the verdict
        return Verdict([f"Journal.open failed: {e}"], [])
    try:
        ic = j._db().execute("PRAGMA integrity_check").fetchall()
        if ic != [("ok",)]:
            problems.append(f"integrity_check: {ic[:3]}")
        entries = list(j.entries())
        eng = Engine.restore(EngineConfig(TID, MID, keep_final=10**9), JournalCrypto(j, keys.token_key), entries)
    finally:
        j.close()
    for key, (state, approval, rrn, rc) in run.acks.items():
        t = eng.txns.get(key)
        told = TxnState(state)
        if t is None:
            lost.append(f"{key}: acknowledged {state}, no intent in the journal")
        elif t.state not in NON_FINAL_NEXT.get(told, {told}):
            lost.append(f"{key}: acknowledged {state}, journal says {t.state.value}")
        elif told.final and (t.approval or "-", t.rrn or "-", t.rc or "-") != (approval, rrn, rc):
            lost.append(f"{key}: acknowledged {state} {approval}/{rrn}/{rc}, journal holds {t.approval}/{t.rrn}/{t.rc}")
    by_stan = {f"{t.stan:06d}": t.key for t in eng.txns.values()}
    attempts = {(e.txn, e.payload.get("mti")) for e in entries if e.kind == "reversal_attempt"}
    net_stans = {f"{e.payload.get('stan', -1):06d}" for e in entries if e.kind == "stan_use"}
    for mti, stan in run.sent:
        sent_key = by_stan.get(stan)
        if mti == "0800":  # network management (the daemon's checkpoint deposits): its STAN use is journaled first
            if stan not in net_stans:
                lost.append(f"host saw 0800 stan {stan}; the journal has no stan_use for it")
            continue
        if sent_key is None:
            lost.append(f"host saw {mti} stan {stan}; the journal has no intent for it")
        elif mti != "0200" and (sent_key, mti) not in attempts:
            lost.append(f"host saw {mti} stan {stan}; the journal has no reversal_attempt for it")
    rep = verify_journal(path, k0=keys.k0, public_key=keys.public_key)
    if not rep.ok:
        problems.append(f"verify_journal: {rep.reason} at {rep.first_bad_seq}: {rep.detail}")
    return Verdict(problems, lost)


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) to build the LD_PRELOAD power-loss shim")
    if not sys.platform.startswith("linux"):
        pytest.skip("the power-loss shim needs Linux (/proc/self/fd, LD_PRELOAD)")
    out = tmp_path_factory.mktemp("shim") / "powerloss_shim.so"
    r = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(out), str(SHIM_SRC), "-ldl"],
                       check=False, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"cannot build the power-loss shim with {cc}: {r.stderr[-500:]}")
    return out


@pytest.fixture(scope="module")
def zygote(shim: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    idle = tmp_path_factory.mktemp("idle")  # each command names its own shadow and watch dirs
    z = Zygote(shim, idle, idle)
    yield z
    z.close()


@dataclass
class Rig:
    """One terminal: journal dir, its shadow, keys (outside the modelled dir), the sales counter."""

    base: Path
    keys: DeviceKeys
    next_sale: int = 0

    @property
    def jdir(self) -> Path:
        return self.base / "journal"

    @property
    def shadow(self) -> Path:
        return self.base / "shadow"

    @property
    def sync_log(self) -> Path:
        return self.base / "sync.log"


def make_rig(base: Path, *, create_journal: bool = True) -> Rig:
    rig = Rig(base, init_keys(base / "keys"))
    rig.jdir.mkdir(parents=True)
    rig.shadow.mkdir()
    if create_journal:
        Journal.create(rig.jdir / DB, rig.keys, terminal_id=TID, now=time.time()).close()
        rebaseline(rig.jdir, rig.shadow)
    return rig


def command(rig: Rig, *, count: int, sync: str = "FULL", checkpoint_every: int = 256, seed: int = 0,
            faults: dict[str, float] | None = None, kill_at: int = 0, kill_when: str = "before") -> dict[str, Any]:
    env = {"POSGUARD_SHADOW_DIR": str(rig.shadow), "POSGUARD_SHADOW_WATCH": str(rig.jdir),
           "POSGUARD_SHADOW_LOG": str(rig.sync_log), "POSGUARD_KILL_AT_SYNC": str(kill_at), "POSGUARD_KILL_WHEN": kill_when}
    cmd = {"dir": str(rig.jdir), "keys": str(rig.base / "keys"), "start": rig.next_sale, "count": count,
           "sync": sync, "checkpoint_every": checkpoint_every, "seed": seed, "faults": faults or {}, "env": env}
    rig.next_sale += count
    rig.sync_log.unlink(missing_ok=True)
    return cmd


def cut_point(rig: Rig, kill_at: int, kill_when: str) -> str:
    """Which sync the shim killed at, e.g. 'before fdatasync journal.db-wal' (from its log)."""
    calls = rig.sync_log.read_text().splitlines() if rig.sync_log.exists() else []
    if not kill_at or len(calls) < kill_at:
        return "child finished first"
    fn, path = calls[kill_at - 1].split(" ", 1)
    return f"{kill_when} {fn} {'<dir>' if Path(path) == rig.jdir else Path(path).name}"


FAULTS = {"drop_request": 0.1, "debit_drop_response": 0.1}
N_SYNC_CUTS = int(os.environ.get("POSGUARD_POWERLOSS_SYNC_CUTS", "48"))
N_RANDOM_CUTS = int(os.environ.get("POSGUARD_POWERLOSS_RANDOM_CUTS", "24"))
N_TORN_CUTS = int(os.environ.get("POSGUARD_POWERLOSS_TORN_CUTS", "24"))


def test_shim_keeps_only_synced_bytes(shim: Path, tmp_path: Path) -> None:
    """The model itself: synced bytes survive, unsynced bytes and unsynced names do not, and a name
    given to already-synced data (rename/link) carries that data once the directory is synced."""
    w, s = tmp_path / "w", tmp_path / "s"
    w.mkdir()
    s.mkdir()
    code = ("import os,signal\n"
            "fd=os.open('w/a',os.O_RDWR|os.O_CREAT,0o600);os.write(fd,b'synced');os.fsync(fd)\n"
            "t=os.open('w/t',os.O_RDWR|os.O_CREAT,0o600);os.write(t,b'moved');os.fsync(t);os.rename('w/t','w/m')\n"
            "d=os.open('w',os.O_RDONLY);os.fsync(d)\n"
            "os.write(fd,b'+unsynced');os.close(os.open('w/b',os.O_WRONLY|os.O_CREAT,0o600))\n"
            "os.kill(os.getpid(),signal.SIGKILL)\n")
    env = dict(os.environ, LD_PRELOAD=str(shim), POSGUARD_SHADOW_DIR=str(s), POSGUARD_SHADOW_WATCH=str(w))
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, timeout=30)
    assert r.returncode == -signal.SIGKILL
    assert (w / "a").read_bytes() == b"synced+unsynced" and (w / "b").exists()
    assert sorted(n for n in os.listdir(s) if not n.startswith(".")) == ["a", "m"]
    assert (s / "a").read_bytes() == b"synced" and (s / "m").read_bytes() == b"moved"


def test_sqlite_syncs_through_libc(shim: Path, tmp_path: Path) -> None:
    """strace and the shim's own log agree: every sync SQLite issues on the journal passes through the
    shim (fdatasync via libc), and nothing uses sync_file_range/msync/syncfs on it."""
    strace = shutil.which("strace")
    rig = make_rig(tmp_path / "strace")
    trace = tmp_path / "strace.out"
    cmd = command(rig, count=6, checkpoint_every=8, seed=1)
    env = subprocess_env(LD_PRELOAD=str(shim))
    argv = [sys.executable, str(Path(__file__).resolve()), "child", json.dumps(cmd)]
    if strace:
        argv = [strace, "-f", "-y", "-qq", "-o", str(trace), "-e",
                "trace=fsync,fdatasync,sync_file_range,msync,syncfs,sync", *argv]
    r = subprocess.run(argv, check=False, env=env, capture_output=True, timeout=60)
    if strace and r.returncode != 0 and b"ptrace" in r.stderr:
        pytest.skip(f"strace cannot trace here: {r.stderr[-300:]!r}")
    assert r.returncode == 0, r.stderr[-2000:]
    shim_calls = [tuple(line.split(" ", 1)) for line in rig.sync_log.read_text().splitlines()]
    assert sum(fn == "fdatasync" and p.endswith("-wal") for fn, p in shim_calls) >= 12, shim_calls  # >= 1 per commit
    if not strace:
        pytest.skip("strace not installed: only the shim's own counter was checked")
    seen = []
    for line in trace.read_text().splitlines():
        if f"<{rig.jdir}" in line and "resumed" not in line:
            fn = line.split("(", 1)[0].split()[-1]
            seen.append((fn, line.split("<", 1)[1].split(">", 1)[0]))
    assert sorted(seen) == sorted(shim_calls), (seen, shim_calls)
    assert not [c for c in seen if c[0] in ("sync_file_range", "msync", "syncfs", "sync")]
    kinds: dict[str, int] = {}
    for fn, p in seen:
        k = f"{fn} {'<dir>' if Path(p) == rig.jdir else Path(p).name}"
        kinds[k] = kinds.get(k, 0) + 1
    print(f"\nsyncs on the journal dir, 6 sales: strace {len(seen)} = shim {len(shim_calls)}: {kinds}")


@pytest.mark.slow
def test_power_loss_full_keeps_every_acknowledged_outcome(zygote: Zygote, tmp_path: Path) -> None:
    """WAL + synchronous=FULL (the product setting): the invariants hold after every cut."""
    rig = make_rig(tmp_path / "full")
    rng = random.Random(0x90E7)
    plan = (["sync"] * N_SYNC_CUTS) + (["random"] * N_RANDOM_CUTS) + (["torn"] * N_TORN_CUTS)
    rng.shuffle(plan)
    stats = {"cuts": 0, "killed": 0, "torn_with_unsynced_data": 0, "acks": 0, "sent": 0}
    points: dict[str, int] = {}
    t0 = time.monotonic()
    for n, how in enumerate(plan):
        every = rng.choice((4, 16, 256))  # small: checkpoints and WAL truncation inside the cut window
        count = rng.randint(3, 10)
        kill_at, kill_when, kill_after, delay = 0, "before", None, 0.0
        if how == "sync":
            kill_at, kill_when = rng.randint(1, 3 * count), rng.choice(("before", "before", "after"))
        elif how == "torn":  # just before a sync: written, not yet durable, partly on the platter
            kill_at = rng.randint(1, 3 * count)
        else:
            kill_after, delay = rng.randint(0, count - 1), rng.choice((0.0, rng.uniform(0, 0.004)))
        cmd = command(rig, count=count, checkpoint_every=every, seed=n, faults=FAULTS, kill_at=kill_at, kill_when=kill_when)
        run = zygote.run(cmd, kill_after_acks=kill_after, delay=delay)
        assert not run.errors, run.errors
        assert run.exit_code in (0, -signal.SIGKILL), run
        if kill_at:
            p = cut_point(rig, kill_at, kill_when)
            points[p] = points.get(p, 0) + 1
        stats["torn_with_unsynced_data"] += power_cut(rig.jdir, rig.shadow, "torn" if how == "torn" else "strict", rng)
        v = check(rig.jdir, rig.keys, run)
        assert v.ok, f"cut {n} ({how}, kill_at={kill_at} {kill_when}, kill_after={kill_after}): {v.problems} {v.lost}"
        rebaseline(rig.jdir, rig.shadow)
        stats["cuts"] += 1
        stats["killed"] += run.exit_code == -signal.SIGKILL
        stats["acks"] += len(run.acks)
        stats["sent"] += len(run.sent)
    # After the last cut the terminal comes back, recovers and drains; the journal still verifies.
    run = zygote.run(command(rig, count=2, seed=999))
    assert run.exit_code == 0 and run.done, run
    power_cut(rig.jdir, rig.shadow, "strict", rng)
    assert check(rig.jdir, rig.keys, run).ok
    print(f"\nFULL: {stats} in {time.monotonic() - t0:.1f} s; sync cut points: {dict(sorted(points.items()))}")
    assert stats["killed"] >= 0.8 * len(plan) and stats["acks"] >= len(plan), stats


def test_power_loss_during_journal_creation(zygote: Zygote, tmp_path: Path) -> None:
    """A cut while the journal is being created must leave no journal, or one that opens and verifies:
    anything else and open_guard refuses to start until someone deletes the file by hand."""
    outcomes: dict[str, list[str]] = {}
    for n in range(1, 17):  # the creation (7-12 syncs), then the first sale's commits
        for when in ("before", "after"):
            rig = make_rig(tmp_path / f"create{n}{when}", create_journal=False)
            run = zygote.run(command(rig, count=3, seed=n, kill_at=n, kill_when=when))
            assert not run.errors, run.errors
            point = cut_point(rig, n, when)
            power_cut(rig.jdir, rig.shadow, "strict", random.Random(n))
            if not (rig.jdir / DB).exists():
                assert not run.acks
                outcome = "no journal (created afresh at next start)"
            else:
                v = check(rig.jdir, rig.keys, run)
                outcome = "journal opens and verifies" if v.ok else re.sub(r"/\S+", "<path>", "; ".join(v.problems + v.lost))[:100]
            outcomes.setdefault(outcome, []).append(f"#{n} {point}")
    print("\ncreate cuts:\n" + "\n".join(f"  {k}: {v}" for k, v in outcomes.items()))
    bad = {k: v for k, v in outcomes.items() if not k.startswith(("no journal", "journal opens"))}
    if bad and all("JOURNAL_NOT_INITIALISED" in k for k in bad):
        pytest.xfail(f"known product gap: Journal.create is not atomic under power loss; cuts {bad}")
    assert not bad, bad


def test_power_loss_detects_synchronous_normal(zygote: Zygote, tmp_path: Path) -> None:
    """The same checker, journal patched to synchronous=NORMAL: acknowledged outcomes vanish at the cut
    (strict power loss), while SIGKILL alone (the page cache survives) loses none."""
    rig = make_rig(tmp_path / "normal")
    rng = random.Random(0x0BAD)
    cuts = lost_cuts = acked = lost_acks = sent = unknown_at_host = 0
    for n in range(12):
        count = rng.randint(4, 10)
        run = zygote.run(command(rig, count=count, sync="NORMAL", seed=n, faults=FAULTS),
                         kill_after_acks=rng.randint(2, count - 1), delay=rng.uniform(0, 0.003))
        assert not run.errors, run.errors
        # Control: the files as SIGKILL left them (no power loss) hold every acknowledgement.
        crash_only = tmp_path / f"crash_only{n}"
        shutil.copytree(rig.jdir, crash_only)
        (crash_only / f"{DB}-shm").unlink(missing_ok=True)
        control = check(crash_only, rig.keys, run)
        assert control.ok, control
        power_cut(rig.jdir, rig.shadow, "strict", rng)
        v = check(rig.jdir, rig.keys, run)
        assert not v.problems, v.problems  # NORMAL loses a suffix: what survives is still consistent
        cuts += 1
        acked += len(run.acks)
        lost_acks += sum(1 for x in v.lost if "acknowledged" in x)
        sent += len(run.sent)
        unknown_at_host += sum(1 for x in v.lost if x.startswith("host saw"))
        lost_cuts += bool(v.lost)
        rebaseline(rig.jdir, rig.shadow)
    print(f"\nNORMAL: {lost_cuts}/{cuts} cuts lost acknowledged outcomes; {lost_acks}/{acked} acknowledgements lost; "
          f"{unknown_at_host}/{sent} messages the host saw lost their write-ahead record")
    assert lost_cuts >= cuts - 1 and lost_acks > 0, (lost_cuts, cuts, lost_acks, acked)


if __name__ == "__main__":
    if sys.argv[1:2] == ["zygote"]:
        sys.exit(zygote_main())
    if sys.argv[1:2] == ["child"]:
        child_run(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit("usage: test_power_loss.py zygote|child CMD  (driven by pytest)")
