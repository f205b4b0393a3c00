"""The MAC worker of ``guard.journal.verify``: the same reports as the in-process scan, whatever the tampering.

Every tamper test of test_journal_tamper runs again here with the worker forced on and tiny batches
(so batch boundaries fall everywhere); random row mutations compare the two scans report by report;
a worker that dies or cannot start leaves the in-process scan to answer.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, note

import guard.journal.mac_worker as worker_mod
import guard.journal.verify as verify_mod
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys
from guard.journal.verify import VerifyReport, verify_journal
from tests.fuzz.test_fuzz_parsers import fuzz, journal_ops, journal_template, mutate_journal  # noqa: F401 (fixture)
from tests.integration.test_journal_tamper import *  # noqa: F403  (the tamper tests, collected again under the worker)
from tests.integration.test_journal_tamper import T0, TID, _rec, attacker, jf, template  # noqa: F401 (fixtures)

STARTS: list[int] = []


@pytest.fixture(autouse=True)
def worker_always(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every verification with k0 in this module uses the worker, with 3-entry batches."""
    monkeypatch.setattr(verify_mod, "MAC_WORKER_MIN_ENTRIES", 0)
    monkeypatch.setattr(verify_mod, "_SHIP_EVERY", 3)
    real = worker_mod._MacWorker.start.__func__  # type: ignore[attr-defined]

    def counted(cls: type[worker_mod._MacWorker], key: bytes) -> worker_mod._MacWorker | None:
        STARTS.append(1)
        return real(cls, key)  # type: ignore[no-any-return]

    monkeypatch.setattr(worker_mod._MacWorker, "start", classmethod(counted))
    yield


def both(p: Path, **kw: Any) -> VerifyReport:
    """The report with the worker, asserted equal to the in-process one."""
    n = len(STARTS)
    with_worker = verify_journal(p, mac_worker=True, **kw)
    inline = verify_journal(p, mac_worker=False, **kw)
    assert with_worker == inline
    assert len(STARTS) == n + (1 if kw.get("k0") is not None else 0) or not with_worker.entries
    return with_worker


def test_worker_really_runs_and_agrees(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    n = len(STARTS)
    rep = both(path, k0=keys.k0, public_key=keys.public_key)
    assert rep.ok and len(STARTS) > n


@pytest.mark.parametrize("forged", [2, 3, 4, 10, 11, 45, 46])
def test_forged_mac_at_any_batch_position(jf: tuple[Path, DeviceKeys], forged: int) -> None:
    path, keys = jf
    attacker(path).execute("UPDATE entries SET mac = zeroblob(32) WHERE seq = ?", (forged,))
    rep = both(path, k0=keys.k0, public_key=keys.public_key)
    assert (rep.reason, rep.first_bad_seq) == ("MAC_INVALID", forged)


def test_mac_failure_before_a_later_hash_failure_wins(jf: tuple[Path, DeviceKeys]) -> None:
    """This process runs ahead of the worker: a later anomaly must not hide the earlier bad MAC."""
    path, keys = jf
    c = attacker(path)
    c.execute("UPDATE entries SET mac = zeroblob(32) WHERE seq = 12")
    c.execute("UPDATE entries SET payload = '{}' WHERE seq = 30")
    c.execute("UPDATE entries SET kind = CAST(X'7BC328' AS TEXT) WHERE seq = 40")  # unreadable (not UTF-8)
    rep = both(path, k0=keys.k0, public_key=keys.public_key)
    assert (rep.reason, rep.first_bad_seq, rep.checkpoints) == ("MAC_INVALID", 12, 2)  # checkpoints 1 and 10


def test_unreadable_row_after_good_macs(jf: tuple[Path, DeviceKeys]) -> None:
    path, keys = jf
    attacker(path).execute("UPDATE entries SET kind = CAST(X'7BC328' AS TEXT) WHERE seq = 40")
    assert both(path, k0=keys.k0).reason == "UNREADABLE"


def test_bad_checkpoint_on_an_entry_with_a_bad_mac(jf: tuple[Path, DeviceKeys]) -> None:
    """At one entry the MAC is checked before the checkpoint: MAC_INVALID, as in-process."""
    path, keys = jf
    c = attacker(path)
    c.execute("UPDATE entries SET mac = zeroblob(32) WHERE seq = 19")
    rep = both(path, k0=keys.k0, public_key=keys.public_key, anchor={"bad": 1})
    assert rep.reason == "ANCHOR_INVALID"
    rep = both(path, k0=keys.k0, public_key=keys.public_key)
    assert (rep.reason, rep.first_bad_seq) == ("MAC_INVALID", 19)


@fuzz(60)
@given(ops=journal_ops)
def test_row_mutations_same_report(journal_template: tuple[Path, DeviceKeys, dict[str, Any]],  # noqa: F811
                                   tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int, int]]) -> None:
    template_path, keys, anchor = journal_template
    p = tmp_path_factory.mktemp("mut") / "m.db"
    shutil.copyfile(template_path, p)
    note(repr(mutate_journal(p, ops)))
    both(p, k0=keys.k0, public_key=keys.public_key, anchor=anchor)
    both(p, k0=keys.k0)


def test_dead_worker_leaves_it_to_this_process(jf: tuple[Path, DeviceKeys], monkeypatch: pytest.MonkeyPatch) -> None:
    path, keys = jf
    good = verify_journal(path, k0=keys.k0, public_key=keys.public_key, mac_worker=False)
    for src in ("raise SystemExit(0)", "import sys; sys.stdin.buffer.read(100); sys.stdout.buffer.write(b'x')",
                "import sys; sys.stdout.buffer.write(bytes(40)); sys.stdout.flush(); raise SystemExit(1)"):
        monkeypatch.setattr(worker_mod, "_WORKER_SRC", src)
        assert verify_journal(path, k0=keys.k0, public_key=keys.public_key, mac_worker=True) == good
    attacker(path).execute("UPDATE entries SET mac = zeroblob(32) WHERE seq = 7")
    rep = verify_journal(path, k0=keys.k0, public_key=keys.public_key, mac_worker=True)
    assert (rep.reason, rep.first_bad_seq) == ("MAC_INVALID", 7)


def test_no_interpreter_to_start(jf: tuple[Path, DeviceKeys], monkeypatch: pytest.MonkeyPatch) -> None:
    path, keys = jf
    monkeypatch.setattr(sys, "executable", str(path.parent / "no-such-python"))
    assert verify_journal(path, k0=keys.k0, mac_worker=True).ok


def test_segment_progress_and_ratchet_state_with_worker(tmp_path: Path, keys: DeviceKeys) -> None:
    """A longer journal: progress is reported, the ratchet row is compared with the worker's key."""
    p = tmp_path / "j.db"
    with Journal.create(p, keys, terminal_id=TID, now=T0, checkpoint_every=50) as j:
        for b in range(0, 600, 100):
            j.append([_rec(i) for i in range(b, b + 100)], now=T0 + b)
    seen: list[tuple[int, int]] = []
    rep = verify_journal(p, k0=keys.k0, public_key=keys.public_key, mac_worker=True,
                         progress=lambda a, b: seen.append((a, b)))
    assert rep.ok and seen and seen[-1] == (rep.entries, rep.entries)
    c = sqlite3.connect(p)
    c.execute("UPDATE ratchet SET key = zeroblob(32)")
    c.commit()
    c.close()
    assert both(p, k0=keys.k0).reason == "RATCHET_MISMATCH"
