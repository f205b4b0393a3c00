"""Bloom filter of transaction keys held by the journal but not in memory."""

from __future__ import annotations

from guard.core.model import txn_key_hash


class KeyFilter:
    """Bloom filter of transaction keys the journal holds but memory does not (evicted, pruned).

    A new transaction id is then looked up in the journal only when it may be there: the common
    case, a genuinely new id, costs no SQLite query. False positives only cost that query; there
    are no false negatives. 2^20 bits (128 KiB), 3 probes: ~2% false positives at 100,000 keys.
    """

    __slots__ = ("bits",)
    LOG2_BITS = 20

    def __init__(self) -> None:
        self.bits = bytearray(1 << (self.LOG2_BITS - 3))

    @staticmethod
    def _probes(h: int) -> tuple[int, int, int]:
        h &= 0xFFFF_FFFF_FFFF_FFFF
        m = (1 << KeyFilter.LOG2_BITS) - 1
        return h & m, (h >> 21) & m, (h >> 42) & m

    def add(self, key: str) -> None:
        self.add_hash(txn_key_hash(key))

    def add_hash(self, h: int) -> None:
        """Add a key known only by ``model.txn_key_hash`` (the archived-id index stores that)."""
        bits = self.bits
        for p in self._probes(h):
            bits[p >> 3] |= 1 << (p & 7)

    def __contains__(self, key: str) -> bool:
        bits = self.bits
        return all(bits[p >> 3] & (1 << (p & 7)) for p in self._probes(txn_key_hash(key)))

