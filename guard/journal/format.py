"""The journal's entry format, shared by the writer (guard.journal.store) and the verifier
(guard.journal.verify): canonical JSON, entry hashes, signed checkpoint/segment/rotation messages,
and the value types entries and vault blobs travel in.

Entry format::

    body       = '{"kind":K,"payload":P,"ts":T,"txn":X}'   # canonical JSON, P = stored text verbatim
    entry_hash = SHA256(JOURNAL_HASH_DOMAIN || seq (8 bytes BE) || prev_hash || body)
    mac        = HMAC-SHA256(k_seq, entry_hash);   k_{seq+1} = HMAC-SHA256(k_seq, JOURNAL_RATCHET_LABEL)

(the MAC and ratchet: guard.journal.mac).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guard.core.constants import CHECKPOINT_DOMAIN, JOURNAL_HASH_DOMAIN

CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_FIELDS = ("counter", "covers_hash", "covers_seq", "terminal", "time")
VAULT_NONCE_LEN = 12

_enc = json.encoder.encode_basestring_ascii  # the C encoder json.dumps uses
_sha256 = hashlib.sha256

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
# The C encoder ``_CANONICAL.encode`` builds on every call, built once. No circular-reference
# markers: a cyclic payload raises RecursionError instead of ValueError (both are refused).
_c_canonical = (json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _CANONICAL.default, _enc, None, ":", ",", True, False, False)
    if json.encoder.c_make_encoder is not None else None)  # type: ignore[attr-defined]


def canonical_json(obj: Any) -> str:
    """The one JSON form we hash and sign: sorted keys, no spaces, ASCII only, no NaN."""
    if _c_canonical is not None and type(obj) is dict:
        return "".join(_c_canonical(obj, 0))
    return _CANONICAL.encode(obj)


def entry_body(ts: float, kind: str, txn: str | None, payload: str) -> bytes:
    """Canonical JSON of {"kind","payload","ts","txn"} with the stored payload text spliced in verbatim."""
    return f'{{"kind":{_enc(kind)},"payload":{payload},"ts":{ts!r},"txn":{"null" if txn is None else _enc(txn)}}}'.encode()


def entry_hash(seq: int, prev_hash: bytes, body: bytes) -> bytes:
    return _sha256(JOURNAL_HASH_DOMAIN + seq.to_bytes(8, "big") + prev_hash + body).digest()


def checkpoint_message(fields: dict[str, Any]) -> bytes:
    """What a checkpoint signature covers: the domain and the canonical JSON of the signed fields."""
    return CHECKPOINT_DOMAIN + canonical_json({k: fields[k] for k in CHECKPOINT_FIELDS}).encode()


# --- segments: archives, carry-over and key rotation (shared with guard.journal.verify) --------------
#
# The journal is ONE logical chain: seq, prev_hash and the MAC ratchet k_seq (from k0) never
# restart. Compaction (guard.ops.compact) cuts it into files: an archive holds a verbatim range of
# entries (the first archive starts at the genesis checkpoint); the live file then starts with
# a signed ``segment`` record at the next seq (covers the archive's last entry, carries the
# checkpoint counter, the key in force and every key rotation so far), followed by verbatim
# copies of the entries of the transactions that stay live. A ``segment`` record can only be
# MACed by whoever held k_seq at that position, so deleting a file's prefix is still detected.
# ``covers_mac`` is the archived last entry's MAC (made with k_{seq-1}): whoever holds only k_seq
# (root on the device at that time) cannot make it for a forged history, and an auditor with k0
# checks it; verify-chain checks it against the archive's actual last entry.

SEGMENT_KIND = "segment"
ROTATION_KIND = "key_rotation"
SEGMENT_DOMAIN = b"posguard.segment.v1"
ROTATION_DOMAIN = b"posguard.key-rotation.v1"
ARCHIVE_RATCHET_DOMAIN = b"posguard.archive-ratchet.v1"
SEGMENT_FIELDS = ("carried", "counter", "covers_hash", "covers_mac", "covers_seq", "keys", "note", "prev_first_seq",
                  "signing_pub", "terminal", "time")
ROTATION_FIELDS = ("new_pub", "old_pub", "seq", "terminal", "time")
ROLE_ARCHIVE = "archive"


def segment_message(fields: dict[str, Any]) -> bytes:
    """What a segment record's signature covers."""
    return SEGMENT_DOMAIN + canonical_json({k: fields[k] for k in SEGMENT_FIELDS}).encode()


def rotation_message(fields: dict[str, Any]) -> bytes:
    """What a key rotation's ``sig`` (old key) and ``pop`` (new key) cover."""
    return ROTATION_DOMAIN + canonical_json({k: fields[k] for k in ROTATION_FIELDS}).encode()


def archive_ratchet_commitment(key: bytes) -> bytes:
    """Stored in an archive's ratchet row instead of k_{last+1} (one-way: reveals no MAC key)."""
    return _sha256(ARCHIVE_RATCHET_DOMAIN + key).digest()


# --- value types -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    ts: float
    kind: str
    txn: str | None
    payload: dict[str, Any]
    entry_hash: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Seqs of the caller's records, in order, and of the checkpoint appended in the same commit."""

    seqs: tuple[int, ...]
    checkpoint_seq: int | None = None


@dataclass(frozen=True, slots=True, repr=False)
class VaultBlob:
    """AES-GCM sealed card data for one transaction; ``ref`` = sha256(nonce || ct) hex."""

    ref: str
    txn: str
    nonce: bytes
    ct: bytes

    def __repr__(self) -> str:
        return f"VaultBlob(ref={self.ref[:16]}..., txn={self.txn!r}, {len(self.ct)} bytes)"


def vault_ref(nonce: bytes, ct: bytes) -> str:
    return _sha256(nonce + ct).hexdigest()


def seal_vault(vault_key: bytes, txn: str, plaintext: bytes, *, rng: Callable[[int], bytes] = os.urandom) -> VaultBlob:
    """Encrypt ``plaintext`` bound to ``txn`` (AAD) under a fresh 96-bit nonce."""
    nonce = rng(VAULT_NONCE_LEN)
    ct = AESGCM(vault_key).encrypt(nonce, plaintext, txn.encode())
    return VaultBlob(vault_ref(nonce, ct), txn, nonce, ct)


