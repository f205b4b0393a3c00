"""Device keys: the checkpoint signing key, the card-token key, the vault key and k0.

Secrets live as hex text in files readable only by the guard's user (0600, PCI DSS 3.5/3.6), in a
directory separate from the journal. k0 (the journal's initial MAC ratchet key) is written once as
``k0.escrow`` for the auditor; in production it leaves the device after provisioning, so
``DeviceKeys.k0`` is None on a running terminal and the journal never stores it.

Error codes (``KeyFileError.code``): KEY_EXISTS, KEY_MISSING, KEY_MALFORMED, KEY_PERMISSIONS,
KEY_WRITE_FAILED.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from guard.core.errors import KeyFileError
from guard.journal.fsync import fsync_path
from guard.journal.mac import hmac_sha256

SIGNING_FILE = "signing.key"
TOKEN_FILE = "token.key"
VAULT_FILE = "vault.key"
K0_FILE = "k0.escrow"
PUBLIC_FILE = "verify.pub"
SECRET_FILES = (SIGNING_FILE, TOKEN_FILE, VAULT_FILE, K0_FILE)
KEY_LEN = 32
CARD_TOKEN_HEX_LEN = 32

_SECRET_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(repr=False)
class DeviceKeys:
    """The keys a terminal needs. ``k0`` is only needed to create a journal."""

    signing_key: Ed25519PrivateKey
    token_key: bytes
    vault_key: bytes
    k0: bytes | None = field(default=None)

    def __post_init__(self) -> None:
        if len(self.token_key) != KEY_LEN or len(self.vault_key) != KEY_LEN:
            raise KeyFileError("token and vault keys must be 32 bytes", code="KEY_MALFORMED")
        if self.k0 is not None and len(self.k0) != KEY_LEN:
            raise KeyFileError("k0 must be 32 bytes", code="KEY_MALFORMED")

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    def __repr__(self) -> str:
        return f"DeviceKeys(public={public_key_hex(self.public_key)[:16]}..., k0={'set' if self.k0 else 'None'})"


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def card_token(token_key: bytes, pan: str) -> str:
    """Keyed hash of the full PAN (PCI DSS 3.5.1.1): stable per card, useless without the key."""
    return hmac_sha256(token_key, pan.encode("utf-8")).hex()[:CARD_TOKEN_HEX_LEN]


def init_keys(dir: Path, *, rng: Callable[[int], bytes] = os.urandom) -> DeviceKeys:
    """Provision fresh keys into ``dir`` (created 0700); never overwrites an existing key file."""
    dir = Path(dir)
    existing = [n for n in (*SECRET_FILES, PUBLIC_FILE) if os.path.lexists(dir / n)]
    if existing:
        raise KeyFileError(f"{dir / existing[0]} already exists; refusing to overwrite keys", code="KEY_EXISTS")
    if not dir.exists():
        try:
            dir.mkdir(mode=_DIR_MODE, parents=True)
            os.chmod(dir, _DIR_MODE)
        except OSError as e:
            raise KeyFileError(f"cannot create key directory {dir}: {e.strerror or e}", code="KEY_WRITE_FAILED") from None
    _check_dir(dir)
    seeds = {name: rng(KEY_LEN) for name in SECRET_FILES}
    if any(len(s) != KEY_LEN for s in seeds.values()):
        raise KeyFileError("rng returned the wrong number of bytes", code="KEY_MALFORMED")
    signing = Ed25519PrivateKey.from_private_bytes(seeds[SIGNING_FILE])
    files = [(dir / name, secret.hex() + "\n", _SECRET_MODE) for name, secret in seeds.items()]
    files.append((dir / PUBLIC_FILE, public_key_hex(signing.public_key()) + "\n", _PUBLIC_MODE))
    written: list[Path] = []
    try:
        for path, text, mode in files:
            _write_new(path, text, mode)
            written.append(path)
        fsync_path(dir)
    except OSError as e:  # read-only or full file system: leave no half-provisioned set behind
        for path in written:
            path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write keys into {dir}: {e.strerror or e}", code="KEY_WRITE_FAILED") from None
    return DeviceKeys(signing, seeds[TOKEN_FILE], seeds[VAULT_FILE], seeds[K0_FILE])


def load_keys(dir: Path) -> DeviceKeys:
    """Load the device keys; k0 is loaded only if ``k0.escrow`` is still present."""
    dir = Path(dir)
    _check_dir(dir)
    signing = Ed25519PrivateKey.from_private_bytes(_read_secret(dir / SIGNING_FILE))
    token = _read_secret(dir / TOKEN_FILE)
    vault = _read_secret(dir / VAULT_FILE)
    k0 = _read_secret(dir / K0_FILE) if os.path.lexists(dir / K0_FILE) else None
    pub_path = dir / PUBLIC_FILE
    if os.path.lexists(pub_path):
        pub = load_public_key(pub_path)
        if public_key_hex(pub) != public_key_hex(signing.public_key()):
            raise KeyFileError(f"{pub_path} does not match {dir / SIGNING_FILE}", code="KEY_MALFORMED")
    return DeviceKeys(signing, token, vault, k0)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The checkpoint verification key (hex text); may be world-readable."""
    return Ed25519PublicKey.from_public_bytes(_parse_hex(Path(path), _read_text(Path(path), secret=False)))


def load_k0(path: Path) -> bytes:
    """The auditor's escrowed k0, for verifying journal MACs. Same permission rules as any secret."""
    return _read_secret(Path(path))


def _check_dir(dir: Path) -> None:
    try:
        st = os.stat(dir)
    except FileNotFoundError:
        raise KeyFileError(f"key directory {dir} does not exist", code="KEY_MISSING") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"{dir} is not a directory", code="KEY_MALFORMED")
    if st.st_mode & 0o022:
        raise KeyFileError(f"key directory {dir} is writable by group or others", code="KEY_PERMISSIONS")


def _read_secret(path: Path) -> bytes:
    return _parse_hex(path, _read_text(path, secret=True))


def _read_text(path: Path, *, secret: bool) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} is missing", code="KEY_MISSING") from None
    except OSError as e:
        raise KeyFileError(f"key file {path} cannot be opened ({e.strerror})", code="KEY_MALFORMED") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file", code="KEY_MALFORMED")
        if secret and st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; group/other must have no access (0600)",
                code="KEY_PERMISSIONS",
            )
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} is not hex text", code="KEY_MALFORMED") from None


def _parse_hex(path: Path, text: str) -> bytes:
    text = text.strip()
    if len(text) != 2 * KEY_LEN:
        raise KeyFileError(f"key file {path} must hold {2 * KEY_LEN} hex characters", code="KEY_MALFORMED")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"key file {path} is not hex text", code="KEY_MALFORMED") from None


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


# --- rotation and auditor export (guard.ops.rotation drives the journal side) ---------------------
#
# A rotation in progress is visible on disk: ``signing.key.next`` (0600) and ``verify.pub.next``
# hold the new key until the journal has recorded it; then ``verify.pubs`` (the public key chain,
# oldest first) gains the new key, ``verify.pub`` and finally ``signing.key`` are replaced
# (atomic renames). Every step is idempotent, so an interrupted rotation is finished by running
# it again. Error codes: KEY_ROTATION_PENDING, plus those above.

NEXT_SIGNING_FILE = "signing.key.next"
NEXT_PUBLIC_FILE = "verify.pub.next"
PUBLIC_CHAIN_FILE = "verify.pubs"
VERIFIER_README = "README.txt"


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """One or more public keys (hex, one per line; blank lines and ``#`` comments ignored)."""
    path = Path(path)
    lines = [ln.strip() for ln in _read_text(path, secret=False).splitlines()]
    keys = [Ed25519PublicKey.from_public_bytes(_parse_hex(path, ln)) for ln in lines if ln and not ln.startswith("#")]
    if not keys:
        raise KeyFileError(f"{path} holds no public key", code="KEY_MALFORMED")
    return keys


def public_key_chain(dir: Path) -> list[str]:
    """The device's signing keys, oldest first (hex): ``verify.pubs``, else just ``verify.pub``."""
    dir = Path(dir)
    chain_path = dir / PUBLIC_CHAIN_FILE
    if os.path.lexists(chain_path):
        return [public_key_hex(k) for k in load_public_keys(chain_path)]
    return [public_key_hex(load_public_key(dir / PUBLIC_FILE))]


def rotation_keys(dir: Path, *, rng: Callable[[int], bytes] = os.urandom) -> tuple[DeviceKeys, Ed25519PrivateKey]:
    """Step 1 of a rotation: (current keys, new signing key). The new key is written as
    ``signing.key.next`` (0600) + ``verify.pub.next`` unless a pending one exists (then reused)."""
    dir = Path(dir)
    _check_dir(dir)
    current = DeviceKeys(Ed25519PrivateKey.from_private_bytes(_read_secret(dir / SIGNING_FILE)),
                         _read_secret(dir / TOKEN_FILE), _read_secret(dir / VAULT_FILE),
                         _read_secret(dir / K0_FILE) if os.path.lexists(dir / K0_FILE) else None)
    nxt = dir / NEXT_SIGNING_FILE
    if os.path.lexists(nxt):
        new = Ed25519PrivateKey.from_private_bytes(_read_secret(nxt))
    else:
        seed = rng(KEY_LEN)
        if len(seed) != KEY_LEN:
            raise KeyFileError("rng returned the wrong number of bytes", code="KEY_MALFORMED")
        new = Ed25519PrivateKey.from_private_bytes(seed)
        _write_new(nxt, seed.hex() + "\n", _SECRET_MODE)
    pub_next = dir / NEXT_PUBLIC_FILE
    if not os.path.lexists(pub_next):
        _write_new(pub_next, public_key_hex(new.public_key()) + "\n", _PUBLIC_MODE)
    fsync_path(dir)
    return current, new


def finish_rotation(dir: Path) -> str:
    """Last step, after the journal recorded the new key: update the chain, then swap the files.
    Idempotent; returns the new public key (hex). A no-op if no rotation is pending."""
    dir = Path(dir)
    _check_dir(dir)
    nxt = dir / NEXT_SIGNING_FILE
    if not os.path.lexists(nxt):
        return public_key_hex(load_public_key(dir / PUBLIC_FILE))
    new = Ed25519PrivateKey.from_private_bytes(_read_secret(nxt))
    new_hex = public_key_hex(new.public_key())
    old_hex = public_key_hex(Ed25519PrivateKey.from_private_bytes(_read_secret(dir / SIGNING_FILE)).public_key())
    chain = public_key_chain(dir) if os.path.lexists(dir / PUBLIC_CHAIN_FILE) else [old_hex]
    if chain[-1] != new_hex:
        _replace(dir / PUBLIC_CHAIN_FILE, "".join(k + "\n" for k in (*chain, new_hex)), _PUBLIC_MODE)
    pub_next = dir / NEXT_PUBLIC_FILE
    if os.path.lexists(pub_next):
        os.replace(pub_next, dir / PUBLIC_FILE)
    else:
        _replace(dir / PUBLIC_FILE, new_hex + "\n", _PUBLIC_MODE)
    os.chmod(nxt, _SECRET_MODE)
    os.replace(nxt, dir / SIGNING_FILE)
    fsync_path(dir)
    return new_hex


def export_verifier(dir: Path, outdir: Path) -> list[Path]:
    """Write what an auditor needs to OUTDIR (created 0700; nothing overwritten): ``verify.pub``
    (current key), ``verify.pubs`` (key chain, oldest first), ``k0.escrow`` (0600, if still in
    DIR) and a README. Returns the files written."""
    dir, outdir = Path(dir), Path(outdir)
    _check_dir(dir)
    if os.path.lexists(dir / NEXT_SIGNING_FILE):
        raise KeyFileError(f"a key rotation is pending in {dir}; finish it (posguard keys rotate) first",
                           code="KEY_ROTATION_PENDING")
    chain = public_key_chain(dir)
    current = public_key_hex(load_public_key(dir / PUBLIC_FILE))
    if chain[-1] != current:
        raise KeyFileError(f"{dir / PUBLIC_CHAIN_FILE} does not end with {dir / PUBLIC_FILE}", code="KEY_MALFORMED")
    k0 = load_k0(dir / K0_FILE) if os.path.lexists(dir / K0_FILE) else None
    names = [PUBLIC_FILE, PUBLIC_CHAIN_FILE, VERIFIER_README] + ([K0_FILE] if k0 else [])
    if outdir.exists():
        clash = [n for n in names if os.path.lexists(outdir / n)]
        if clash:
            raise KeyFileError(f"{outdir / clash[0]} already exists; refusing to overwrite", code="KEY_EXISTS")
    else:
        outdir.mkdir(mode=_DIR_MODE, parents=True)
        os.chmod(outdir, _DIR_MODE)
    _write_new(outdir / PUBLIC_FILE, current + "\n", _PUBLIC_MODE)
    _write_new(outdir / PUBLIC_CHAIN_FILE, "".join(k + "\n" for k in chain), _PUBLIC_MODE)
    if k0 is not None:
        _write_new(outdir / K0_FILE, k0.hex() + "\n", _SECRET_MODE)
    _write_new(outdir / VERIFIER_README, _README.format(n=len(chain)), _PUBLIC_MODE)
    fsync_path(outdir)
    return [outdir / n for n in names]


_README = """posguard verifier material
verify.pub   the terminal's current checkpoint signing key (Ed25519, hex)
verify.pubs  every signing key it has used, oldest first ({n} key(s)); the journal records each
             rotation, so any one of them anchors the chain
k0.escrow    the journal's initial MAC key (SECRET: keep it 0600, off the terminal)

  posguard journal verify JOURNAL --k0 k0.escrow --pubkey verify.pub
  posguard journal verify-chain ARCHIVE... JOURNAL --k0 k0.escrow --pubkey verify.pubs
"""


def _replace(path: Path, text: str, mode: int) -> None:
    """Atomic write: a fresh temp file (O_EXCL, ``mode``), fsync, rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    _write_new(tmp, text, mode)
    os.replace(tmp, path)
