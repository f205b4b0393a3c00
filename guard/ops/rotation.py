"""Checkpoint signing-key rotation (``posguard keys rotate DIR --journal J``).

Order, each step idempotent so an interrupted rotation is finished by running it again:

1. ``guard.journal.keys.rotation_keys``: the new Ed25519 key is written as ``signing.key.next`` (0600) and
   ``verify.pub.next``, or a pending one is reused.
2. The journal (opened exclusively) records the rotation in one commit
   (``Journal.rotate_signing_key``): ``key_rotation`` entry, checkpoint by the old key covering
   it, checkpoint by the new key. Skipped if the journal already names the new key.
3. ``guard.journal.keys.finish_rotation``: ``verify.pubs`` gains the new key; ``verify.pub`` then
   ``signing.key`` are replaced by atomic renames.

Between 2 and 3 the daemon refuses to start (its old key does not verify the newest checkpoint:
JOURNAL_KEY_MISMATCH), so it never signs with a retired key. Verifiers follow the chain recorded
in the journal (``guard.journal.verify``): checkpoints before the rotation verify with the old key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guard.core.errors import JournalError
from guard.ops.export import read_meta
from guard.journal.store import Journal
from guard.journal.keys import DeviceKeys, finish_rotation, public_key_hex, rotation_keys


@dataclass
class RotationResult:
    old_pub: str
    new_pub: str
    rotation_seq: int | None  # None: the journal had already recorded it (resumed)


def rotate_keys(key_dir: Path, journal_path: Path, *, now: float) -> RotationResult:
    """Rotate the signing key in ``key_dir`` and record it in ``journal_path`` (module docstring)."""
    terminal = read_meta(Path(journal_path)).get("terminal_id", "")
    current, new = rotation_keys(key_dir)
    old_pub, new_pub = public_key_hex(current.public_key), public_key_hex(new.public_key())
    seq: int | None = None
    try:
        j = Journal.open_exclusive(journal_path, current, terminal_id=terminal)
    except JournalError as e:
        if e.code != "JOURNAL_KEY_MISMATCH":
            raise
        # Already recorded? Then the newest checkpoint is signed by the new key.
        Journal.open_exclusive(journal_path, DeviceKeys(new, current.token_key, current.vault_key),
                               terminal_id=terminal).close()
    else:
        try:
            seq = j.rotate_signing_key(new, now=now)
        finally:
            j.close()
    finish_rotation(key_dir)
    return RotationResult(old_pub, new_pub, seq)
