"""The journal's writer lock: exclusive between processes, re-entrant within one, gone with its holder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guard.core.errors import JournalError
from guard.journal.lock import WriterLock
from tests.support import subprocess_env

_TRY = "from guard.journal.lock import WriterLock; import sys; WriterLock.acquire(sys.argv[1]); print('locked')"


def _other_process_locks(path: Path) -> bool:
    r = subprocess.run([sys.executable, "-c", _TRY, str(path)], capture_output=True, text=True, timeout=60,
                       env=subprocess_env())
    return r.returncode == 0 and "locked" in r.stdout


def test_lock_excludes_other_processes_until_the_last_holder_releases(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_bytes(b"")
    a = WriterLock.acquire(path)
    b = WriterLock.acquire(path)  # the same process (a tool the daemon runs on its own journal)
    assert not _other_process_locks(path)
    a.release()
    assert not _other_process_locks(path), "still held by b"
    b.release()
    b.release()  # idempotent
    assert _other_process_locks(path)


def test_missing_file_is_a_journal_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError):
        WriterLock.acquire(tmp_path / "nope.db")
