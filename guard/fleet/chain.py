"""Incremental verification of one terminal's chain: the state a fleet keeps between uploads.

``ChainState`` is what the fleet database stores per terminal: the next seq it expects, the hash
and MAC of the last entry, the MAC ratchet key k_next (derived from the escrowed k0), the
checkpoint counter and the signing key in force. ``feed`` checks new entries exactly as
``guard.journal.verify`` does for a whole file (hash, link, MAC, checkpoint payload, counter,
terminal, signature, key rotations, a segment record that starts a file) but starting from the
stored state, so each entry is checked once, when it arrives. The first anomaly raises
``ChainReject`` with the seq and a reason code from ``guard.journal.verify``'s vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from guard.core.constants import GENESIS_HASH, JOURNAL_HASH_DOMAIN
from guard.journal.format import (
    CHECKPOINT_KIND,
    ROTATION_KIND,
    SEGMENT_FIELDS,
    SEGMENT_KIND,
    checkpoint_message,
    entry_body,
    entry_hash,
    segment_message,
)
from guard.journal.keychain import CP_KEYS, pub_key, rotation_ok, sig_ok
from guard.journal.mac import mac_and_next

_SEG_KEYS = frozenset((*SEGMENT_FIELDS, "sig"))
_SPECIAL = frozenset({CHECKPOINT_KIND, ROTATION_KIND, SEGMENT_KIND})
Row = tuple[Any, ...]  # seq, ts, kind, txn, payload (text), prev_hash, entry_hash, mac


class ChainReject(Exception):
    """The first entry that does not continue the verified chain: ``reason`` (a verify code) and ``seq``."""

    def __init__(self, reason: str, seq: int, detail: str) -> None:
        super().__init__(f"{reason} at seq {seq}: {detail}")
        self.reason, self.seq, self.detail = reason, seq, detail


@dataclass
class ChainState:
    """Everything needed to verify the next entry of one terminal (JSON-serialisable via ``to_json``)."""

    terminal: str
    next_seq: int
    last_hash: bytes
    last_mac: bytes
    key: bytes  # k_{next_seq}
    cp_counter: int
    signing_pub: str  # hex of the key in force
    pending_pub: str = ""
    last_cp_seq: int = 0
    last_cp: str = ""  # the newest verified checkpoint's payload (canonical text as journaled)

    @classmethod
    def genesis(cls, terminal: str, k0: bytes, first_pub: str) -> ChainState:
        return cls(terminal, 1, GENESIS_HASH, b"", k0, 0, first_pub)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("last_hash", "last_mac", "key"):
            d[k] = d[k].hex()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChainState:
        d = dict(d)
        for k in ("last_hash", "last_mac", "key"):
            d[k] = bytes.fromhex(d[k])
        return cls(**d)

    def feed(self, rows: Iterable[Row], *, file_first_seq: int) -> int:
        """Check and absorb ``rows`` (consecutive, starting at ``next_seq``); returns how many.

        ``file_first_seq``: the first seq of the uploaded file (a segment record may only start a file).
        The loop accepts a plain entry inline when its hash, link and MAC match; anything else
        (a record with payload checks, any mismatch) goes through ``_one``, which raises the exact
        failure. On a ``ChainReject`` the state stays at the entry before the failing one.
        """
        sha, enc, dom, mac_next = hashlib.sha256, json.encoder.encode_basestring_ascii, JOURNAL_HASH_DOMAIN, mac_and_next
        special = _SPECIAL
        n = 0
        nseq, last, key = self.next_seq, self.last_hash, self.key
        last_mac = self.last_mac
        for row in rows:
            seq, ts, kind, txn, payload, prev, h, mac = row
            if seq == nseq and prev == last and kind not in special and type(kind) is str:
                try:
                    ok = sha(dom + seq.to_bytes(8, "big") + prev + (
                        f'{{"kind":{enc(kind)},"payload":{payload},"ts":{ts!r},"txn":{"null" if txn is None else enc(txn)}}}'
                    ).encode()).digest() == h
                except (TypeError, ValueError, OverflowError, AttributeError):
                    ok = False
                if ok:
                    m, nxt = mac_next(key, h)
                    if m == mac:
                        nseq, last, key, last_mac = seq + 1, h, nxt, mac
                        n += 1
                        continue
            self.next_seq, self.last_hash, self.key, self.last_mac = nseq, last, key, last_mac
            self._one(row, file_first_seq)
            nseq, last, key, last_mac = self.next_seq, self.last_hash, self.key, self.last_mac
            n += 1
        self.next_seq, self.last_hash, self.key, self.last_mac = nseq, last, key, last_mac
        return n

    def _one(self, row: Row, file_first: int) -> None:
        seq, ts, kind, txn, payload, prev, h, mac = row
        if seq != self.next_seq:
            raise ChainReject("ENTRY_MISSING", self.next_seq, f"expected entry {self.next_seq}, found {seq}")
        try:
            calc = entry_hash(seq, prev, entry_body(ts, kind, txn, payload))
        except (TypeError, ValueError, OverflowError):
            calc = None
        if calc != h:
            raise ChainReject("ENTRY_MODIFIED", seq, f"stored hash of entry {seq} does not match its contents")
        if prev != self.last_hash:
            raise ChainReject("CHAIN_BROKEN", seq, f"entry {seq} does not link to entry {seq - 1} the fleet holds")
        m, nxt = mac_and_next(self.key, h)
        if m != mac:
            raise ChainReject("MAC_INVALID", seq, f"MAC of entry {seq} does not match k_{seq} from the escrowed k0")
        if kind == CHECKPOINT_KIND:
            self._checkpoint(seq, payload)
        elif kind == ROTATION_KIND:
            self._rotation(seq, payload)
        elif kind == SEGMENT_KIND:
            self._segment(seq, payload, file_first)
        self.key, self.last_hash, self.last_mac, self.next_seq = nxt, h, mac, seq + 1

    def _checkpoint(self, seq: int, payload: str) -> None:
        try:
            cp = json.loads(payload)
        except ValueError:
            cp = None
        if not isinstance(cp, dict) or set(cp) != CP_KEYS:
            raise ChainReject("CHECKPOINT_INVALID", seq, "checkpoint fields are not the checkpoint fields")
        if cp["covers_seq"] != seq - 1 or cp["covers_hash"] != self.last_hash.hex():
            raise ChainReject("CHECKPOINT_INVALID", seq, f"checkpoint does not cover entry {seq - 1} with its hash")
        if cp["counter"] != self.cp_counter + 1:
            raise ChainReject("CHECKPOINT_INVALID", seq, f"counter {cp['counter']!r} does not follow {self.cp_counter}")
        if cp["terminal"] != self.terminal:
            raise ChainReject("CHECKPOINT_INVALID", seq, f"checkpoint names terminal {cp['terminal']!r}")
        key = pub_key(self.signing_pub)
        try:
            ok = key is not None and sig_ok(key, cp["sig"], checkpoint_message(cp))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ChainReject("CHECKPOINT_INVALID", seq, "signature does not verify with the key in force")
        if self.pending_pub:
            self.signing_pub, self.pending_pub = self.pending_pub, ""
        self.cp_counter += 1
        self.last_cp_seq, self.last_cp = seq, payload

    def _rotation(self, seq: int, payload: str) -> None:
        try:
            rec = json.loads(payload)
        except ValueError:
            rec = None
        if not rotation_ok(rec) or rec["seq"] != seq or rec["terminal"] != self.terminal:
            raise ChainReject("CHECKPOINT_INVALID", seq, "key rotation is malformed or its signatures do not verify")
        if rec["old_pub"] != self.signing_pub:
            raise ChainReject("CHECKPOINT_INVALID", seq, "key rotation does not start from the key in force")
        self.pending_pub = rec["new_pub"]

    def _segment(self, seq: int, payload: str, file_first: int) -> None:
        """A segment record continues the chain the fleet holds: it must cover the entry before it
        with that entry's hash AND its MAC (a forged history cannot produce either)."""
        if seq != file_first or seq == 1:
            raise ChainReject("CHECKPOINT_INVALID", seq, "a segment record may only start a file")
        try:
            rec = json.loads(payload)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or set(rec) != _SEG_KEYS:
            raise ChainReject("CHECKPOINT_INVALID", seq, "segment record fields are not the segment fields")
        if (rec["covers_seq"] != seq - 1 or rec["covers_hash"] != self.last_hash.hex()
                or rec["covers_mac"] != self.last_mac.hex()):
            raise ChainReject("CHECKPOINT_INVALID", seq, f"segment record does not cover entry {seq - 1} (hash and "
                              "MAC) the fleet holds: forged segment")
        if rec["terminal"] != self.terminal or rec["counter"] != self.cp_counter:
            raise ChainReject("CHECKPOINT_INVALID", seq, "segment record's terminal or checkpoint counter differ")
        if rec["signing_pub"] != (self.pending_pub or self.signing_pub):
            raise ChainReject("CHECKPOINT_INVALID", seq, "segment record names another signing key")
        key = pub_key(rec["signing_pub"]) if isinstance(rec["signing_pub"], str) else None
        try:
            msg = segment_message(rec)
        except (TypeError, ValueError):
            msg = b""
        if key is None or not sig_ok(key, rec["sig"], msg):
            raise ChainReject("CHECKPOINT_INVALID", seq, "segment record signature does not verify")
