"""posguard keys rotate / export-verifier: the verifier follows the signing-key chain."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import guard.journal.keys as keys_mod
from guard.core.errors import JournalError
from guard.simulation.hostsim import HostCore
from guard.journal.store import Journal
from guard.journal.keys import (
    NEXT_SIGNING_FILE,
    PUBLIC_CHAIN_FILE,
    load_k0,
    load_keys,
    load_public_key,
    load_public_keys,
    public_key_hex,
)
from guard.ops.rotation import rotate_keys
from guard.journal.verify import verify_journal
from tests.support import cli
from tests.support.ops_support import TID, mixed_journal

T = 1_720_000_000.0


@pytest.fixture
def jk(tmp_path: Path) -> tuple[Path, Path]:
    g = mixed_journal(tmp_path, HostCore(seed=3, dup_detection=True), approved=60, lost_debited=5, lost_unprocessed=5)
    return g.path, tmp_path / "keys"


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def full(path: Path, kdir: Path, **kw: object) -> object:
    return verify_journal(path, k0=load_k0(kdir / "k0.escrow"), **kw)  # type: ignore[arg-type]


def test_rotate_records_the_new_key_and_verification_follows(jk: tuple[Path, Path]) -> None:
    path, kdir = jk
    original = load_public_key(kdir / "verify.pub")
    code, out, _ = cli("keys", "rotate", kdir, "--journal", path, "--json")
    assert code == 0
    res = json.loads(out)
    assert res["old_pub"] == public_key_hex(original) and res["rotation_seq"] > 0
    assert mode(kdir / "signing.key") == 0o600 and not (kdir / NEXT_SIGNING_FILE).exists()
    chain = [public_key_hex(k) for k in load_public_keys(kdir / PUBLIC_CHAIN_FILE)]
    assert chain == [res["old_pub"], res["new_pub"]]
    keys = load_keys(kdir)  # verify.pub matches the new signing key
    assert public_key_hex(keys.public_key) == res["new_pub"]
    # The daemon opens it with the new key and signs new checkpoints with it.
    with Journal.open(path, keys, terminal_id=TID) as j:
        j.append([("stan_use", None, {"stan": 999, "purpose": "echo"})], now=T)
        j.checkpoint(T + 1)
    new = keys.public_key
    for trusted in ([original], [new], [original, new]):
        rep = full(path, kdir, public_keys=trusted)
        assert rep.ok, rep  # type: ignore[attr-defined]
    other = Ed25519PrivateKey.generate().public_key()
    rep = full(path, kdir, public_key=other)
    assert not rep.ok and rep.reason == "CHECKPOINT_INVALID" and "key chain" in rep.detail  # type: ignore[attr-defined]
    # The CLI with the auditor's original verify.pub and with the new one.
    for pub in (kdir / "verify.pub",):
        assert cli("journal", "verify", path, "--k0", kdir / "k0.escrow", "--pubkey", pub)[0] == 0


def test_checkpoint_by_a_retired_key_fails(jk: tuple[Path, Path]) -> None:
    path, kdir = jk
    old = load_keys(kdir)
    rotate_keys(kdir, path, now=T)
    with Journal.open(path, load_keys(kdir), terminal_id=TID) as j:
        j._signing_key = old.signing_key  # a stale process still holding the old key
        seq = j.checkpoint(T + 2)
    rep = full(path, kdir, public_key=old.public_key)
    assert (rep.ok, rep.reason, rep.first_bad_seq) == (False, "CHECKPOINT_INVALID", seq)  # type: ignore[attr-defined]


def test_anchor_signed_by_the_new_key_verifies_against_the_original(jk: tuple[Path, Path]) -> None:
    path, kdir = jk
    original = load_public_key(kdir / "verify.pub")
    rotate_keys(kdir, path, now=T)
    with Journal.open(path, load_keys(kdir), terminal_id=TID) as j:
        j.checkpoint(T + 1)
        anchor = j.latest_checkpoint()
    assert full(path, kdir, public_key=original, anchor=anchor).ok  # type: ignore[attr-defined]


def test_two_rotations_make_a_chain_of_three(jk: tuple[Path, Path]) -> None:
    path, kdir = jk
    a = rotate_keys(kdir, path, now=T)
    b = rotate_keys(kdir, path, now=T + 10)
    assert a.new_pub == b.old_pub
    chain = [public_key_hex(k) for k in load_public_keys(kdir / PUBLIC_CHAIN_FILE)]
    assert chain == [a.old_pub, a.new_pub, b.new_pub]
    for k in load_public_keys(kdir / PUBLIC_CHAIN_FILE):
        assert full(path, kdir, public_key=k).ok  # type: ignore[attr-defined]


def test_crash_before_the_journal_commit_reuses_the_pending_key(jk: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path, kdir = jk
    def boom(self: Journal, *a: object, **k: object) -> int:
        raise OSError("power cut")
    monkeypatch.setattr(Journal, "rotate_signing_key", boom)
    with pytest.raises(OSError):
        rotate_keys(kdir, path, now=T)
    pending = public_key_hex(Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex((kdir / NEXT_SIGNING_FILE).read_text())).public_key())
    assert mode(kdir / NEXT_SIGNING_FILE) == 0o600
    with Journal.open(path, load_keys(kdir), terminal_id=TID):  # the daemon still runs with the old key
        pass
    monkeypatch.undo()
    res = rotate_keys(kdir, path, now=T)
    assert res.new_pub == pending and res.rotation_seq is not None
    assert full(path, kdir, public_key=load_public_key(kdir / "verify.pub")).ok  # type: ignore[attr-defined]


@pytest.mark.parametrize("stop_after", ["journal", "verify.pub"])
def test_crash_after_the_journal_commit_is_finished_by_a_rerun(jk: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                               stop_after: str) -> None:
    path, kdir = jk
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(dst)).name == "signing.key":  # verify.pubs and verify.pub done, the secret not yet
            raise OSError("power cut")
        real_replace(src, dst)  # type: ignore[arg-type]

    def no_finish(dir: Path) -> str:
        raise OSError("power cut")

    if stop_after == "journal":
        monkeypatch.setattr("guard.ops.rotation.finish_rotation", no_finish)
    else:
        monkeypatch.setattr(keys_mod.os, "replace", replace)
    with pytest.raises(OSError):
        rotate_keys(kdir, path, now=T)
    monkeypatch.undo()
    # Meanwhile the daemon refuses to start: its key files do not match the journal any more.
    with pytest.raises((JournalError, keys_mod.KeyFileError)) as ei:
        Journal.open(path, load_keys(kdir), terminal_id=TID).close()
    assert ei.value.code in ("JOURNAL_KEY_MISMATCH", "KEY_MALFORMED")
    code, out, _ = cli("keys", "rotate", kdir, "--journal", path, "--json")
    assert code == 0 and json.loads(out)["rotation_seq"] is None
    keys = load_keys(kdir)
    with Journal.open(path, keys, terminal_id=TID):
        pass
    assert full(path, kdir, public_keys=load_public_keys(kdir / PUBLIC_CHAIN_FILE)).ok  # type: ignore[attr-defined]


def test_rotate_refuses_a_busy_journal(jk: tuple[Path, Path]) -> None:
    path, kdir = jk
    with Journal.open(path, load_keys(kdir), terminal_id=TID):
        code, _, err = cli("keys", "rotate", kdir, "--journal", path)
    assert code == 3 and "JOURNAL_BUSY" in err


def test_export_verifier(jk: tuple[Path, Path], tmp_path: Path) -> None:
    path, kdir = jk
    rotate_keys(kdir, path, now=T)
    out = tmp_path / "auditor"
    code, _, _ = cli("keys", "export-verifier", kdir, out)
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"verify.pub", "verify.pubs", "k0.escrow", "README.txt"}
    assert mode(out) == 0o700 and mode(out / "k0.escrow") == 0o600
    assert len(load_public_keys(out / "verify.pubs")) == 2
    code, _, err = cli("keys", "export-verifier", kdir, out)
    assert code == 2 and "KEY_EXISTS" in err
    code, _, _ = cli("journal", "verify-chain", path, "--k0", out / "k0.escrow", "--pubkey", out / "verify.pubs")
    assert code == 0
    code, _, _ = cli("journal", "verify", path, "--k0", out / "k0.escrow", "--pubkey", out / "verify.pub")
    assert code == 0
    (kdir / "k0.escrow").unlink()  # k0 left the terminal after provisioning
    code, _, err = cli("keys", "export-verifier", kdir, tmp_path / "auditor2")
    assert code == 1 and "escrow" in err
    assert not (tmp_path / "auditor2" / "k0.escrow").exists()
