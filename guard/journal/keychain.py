"""Signature checks for journal verification: which signing key must have signed each checkpoint
(the trusted keys extended along the journal's ``key_rotation`` records) and anchor well-formedness."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guard.journal.format import (
    CHECKPOINT_FIELDS,
    ROTATION_FIELDS,
    ROTATION_KIND,
    SEGMENT_KIND,
    checkpoint_message,
    rotation_message,
)
from guard.journal.keys import public_key_hex
from guard.journal.records import MAX_PAYLOAD_CHARS
from guard.journal.schema import MARKED_KINDS_SQL

CP_KEYS = frozenset((*CHECKPOINT_FIELDS, "sig"))
_ROT_KEYS = frozenset((*ROTATION_FIELDS, "sig", "pop"))
# NULL instead of a payload longer than the journal writes (never loaded; the scan reports it).
_BOUNDED_PAYLOAD = f"CASE WHEN length(CAST(payload AS BLOB)) <= {MAX_PAYLOAD_CHARS} THEN payload END"


def anchor_problem(a: Any, pub: Ed25519PublicKey | None) -> str:
    if not isinstance(a, dict) or set(a) != CP_KEYS:
        return "anchor must be a checkpoint dict with fields " + ", ".join(sorted(CP_KEYS))
    seq, h = a["covers_seq"], a["covers_hash"]
    if not (type(seq) is int and seq >= 0 and isinstance(h, str) and len(h) == 64 and isinstance(a["terminal"], str)):
        return "anchor covers_seq/covers_hash/terminal malformed"
    try:
        bytes.fromhex(h)
        sig = bytes.fromhex(a["sig"])
    except (TypeError, ValueError):
        return "anchor covers_hash/sig is not hex"
    if pub is not None:
        try:
            pub.verify(sig, checkpoint_message(a))
        except (InvalidSignature, TypeError, ValueError):
            return "anchor signature does not verify with the given public key"
    return ""


class KeyChain:
    """Which key must have signed each checkpoint: the trusted keys, extended along the rotations
    the journal records (segment ``keys`` + ``key_rotation`` entries). ``active`` is False when no
    key was given (signatures are then not checked, as before)."""

    def __init__(self, trusted: list[Ed25519PublicKey]) -> None:
        self.trusted = trusted
        self.active = bool(trusted)
        self.problem = ""
        self.chain: list[str] = []  # hex, oldest first; [] = no rotation known (key in force: a trusted key)
        self.index = 0  # position of the key in force in ``chain``
        self.current: Ed25519PublicKey | None = trusted[0] if len(trusted) == 1 else None
        self.pending: Ed25519PublicKey | None = None

    @classmethod
    def load(cls, conn: sqlite3.Connection, trusted: list[Ed25519PublicKey]) -> KeyChain:
        kc = cls(trusted)
        if not kc.active:
            return kc
        first = conn.execute(f"SELECT kind, {_BOUNDED_PAYLOAD} FROM entries ORDER BY seq LIMIT 1").fetchone()
        carried: list[Any] = []
        start_pub = None
        if first is not None and first[0] == SEGMENT_KIND:
            try:
                seg = json.loads(first[1])
                carried, start_pub = list(seg["keys"]), str(seg["signing_pub"])
            except (ValueError, KeyError, TypeError):
                return kc  # the scan reports the malformed segment record at its seq
        in_file = []
        for (payload,) in conn.execute(f"SELECT {_BOUNDED_PAYLOAD} FROM entries WHERE {MARKED_KINDS_SQL} "
                                       "AND kind = ? ORDER BY seq", (ROTATION_KIND,)):
            try:
                in_file.append(json.loads(payload))
            except (ValueError, TypeError):
                break
        for st in carried + in_file:
            if not rotation_ok(st) or (kc.chain and st["old_pub"] != kc.chain[-1]):
                break  # the scan (or the segment check) reports it
            kc.chain = kc.chain or [st["old_pub"]]
            kc.chain.append(st["new_pub"])
        if not kc.chain and start_pub is not None:
            kc.chain = [start_pub]
        if kc.chain:
            known = {public_key_hex(k) for k in trusted}
            if not known & set(kc.chain):
                kc.problem = ("none of the given public keys is in this journal's signing key chain "
                              f"({', '.join(k[:16] + '...' for k in kc.chain)})")
                return kc
            kc.index = min(len(carried), len(kc.chain) - 1)
            kc.current = pub_key(kc.chain[kc.index])
        return kc

    def signed_by_chain(self, cp: dict[str, Any]) -> bool:
        keys = [pub_key(h) for h in self.chain] if self.chain else self.trusted
        return any(sig_ok(k, cp["sig"], checkpoint_message(cp)) for k in keys if k is not None)

    def check_checkpoint(self, cp: dict[str, Any]) -> bool:
        """Verify a checkpoint with the key in force; a pending rotation takes effect after it."""
        msg = checkpoint_message(cp)
        if self.current is None:  # several trusted keys, no rotation: the first checkpoint decides
            self.current = next((k for k in self.trusted if sig_ok(k, cp["sig"], msg)), None)
            if self.current is None:
                return False
        elif not sig_ok(self.current, cp["sig"], msg):
            return False
        if self.pending is not None:
            self.current, self.pending = self.pending, None
            self.index += 1
        return True

    def current_hex(self) -> str | None:
        return public_key_hex(self.current) if self.current is not None else None


def pub_key(h: str) -> Ed25519PublicKey | None:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(h))
    except (TypeError, ValueError):
        return None


def sig_ok(key: Ed25519PublicKey, sig_hex: Any, msg: bytes) -> bool:
    try:
        key.verify(bytes.fromhex(sig_hex), msg)
        return True
    except (InvalidSignature, TypeError, ValueError):
        return False


def rotation_ok(st: Any) -> bool:
    """A rotation statement: its fields, the old key's signature and the new key's proof of possession."""
    if not isinstance(st, dict) or set(st) != _ROT_KEYS:
        return False
    try:
        msg = rotation_message(st)
    except (TypeError, ValueError):
        return False
    old, new = pub_key(st["old_pub"]) if isinstance(st["old_pub"], str) else None, \
        pub_key(st["new_pub"]) if isinstance(st["new_pub"], str) else None
    return (old is not None and new is not None and st["old_pub"] != st["new_pub"]
            and sig_ok(old, st["sig"], msg) and sig_ok(new, st["pop"], msg))
