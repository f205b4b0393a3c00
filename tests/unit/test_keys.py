"""Device keys: file permissions, refusal to overwrite, specific errors, keyed card tokens."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest

from guard.core.errors import KeyFileError
from guard.journal.keys import (
    K0_FILE,
    PUBLIC_FILE,
    SECRET_FILES,
    SIGNING_FILE,
    TOKEN_FILE,
    VAULT_FILE,
    DeviceKeys,
    card_token,
    init_keys,
    load_k0,
    load_keys,
    load_public_key,
    public_key_hex,
)

PAN = "4111111111111111"


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _raw_private(k: DeviceKeys) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return k.signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())


def test_init_creates_0700_dir_and_0600_secrets(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    keys = init_keys(d)
    assert _mode(d) == 0o700
    for name in SECRET_FILES:
        assert _mode(d / name) == 0o600, name
        assert len(bytes.fromhex((d / name).read_text().strip())) == 32
    assert _mode(d / PUBLIC_FILE) == 0o644
    assert (d / PUBLIC_FILE).read_text().strip() == public_key_hex(keys.public_key)
    assert keys.k0 is not None and len(keys.token_key) == len(keys.vault_key) == 32


def test_load_round_trips(tmp_path: Path) -> None:
    made = init_keys(tmp_path / "k")
    loaded = load_keys(tmp_path / "k")
    assert _raw_private(loaded) == _raw_private(made)
    assert (loaded.token_key, loaded.vault_key, loaded.k0) == (made.token_key, made.vault_key, made.k0)


def test_deterministic_rng_gives_deterministic_keys(tmp_path: Path) -> None:
    def rng(n: int) -> bytes:
        return bytes(range(n))

    a, b = init_keys(tmp_path / "a", rng=rng), init_keys(tmp_path / "b", rng=rng)
    assert _raw_private(a) == _raw_private(b) and a.k0 == b.k0


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "k"
    init_keys(d)
    before = {n: (d / n).read_bytes() for n in SECRET_FILES}
    with pytest.raises(KeyFileError) as e:
        init_keys(d)
    assert e.value.code == "KEY_EXISTS"
    assert {n: (d / n).read_bytes() for n in SECRET_FILES} == before


def test_refuses_if_any_single_key_file_exists(tmp_path: Path) -> None:
    d = tmp_path / "k"
    d.mkdir(mode=0o700)
    (d / VAULT_FILE).write_text("00" * 32)
    with pytest.raises(KeyFileError) as e:
        init_keys(d)
    assert e.value.code == "KEY_EXISTS" and VAULT_FILE in str(e.value)
    assert not (d / SIGNING_FILE).exists()


@pytest.mark.parametrize("name", [SIGNING_FILE, TOKEN_FILE, VAULT_FILE, K0_FILE])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_group_or_other_access_is_refused(tmp_path: Path, name: str, mode: int) -> None:
    d = tmp_path / "k"
    init_keys(d)
    os.chmod(d / name, mode)
    with pytest.raises(KeyFileError) as e:
        load_keys(d)
    assert e.value.code == "KEY_PERMISSIONS"
    assert name in str(e.value)


def test_group_writable_key_dir_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "k"
    init_keys(d)
    os.chmod(d, 0o770)
    with pytest.raises(KeyFileError) as e:
        load_keys(d)
    assert e.value.code == "KEY_PERMISSIONS"


@pytest.mark.parametrize("name", [SIGNING_FILE, TOKEN_FILE, VAULT_FILE])
def test_missing_required_file(tmp_path: Path, name: str) -> None:
    d = tmp_path / "k"
    init_keys(d)
    (d / name).unlink()
    with pytest.raises(KeyFileError) as e:
        load_keys(d)
    assert e.value.code == "KEY_MISSING" and name in str(e.value)


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as e:
        load_keys(tmp_path / "nope")
    assert e.value.code == "KEY_MISSING"


def test_k0_escrowed_off_device_is_fine(tmp_path: Path) -> None:
    d = tmp_path / "k"
    made = init_keys(d)
    escrow = load_k0(d / K0_FILE)
    (d / K0_FILE).unlink()
    keys = load_keys(d)
    assert keys.k0 is None and escrow == made.k0


@pytest.mark.parametrize("content", [b"abcd\n", b"zz" * 32, b"00" * 33, b"\xff\xfe" * 32, b""])
def test_malformed_file(tmp_path: Path, content: bytes) -> None:
    d = tmp_path / "k"
    init_keys(d)
    (d / TOKEN_FILE).write_bytes(content)
    with pytest.raises(KeyFileError) as e:
        load_keys(d)
    assert e.value.code == "KEY_MALFORMED" and TOKEN_FILE in str(e.value)


def test_public_key_must_match_signing_key(tmp_path: Path) -> None:
    d = tmp_path / "k"
    init_keys(d)
    other = init_keys(tmp_path / "other")
    os.chmod(d / PUBLIC_FILE, 0o600)
    (d / PUBLIC_FILE).write_text(public_key_hex(other.public_key))
    with pytest.raises(KeyFileError) as e:
        load_keys(d)
    assert e.value.code == "KEY_MALFORMED" and PUBLIC_FILE in str(e.value)


def test_symlinked_secret_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "k"
    init_keys(d)
    target = tmp_path / "elsewhere.key"
    target.write_text((d / VAULT_FILE).read_text())
    os.chmod(target, 0o600)
    (d / VAULT_FILE).unlink()
    (d / VAULT_FILE).symlink_to(target)
    with pytest.raises(KeyFileError) as e:
        load_keys(d)
    assert e.value.code == "KEY_MALFORMED" and VAULT_FILE in str(e.value)


def test_verifier_loaders(tmp_path: Path) -> None:
    d = tmp_path / "k"
    keys = init_keys(d)
    assert public_key_hex(load_public_key(d / PUBLIC_FILE)) == public_key_hex(keys.public_key)
    assert load_k0(d / K0_FILE) == keys.k0
    os.chmod(d / K0_FILE, 0o644)
    with pytest.raises(KeyFileError) as e:
        load_k0(d / K0_FILE)
    assert e.value.code == "KEY_PERMISSIONS"


def test_card_token_is_keyed_hmac(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k")
    tok = card_token(keys.token_key, PAN)
    assert tok == hmac.new(keys.token_key, PAN.encode(), hashlib.sha256).hexdigest()[:32]
    assert len(tok) == 32 and int(tok, 16) >= 0
    assert card_token(keys.token_key, PAN) == tok
    assert card_token(keys.vault_key, PAN) != tok
    assert card_token(keys.token_key, "4111111111111112") != tok
    assert PAN not in tok and hashlib.sha256(PAN.encode()).hexdigest()[:32] != tok


def test_repr_leaks_no_secret(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k")
    text = repr(keys)
    assert keys.token_key.hex() not in text and keys.vault_key.hex() not in text
    assert keys.k0 is not None and keys.k0.hex() not in text


def test_wrong_key_lengths_rejected(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k")
    with pytest.raises(KeyFileError) as e:
        DeviceKeys(keys.signing_key, b"short", keys.vault_key, None)
    assert e.value.code == "KEY_MALFORMED"


def test_guard_fast_card_token_equals_the_reference_hmac() -> None:
    """JournalCrypto precomputes the HMAC pads for speed; it must give keys.card_token's value."""
    import os

    from guard.journal.keys import card_token
    from guard.runtime.service import JournalCrypto

    for key in (os.urandom(32), os.urandom(64), os.urandom(80)):
        jc = JournalCrypto(None, key)  # type: ignore[arg-type]
        for pan in ("4761739001010119", "5413330089020011", "6011000990139424"):
            assert jc.token(pan) == card_token(key, pan)
