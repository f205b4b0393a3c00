"""HMAC-SHA256 (RFC 2104) spelled out with SHA-256 one-shots: the one implementation behind the
journal's entry MACs and key ratchet, card tokens, and the simulators' keyed hashes.

Under OpenSSL 3 ``hmac.digest`` pays a fixed setup cost per call; preparing the padded key blocks
once (or sharing them between the two MACs of a journal entry) is several times cheaper. Tests
pin every function here to ``hmac.digest``.
"""

from __future__ import annotations

import hashlib

from guard.core.constants import JOURNAL_RATCHET_LABEL

_sha256 = hashlib.sha256
_LABEL = JOURNAL_RATCHET_LABEL
_BLOCK = 64  # SHA-256 block size
XOR36 = bytes(b ^ 0x36 for b in range(256))
XOR5C = bytes(b ^ 0x5C for b in range(256))
PAD36 = b"\x36" * 32  # HMAC ipad/opad over the zero-padded half of a 32-byte key
PAD5C = b"\x5c" * 32


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """The (inner, outer) padded key blocks of RFC 2104 for any key length."""
    if len(key) > _BLOCK:
        key = _sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return key.translate(XOR36), key.translate(XOR5C)


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256(key, msg), equal to ``hmac.digest(key, msg, "sha256")``."""
    ki, ko = hmac_pads(key)
    return _sha256(ko + _sha256(ki + msg).digest()).digest()


class HmacSha256:
    """HMAC-SHA256 under one fixed key with the padded-key hash states prepared once (card tokens)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        ki, ko = hmac_pads(key)
        self._inner = _sha256(ki)
        self._outer = _sha256(ko)

    def digest(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def mac_and_next(key: bytes, ehash: bytes) -> tuple[bytes, bytes]:
    """(HMAC-SHA256(k_seq, entry_hash), k_{seq+1} = HMAC-SHA256(k_seq, JOURNAL_RATCHET_LABEL)) for a 32-byte k_seq.

    The two MACs share the padded keys: twice as fast as two ``hmac.digest`` calls. The ratchet is
    one-way, so a stolen current key reveals no earlier key.
    """
    ki = key.translate(XOR36) + PAD36
    ko = key.translate(XOR5C) + PAD5C
    return _sha256(ko + _sha256(ki + ehash).digest()).digest(), _sha256(ko + _sha256(ki + _LABEL).digest()).digest()


def ratchet_forward(key: bytes, steps: int) -> bytes:
    """k_{i+steps} from a 32-byte k_i (a verifier with k0 reaching the start of a later segment)."""
    for _ in range(steps):
        ko = key.translate(XOR5C) + PAD5C
        key = _sha256(ko + _sha256(key.translate(XOR36) + PAD36 + _LABEL).digest()).digest()
    return key
