"""Signed configuration: the terminal/merchant ids and the host identity cannot drift silently.

The acquirer (or whoever provisions the terminal) holds an Ed25519 config-signing key off the
terminal; the terminal's key directory holds only its public half, ``config.pub``. A config is
signed over its exact bytes into ``guard.toml.sig`` (hex). At every start the daemon:

- with ``config.pub`` present: refuses to start unless the signature verifies
  (CONFIG_SIGNATURE_INVALID);
- always: compares the config's SHA-256 with the one journaled at the last start and refuses an
  unsigned change (CONFIG_CHANGED_UNSIGNED), then journals ``config_loaded`` (hash, signed, ids,
  host), so the journal shows which configuration every sale ran under.

This is the "receiving account mismatch" defence at configuration time; the echo check of
fields 4/11/41/42 on every response is the defence at run time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.core.errors import ConfigError, PosguardError

CONFIG_PUB = "config.pub"
SIGNER_KEY = "config-signer.key"


class ConfigSignatureError(PosguardError):
    code = "CONFIG_SIGNATURE_INVALID"


def init_signer(directory: Path) -> Path:
    """Create a config-signing key pair: ``config-signer.key`` (keep off the terminal, 0600)
    and ``config.pub`` (copy into each terminal's key directory)."""
    key_path, pub_path = directory / SIGNER_KEY, directory / CONFIG_PUB
    if key_path.exists() or pub_path.exists():
        raise PosguardError(f"{directory} already holds a config signer", code="KEY_EXISTS")
    key = Ed25519PrivateKey.generate()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.private_bytes_raw().hex() + "\n")
        pub_path.write_text(key.public_key().public_bytes_raw().hex() + "\n")
    except OSError as e:
        raise PosguardError(f"cannot write the config signer into {directory}: {e.strerror or e}",
                            code="KEY_WRITE_FAILED") from None
    return pub_path


def sign(config_path: Path, signer_key: Path) -> Path:
    """Write ``<config>.sig``: Ed25519 over the file's exact bytes."""
    try:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(signer_key.read_text().strip()))
    except (OSError, ValueError) as e:
        raise PosguardError(f"cannot read the config signer key {signer_key}: {e}", code="KEY_MALFORMED") from None
    out = config_path.with_name(config_path.name + ".sig")
    try:
        sig = key.sign(config_path.read_bytes())
        out.write_text(sig.hex() + "\n")
    except OSError as e:
        raise PosguardError(f"cannot sign {config_path} into {out}: {e.strerror or e}", code="CONFIG_SIGN_FAILED") from None
    return out


def check(config_path: Path, keys_dir: Path) -> dict[str, Any]:
    """Verify the signature if the terminal has ``config.pub``; return what to journal."""
    data = config_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    pub_path = keys_dir / CONFIG_PUB
    sig_path = config_path.with_name(config_path.name + ".sig")
    signed = False
    if sig_path.exists() or pub_path.exists():
        if not pub_path.exists():
            raise ConfigSignatureError(f"{sig_path.name} exists but {pub_path} does not: provision the config public key")
        try:
            pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_path.read_text().strip()))
        except (OSError, ValueError):
            raise ConfigError("(signature)", f"{pub_path} is not a readable Ed25519 public key in hex") from None
        if not sig_path.exists():
            raise ConfigSignatureError(f"this terminal requires a signed config: {sig_path} is missing")
        try:
            pub.verify(bytes.fromhex(sig_path.read_text().strip()), data)
        except (InvalidSignature, ValueError, OSError):
            raise ConfigSignatureError(
                f"the signature in {sig_path.name} does not match {config_path.name}: the config was changed after "
                "signing, or signed by another key. Restore the signed file or have it re-signed.") from None
        signed = True
    return {"sha256": digest, "signed": signed}


def changed_unsigned(journal_entries: Any, record: dict[str, Any]) -> str | None:
    """The previous config hash if this config differs from it and is not signed, else None."""
    last = None
    for e in journal_entries:
        if e.kind == "config_loaded":
            last = e.payload.get("sha256")
    if last is not None and last != record["sha256"] and not record["signed"]:
        return str(last)
    return None
