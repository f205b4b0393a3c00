"""Signed configuration: the terminal/merchant ids, the host identity and the files the config
names (CA, client certificate and key, ISO 8583 spec) cannot drift silently.

The acquirer (or whoever provisions the terminal) holds an Ed25519 config-signing key off the
terminal; the terminal's key directory holds only its public half, ``config.pub``. ``config sign``
writes ``guard.toml.sig``, a JSON document: the SHA-256 of the config's exact bytes, the SHA-256 of
every file the config names (``NAMED_FILES``, as the config resolves them), and an Ed25519 signature
over the canonical statement of both (``statement``). At every start the daemon reads the config
ONCE, and over those bytes:

- with ``config.pub`` present: refuses to start unless the signature verifies, the config digest
  matches (CONFIG_SIGNATURE_INVALID) and every named file still has its signed digest
  (CONFIG_FILE_CHANGED, naming the key and the file). A signature in the old format (hex over the
  config bytes alone) binds no file and is refused;
- always: compares what a signature is for (``IDENTITY_KEYS``: terminal and merchant ids, the
  host's identity, the spec, the money-related limits and response-code classes, plus the named
  files' digests) with what was journaled at the last successful start and refuses an unsigned
  change (CONFIG_CHANGED_UNSIGNED, naming the keys and how to sign); other keys (a comment, the
  log level, the reader URL, timers) may change freely. After a successful start it journals
  ``config_loaded`` (hash, identity, file digests, signed, ids, host), so the journal shows which
  configuration every sale ran under.

This is the "receiving account mismatch" defence at configuration time; the echo check of
fields 4/11/41/42 on every response is the defence at run time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.core.errors import ConfigError, PosguardError
from posguard.config import Config, from_bytes

CONFIG_PUB = "config.pub"
SIGNER_KEY = "config-signer.key"
SIG_FORMAT = "posguard-config-signature/2"
# Config keys naming a file whose contents decide who the terminal trusts and talks to.
NAMED_FILES = ("host.cafile", "host.certfile", "host.keyfile", "host.spec")
# What an unsigned config may not change silently: who the terminal is, whom it talks to and trusts,
# how it reads answers, and how much money it lets through. Everything else (log level, reader port,
# timers, journal cadence) changes freely without a signature.
IDENTITY_KEYS = (
    "terminal.terminal_id", "terminal.merchant_id",
    "host.address", "host.port", "host.tls", "host.server_hostname", "host.header", "host.tpdu", "host.spec",
    "host.cafile", "host.certfile", "host.keyfile", "host.partial_amount_field", "host.ksn_field", "host.reversal_icc",
    "response_codes.approved", "response_codes.partial", "response_codes.declined", "response_codes.duplicate",
    "policy.card_max_amount", "policy.terminal_max_amount", "policy.confirm_amount", "policy.signature_above",
    "policy.card_max_count", "policy.terminal_max_count", "policy.double_swipe_window",
    "offline.enabled", "offline.max_sale_amount", "offline.max_total_amount", "offline.max_count",
    "offline.chip_floor_limit", "offline.contactless_floor_limit", "offline.manual_floor_limit",
    "reader.partial_approvals",
)
SIGN_HOW = ("sign it: posguard config init-signer DIR (once, off the terminal; copy DIR/config.pub into the key "
            "directory), then posguard config sign CONFIG --key DIR/config-signer.key; or restore the previous values")


class ConfigSignatureError(PosguardError):
    code = "CONFIG_SIGNATURE_INVALID"


class ConfigFileChangedError(ConfigSignatureError):
    code = "CONFIG_FILE_CHANGED"


def named_files(cfg: Config) -> dict[str, Path]:
    """The files ``cfg`` names (resolved paths), by config key; built-in specs name no file."""
    from guard.hostlink.iso import BUILTIN_SPECS

    return {k: Path(cfg[k]) for k in NAMED_FILES if cfg[k] and not (k == "host.spec" and cfg[k] in BUILTIN_SPECS)}


def file_digests(files: Mapping[str, Path]) -> dict[str, str]:
    """SHA-256 (hex) of each named file's contents, by config key."""
    out = {}
    for key, path in sorted(files.items()):
        try:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            raise ConfigError(key, f"cannot read {path}: {e.strerror or e}") from None
    return out


def statement(config_sha256: str, files: Mapping[str, str]) -> bytes:
    """The exact bytes signed: the format, the config digest and every named file's digest."""
    return json.dumps({"format": SIG_FORMAT, "config_sha256": config_sha256, "files": dict(files)},
                      sort_keys=True, separators=(",", ":")).encode()


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
    """Write ``<config>.sig``: Ed25519 over the config's digest and those of the files it names."""
    try:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(signer_key.read_text().strip()))
    except (OSError, ValueError) as e:
        raise PosguardError(f"cannot read the config signer key {signer_key}: {e}", code="KEY_MALFORMED") from None
    out = config_path.with_name(config_path.name + ".sig")
    try:
        raw = config_path.read_bytes()
    except OSError as e:
        raise ConfigError("(file)", f"cannot read {config_path}: {e.strerror}") from None
    cfg = from_bytes(raw, config_path)
    doc: dict[str, Any] = {"format": SIG_FORMAT, "config_sha256": hashlib.sha256(raw).hexdigest(),
                           "files": file_digests(named_files(cfg))}
    doc["signature"] = key.sign(statement(doc["config_sha256"], doc["files"])).hex()
    try:
        out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise PosguardError(f"cannot sign {config_path} into {out}: {e.strerror or e}", code="CONFIG_SIGN_FAILED") from None
    return out


def _read_signature(sig_path: Path) -> tuple[str, dict[str, str], bytes]:
    """(config digest, file digests, signature) from a ``.sig`` file; anything else fails closed."""
    try:
        doc = json.loads(sig_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != SIG_FORMAT:
        raise ConfigSignatureError(
            f"{sig_path.name} is not a {SIG_FORMAT} signature (an older signature covers the config's bytes but not "
            "the files it names): re-sign the config with posguard config sign")
    try:
        files, digest, sig = doc["files"], doc["config_sha256"], bytes.fromhex(doc["signature"])
        if not (isinstance(digest, str) and isinstance(files, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ConfigSignatureError(f"{sig_path.name} is malformed: re-sign the config with posguard config sign") from None
    return digest, files, sig
def check(config_path: Path, keys_dir: Path, data: bytes | None = None,
          files: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """Verify the signature if the terminal has ``config.pub``; return what to journal.

    ``data`` are the config bytes the caller parsed (read here only if not given: never read the
    config twice), ``files`` the files it names (``named_files``)."""
    if data is None:
        data = config_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    named = dict(files or {})
    current = file_digests(named)
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
        signed_digest, signed_files, sig = _read_signature(sig_path)
        try:
            pub.verify(sig, statement(signed_digest, signed_files))
            if signed_digest != digest:
                raise InvalidSignature
        except InvalidSignature:
            raise ConfigSignatureError(
                f"the signature in {sig_path.name} does not match {config_path.name}: the config was changed after "
                "signing, or signed by another key. Restore the signed file or have it re-signed.") from None
        for key in sorted(set(current) | set(signed_files)):
            if current.get(key) != signed_files.get(key):
                raise ConfigFileChangedError(
                    f"{key} ({named.get(key, 'not named')}) changed after {config_path.name} was signed: restore the "
                    "signed file or have the config re-signed")
        signed = True
    return {"sha256": digest, "signed": signed, "files": current}
def identity(cfg: Config, files: Mapping[str, str]) -> dict[str, Any]:
    """The values of ``IDENTITY_KEYS`` and the named files' digests (``files:<key>``): what
    ``changed_unsigned`` compares between starts."""
    out: dict[str, Any] = {k: cfg[k] for k in IDENTITY_KEYS}
    out.update((f"files:{k}", v) for k, v in sorted(files.items()))
    return out


def _legacy_identity(payload: Mapping[str, Any], ident: Mapping[str, Any]) -> dict[str, Any]:
    """A ``config_loaded`` written before ``identity`` was journaled: the ids and host it holds."""
    host = f"{ident['host.address']}:{ident['host.port']}"
    return {"terminal.terminal_id": payload.get("tid", ident["terminal.terminal_id"]),
            "terminal.merchant_id": payload.get("mid", ident["terminal.merchant_id"]),
            "host.address:port": payload.get("host", host), "host.tls": payload.get("tls", ident["host.tls"])}


def changed_unsigned(journal_entries: Any, record: dict[str, Any]) -> list[str]:
    """The identity keys that differ from the last successful start's, if this config is not signed
    (else, or on the first start, [])."""
    last = None
    for e in journal_entries:
        if e.kind == "config_loaded":
            last = e.payload
    if last is None or record["signed"]:
        return []
    ident = record["identity"]
    before = last.get("identity")
    if not isinstance(before, dict):
        now = dict(_legacy_identity({}, ident))
        before = _legacy_identity(last, ident)
        return sorted(k for k in now if now[k] != before[k])
    return sorted(k for k in set(ident) | set(before) if ident.get(k) != before.get(k))


def unsigned_change_error(source: Path, changed: list[str]) -> ConfigSignatureError:
    """CONFIG_CHANGED_UNSIGNED naming what changed and how to sign."""
    return ConfigSignatureError(
        f"{source} changed since the last successful start ({', '.join(changed)}) and is not signed: terminal and "
        f"merchant ids, the host, its trust files, the spec and money limits may not change silently. To accept the "
        f"change, {SIGN_HOW}", code="CONFIG_CHANGED_UNSIGNED")
