"""The journal: a durable, append-only, tamper-evident SQLite log (shared/design/journal.md).

Every entry is hash-chained and MACed with a forward-secure ratchet key that is overwritten in
the same transaction (an attacker who steals today's key cannot re-seal yesterday's entries).
Signed checkpoints (every N entries and every T seconds, even when idle) give the host an anchor
that catches truncation and rollback. Card data needed before authorization completes sits
AES-GCM encrypted in ``vault`` and is shredded once the transaction is final; entries only hold
its ``ref`` so verification survives shredding.

Entry format (what ``guard.journal.verify`` recomputes)::

    body       = '{"kind":K,"payload":P,"ts":T,"txn":X}'   # canonical JSON, P = stored text verbatim
    entry_hash = SHA256(JOURNAL_HASH_DOMAIN || seq (8 bytes BE) || prev_hash || body)
    mac        = HMAC-SHA256(k_seq, entry_hash);   k_{seq+1} = HMAC-SHA256(k_seq, JOURNAL_RATCHET_LABEL)

Entry 1 is a genesis checkpoint MACed with k0, written in the creating transaction, so k0 never
reaches the journal file. Error codes (``JournalError.code``): JOURNAL_EXISTS, JOURNAL_MISSING,
JOURNAL_CORRUPT, JOURNAL_NOT_INITIALISED, JOURNAL_SCHEMA_TOO_NEW, JOURNAL_NO_K0,
JOURNAL_TERMINAL_MISMATCH, JOURNAL_KEY_MISMATCH, JOURNAL_RATCHET_MISMATCH, JOURNAL_BAD_RECORD, JOURNAL_CLOSED,
JOURNAL_FAILED, VAULT_CORRUPT, JOURNAL_BUSY (exclusive open refused), JOURNAL_IS_ARCHIVE;
``JournalDurabilityError`` (JOURNAL_NOT_DURABLE). Segments, archives and key rotation: see below the class.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guard.core.constants import (
    CHECKPOINT_DOMAIN,
    CHECKPOINT_EVERY_ENTRIES,
    CHECKPOINT_EVERY_S,
    GENESIS_HASH,
    JOURNAL_HASH_DOMAIN,
    JOURNAL_RATCHET_LABEL,
    JOURNAL_SCHEMA_VERSION,
)
from guard.core.errors import JournalDurabilityError, JournalError, PosguardError
from guard.journal.keys import DeviceKeys, public_key_hex
from guard.core.model import txn_key_hash

CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_FIELDS = ("counter", "covers_hash", "covers_seq", "terminal", "time")
MAX_PAYLOAD_CHARS = 65_536
# Payload keys whose values may legitimately be 13-19 digit Luhn-valid numbers: merchant/terminal
# ids (ISO 8583 fields 42/41, echoed in unmatched_response) and the 16-hex diagnostic digest
# (all-decimal ~5e-4 of the time, Luhn-valid a tenth of that). Never exempt card_token/fp/vault_ref:
# as 32/64-hex strings they can't match (runs glued to letters or longer than 19 digits never do),
# so exempting them would only hide the bug this check exists for (a PAN passed as the token).
PAN_SCAN_EXEMPT_KEYS = frozenset({"41", "42", "merchant_id", "terminal_id", "mid", "tid", "digest"})
VAULT_NONCE_LEN = 12

# (pragma, value set, value read back): WAL + FULL is the only setting that survived power loss.
REQUIRED_PRAGMAS: tuple[tuple[str, str, object], ...] = (
    ("journal_mode", "WAL", "wal"),
    ("synchronous", "FULL", 2),
    ("secure_delete", "ON", 1),
    ("foreign_keys", "ON", 1),
)

_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
# A 13-19 digit run (optionally grouped by spaces/dashes) not glued to letters/digits or a decimal point.
_PAN_RE = re.compile(r"(?<![0-9A-Za-z.])\d(?:[ -]?\d){12,18}(?![0-9A-Za-z])")
_DIGIT_CLASS = bytes(48 if 48 <= b <= 57 else 120 for b in range(256))  # digits -> "0", rest -> "x"
_THIRTEEN_DIGITS = b"0" * 13  # prefilter: no PAN without 13 digits separated only by " " or "-"
_enc = json.encoder.encode_basestring_ascii  # the C encoder json.dumps uses
_sha256 = hashlib.sha256
_LABEL = JOURNAL_RATCHET_LABEL
_XOR36 = bytes(b ^ 0x36 for b in range(256))
_XOR5C = bytes(b ^ 0x5C for b in range(256))
_PAD36 = b"\x36" * 32  # HMAC ipad/opad over the zero-padded half of a 32-byte key
_PAD5C = b"\x5c" * 32
_INSERT_ENTRY = (
    "INSERT INTO entries (seq, ts, kind, txn, payload, prev_hash, entry_hash, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


# --- format: shared with guard.journal.verify --------------------------------------------------------


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


def mac_and_next(key: bytes, ehash: bytes) -> tuple[bytes, bytes]:
    """(HMAC-SHA256(k_seq, entry_hash), k_{seq+1} = HMAC-SHA256(k_seq, JOURNAL_RATCHET_LABEL)).

    RFC 2104 spelled out with SHA-256 one-shots, sharing the padded keys between the two MACs:
    twice as fast as two ``hmac.digest`` calls under OpenSSL 3 (tests pin it to ``hmac.digest``).
    The ratchet is one-way, so a stolen current key reveals no earlier key.
    """
    ki = key.translate(_XOR36) + _PAD36
    ko = key.translate(_XOR5C) + _PAD5C
    return _sha256(ko + _sha256(ki + ehash).digest()).digest(), _sha256(ko + _sha256(ki + _LABEL).digest()).digest()


def checkpoint_message(fields: dict[str, Any]) -> bytes:
    """What a checkpoint signature covers: the domain and the canonical JSON of the signed fields."""
    return CHECKPOINT_DOMAIN + canonical_json({k: fields[k] for k in CHECKPOINT_FIELDS}).encode()


def looks_like_pan(text: str) -> bool:
    """True if ``text`` holds a 13-19 digit run passing the Luhn check (defence in depth)."""
    if _THIRTEEN_DIGITS not in text.encode("utf-8", "replace").translate(_DIGIT_CLASS, b" -"):
        return False
    for m in _PAN_RE.finditer(text):
        if _luhn_ok(m.group().replace(" ", "").replace("-", "")):
            return True
    return False


def _pan_outside_exempt(obj: Any) -> bool:
    """Slow path after a hit: is the card-number-like run anywhere but under PAN_SCAN_EXEMPT_KEYS?"""
    if isinstance(obj, dict):
        return any(looks_like_pan(_enc(str(k))) or (k not in PAN_SCAN_EXEMPT_KEYS and _pan_outside_exempt(v))
                   for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(_pan_outside_exempt(v) for v in obj)
    if isinstance(obj, str):
        return looks_like_pan(_enc(obj))
    return looks_like_pan(canonical_json(obj))


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


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


# --- schema ----------------------------------------------------------------------------------


def _schema_v1(conn: sqlite3.Connection) -> None:
    import sqlite_utils  # only when creating or migrating: keeps start-up (and crash recovery) fast

    db = sqlite_utils.Database(conn, execute_plugins=False, recursive_triggers=False)
    db.create_table("meta", {"k": str, "v": str}, pk="k", not_null=["v"], strict=True)
    entries = db.create_table(
        "entries",
        {"seq": int, "ts": float, "kind": str, "txn": str, "payload": str,
         "prev_hash": bytes, "entry_hash": bytes, "mac": bytes},
        pk="seq",
        not_null=["ts", "kind", "payload", "prev_hash", "entry_hash", "mac"],
        strict=True,
    )
    entries.create_index(["txn"], index_name="entries_txn")
    db.create_table("vault", {"ref": str, "txn": str, "nonce": bytes, "ct": bytes}, pk="ref",
                    not_null=["txn", "nonce", "ct"], strict=True)
    for sql in (
        "CREATE TABLE ratchet (id INTEGER PRIMARY KEY CHECK (id = 1), next_seq INTEGER NOT NULL, key BLOB NOT NULL) STRICT",
        "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END",
        "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END",
        "CREATE TRIGGER ratchet_no_delete BEFORE DELETE ON ratchet BEGIN SELECT RAISE(ABORT, 'ratchet state cannot be deleted'); END",
    ):
        conn.execute(sql)


# Step n upgrades schema n-1 to n. All pending steps run in one transaction.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _schema_v1}


def schema_version(conn: sqlite3.Connection) -> int:
    """0 for a database without our meta table."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = conn.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()
    try:
        return int(row[0]) if row else 0
    except ValueError:
        raise JournalError("meta.schema_version is not an integer", code="JOURNAL_CORRUPT") from None


def _migrate_in_txn(conn: sqlite3.Connection) -> int:
    found = schema_version(conn)
    if found > JOURNAL_SCHEMA_VERSION:
        raise JournalError(
            f"journal schema {found} is newer than this software ({JOURNAL_SCHEMA_VERSION}); upgrade posguard",
            code="JOURNAL_SCHEMA_TOO_NEW",
        )
    for v in range(found + 1, JOURNAL_SCHEMA_VERSION + 1):
        MIGRATIONS[v](conn)
    if found != JOURNAL_SCHEMA_VERSION:
        conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('schema_version', ?)", (str(JOURNAL_SCHEMA_VERSION),))
    return found


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migration steps atomically (one BEGIN IMMEDIATE ... COMMIT); returns the version found."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _migrate_in_txn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found


# --- connection ------------------------------------------------------------------------------


def _connect(path: Path, *, mode: str) -> sqlite3.Connection:
    """Open ``path`` (URI mode rw|ro) in autocommit mode; the hook tests replace."""
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def apply_pragmas(conn: sqlite3.Connection) -> None:
    """Set and read back every durability pragma; refuse to run on anything else."""
    for name, value, expected in REQUIRED_PRAGMAS:
        conn.execute(f"PRAGMA {name} = {value}").fetchall()
        row = conn.execute(f"PRAGMA {name}").fetchone()
        got = row[0] if row else None
        if isinstance(got, str):
            got = got.lower()
        if got != expected:
            raise JournalDurabilityError(f"PRAGMA {name} reads back {got!r} after setting {value}; journal refused")
    conn.execute("PRAGMA journal_size_limit = 0").fetchall()


# --- the journal -----------------------------------------------------------------------------


class Journal:
    """Append-only journal on one SQLite file. Not thread-safe: one driver owns it."""

    def __init__(self, conn: sqlite3.Connection, path: Path, keys: DeviceKeys, *, terminal_id: str,
                 checkpoint_every: int, checkpoint_interval_s: float) -> None:
        """Use :meth:`create` or :meth:`open`."""
        if checkpoint_every < 1 or not checkpoint_interval_s > 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_interval_s > 0")
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.terminal_id = terminal_id
        self._signing_key = keys.signing_key
        self._aead = AESGCM(keys.vault_key)
        self._every = checkpoint_every
        self._interval = float(checkpoint_interval_s)
        self.commit_count = 0
        self.commit_seconds = 0.0  # wall time in SQLite transactions (BEGIN..COMMIT), for benchmarks
        self.commit_cpu_seconds = 0.0  # CPU time in the same
        self.wal_truncate_on_checkpoint = True
        self._failed = False
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self._key = b""
        self._cp_seq = 0
        self._cp: dict[str, Any] = {}
        self._sealed: VaultBlob | None = None  # the last blob seal_vault made: its ref needs no re-check
        self._archives: dict[str, sqlite3.Connection] = {}  # read-only archive files opened by entries_for
        self._has_archived: bool | None = None  # whether an archived_txns index exists (checked once)

    # -- lifecycle --

    @classmethod
    def create(cls, path: Path, keys: DeviceKeys, *, terminal_id: str,
               checkpoint_every: int = CHECKPOINT_EVERY_ENTRIES, checkpoint_interval_s: float = CHECKPOINT_EVERY_S,
               now: float) -> Journal:
        """Create a new journal with its schema and genesis checkpoint in one durable commit."""
        path = Path(path)
        if keys.k0 is None:
            raise JournalError("creating a journal needs k0 (provisioning only)", code="JOURNAL_NO_K0")
        _check_terminal(terminal_id)
        ts = _check_now(now)
        if os.path.lexists(path):
            raise JournalError(f"journal {path} already exists", code="JOURNAL_EXISTS")
        # Built under a temporary name and linked into place only once complete and durable: a power
        # cut during creation leaves no journal or a whole one, never an empty file open() refuses.
        tmp = path.with_name(path.name + ".creating")
        for suffix in ("", "-wal", "-shm", "-journal"):  # leftovers of a creation cut short
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        conn: sqlite3.Connection | None = None
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            conn = _connect(tmp, mode="rw")
            apply_pragmas(conn)
            j = cls(conn, tmp, keys, terminal_id=terminal_id, checkpoint_every=checkpoint_every,
                    checkpoint_interval_s=checkpoint_interval_s)
            row, cp, k_next = j._checkpoint_row(1, GENESIS_HASH, keys.k0, ts, 1)
            conn.execute("BEGIN IMMEDIATE")
            _migrate_in_txn(conn)
            conn.executemany("INSERT INTO meta (k, v) VALUES (?, ?)", [
                ("terminal_id", terminal_id), ("created_at", repr(ts)), ("checkpoint_counter", "1")])
            conn.execute(_INSERT_ENTRY, row)
            conn.execute("INSERT INTO ratchet (id, next_seq, key) VALUES (1, 2, ?)", (k_next,))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            conn.close()  # the last connection: the WAL is folded into the file (synced) and removed
            conn = None
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)  # atomic, and never replaces a journal that appeared meanwhile
            _fsync_dir(path.parent)
        except FileExistsError:
            raise JournalError(f"journal {path} already exists", code="JOURNAL_EXISTS") from None
        except OSError as e:  # no such directory, read-only, disk full, no hard links on this file system
            raise JournalError(f"cannot create journal {path}: {e.strerror or e}", code="JOURNAL_CREATE_FAILED") from None
        except sqlite3.Error as e:
            raise JournalError(f"cannot create journal {path}: {e}", code="JOURNAL_CREATE_FAILED") from None
        finally:
            if conn is not None:
                conn.close()
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        return cls.open(path, keys, terminal_id=terminal_id, checkpoint_every=checkpoint_every,
                        checkpoint_interval_s=checkpoint_interval_s)

    @classmethod
    def open(cls, path: Path, keys: DeviceKeys, *, terminal_id: str,
             checkpoint_every: int = CHECKPOINT_EVERY_ENTRIES,
             checkpoint_interval_s: float = CHECKPOINT_EVERY_S) -> Journal:
        """Open an existing journal: durability pragmas, pending migrations, state from the tail."""
        path = Path(path)
        if not path.is_file():
            if path.exists():
                raise JournalError(f"journal {path} is not a regular file", code="JOURNAL_NOT_A_FILE")
            raise JournalError(f"journal {path} does not exist", code="JOURNAL_MISSING")
        try:
            conn = _connect(path, mode="rw")
        except sqlite3.Error as e:  # e.g. no read permission
            raise JournalError(f"journal {path} cannot be opened: {e}") from None
        try:
            try:
                apply_pragmas(conn)
                if schema_version(conn) < 1:
                    raise JournalError(f"{path} is not an initialised posguard journal", code="JOURNAL_NOT_INITIALISED")
                if schema_version(conn) != JOURNAL_SCHEMA_VERSION:
                    migrate(conn)
                j = cls(conn, path, keys, terminal_id=terminal_id, checkpoint_every=checkpoint_every,
                        checkpoint_interval_s=checkpoint_interval_s)
                j._load_state()
            except sqlite3.OperationalError as e:
                raise JournalError(f"journal {path} cannot be opened: {e}") from None
            except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # a corrupt schema's message may not be UTF-8
                raise JournalError(f"journal {path} is unreadable ({e.__class__.__name__})", code="JOURNAL_CORRUPT") from None
        except BaseException:
            conn.close()
            raise
        return j

    def _load_state(self) -> None:
        c = self._db()
        meta = dict(c.execute("SELECT k, v FROM meta").fetchall())
        if meta.get("segment_role") == ROLE_ARCHIVE:
            raise JournalError(f"{self.path} is a sealed archive, not a live journal", code="JOURNAL_IS_ARCHIVE")
        if meta.get("terminal_id") != self.terminal_id:
            raise JournalError(f"journal belongs to terminal {meta.get('terminal_id')!r}, not {self.terminal_id!r}",
                               code="JOURNAL_TERMINAL_MISMATCH")
        last = c.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        rat = c.execute("SELECT next_seq, key FROM ratchet WHERE id = 1").fetchone()
        cp = c.execute("SELECT seq, payload FROM entries WHERE kind = ? ORDER BY seq DESC LIMIT 1",
                       (CHECKPOINT_KIND,)).fetchone()
        if last is None or cp is None:
            raise JournalError("journal has no genesis checkpoint", code="JOURNAL_CORRUPT")
        if rat is None or rat[0] != last[0] + 1 or len(rat[1]) != 32:
            raise JournalError(f"ratchet state does not follow entry {last[0]}; refusing to append",
                               code="JOURNAL_RATCHET_MISMATCH")
        try:
            payload = json.loads(cp[1])
            self._signing_key.public_key().verify(bytes.fromhex(payload["sig"]), checkpoint_message(payload))
            float(payload["time"]), int(payload["counter"])
        except InvalidSignature:
            raise JournalError(f"checkpoint {cp[0]} was not signed by this device's key (keys re-provisioned? "
                               "a new key needs a new journal)", code="JOURNAL_KEY_MISMATCH") from None
        except (ValueError, KeyError, TypeError):
            raise JournalError(f"checkpoint {cp[0]} is malformed", code="JOURNAL_CORRUPT") from None
        self._set_state(last[0], last[1], rat[1], cp[0], payload)

    def _set_state(self, last_seq: int, last_hash: bytes, key: bytes, cp_seq: int, cp: dict[str, Any]) -> None:
        self._last_seq, self._last_hash, self._key = last_seq, last_hash, key
        self._cp_seq, self._cp = cp_seq, cp

    def close(self) -> None:
        """Seal the WAL (best effort) and close; superseded ratchet keys leave the files."""
        if self._conn is not None:
            try:
                if not self._failed:
                    self.seal_wal()
            except sqlite3.Error:
                pass
            self._conn.close()
            self._conn = None
        for c in self._archives.values():
            c.close()
        self._archives.clear()
        self._key = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError("journal is closed", code="JOURNAL_CLOSED")
        return self._conn

    # -- writing --

    def seal_vault(self, txn: str, plaintext: bytes, *, rng: Callable[[int], bytes] = os.urandom) -> VaultBlob:
        """Encrypt card data for ``txn`` before the append that references its ``ref``; the nonce
        comes from ``rng`` (the runtime's randomness port)."""
        nonce = rng(VAULT_NONCE_LEN)
        ct = self._aead.encrypt(nonce, plaintext, txn.encode())
        blob = VaultBlob(vault_ref(nonce, ct), txn, nonce, ct)
        self._sealed = blob
        return blob

    def append(self, records: Sequence[tuple[str, str | None, dict[str, Any]]], *, now: float,
               vault_put: Sequence[VaultBlob] = (), vault_shred: Sequence[str] = ()) -> AppendResult:
        """Append records, vault inserts/shreds, the ratchet step and any due checkpoint in ONE durable commit."""
        conn = self._db()
        if self._failed:
            raise JournalError("an earlier commit failed; reopen the journal", code="JOURNAL_FAILED")
        ts = now if type(now) is float and math.isfinite(now) else _check_now(now)
        prepared = _prepare(records)
        blobs = [(b.ref, b.txn, b.nonce, b.ct) if b is self._sealed else _check_blob(b) for b in vault_put]
        shred = [(r,) for r in vault_shred]
        seq, prev, key = self._last_seq, self._last_hash, self._key
        rows = []
        for kind, txn, text in prepared:
            seq += 1
            h = _sha256(JOURNAL_HASH_DOMAIN + seq.to_bytes(8, "big") + prev + entry_body(ts, kind, txn, text)).digest()
            mac, next_key = mac_and_next(key, h)
            rows.append((seq, ts, kind, txn, text, prev, h, mac))
            key, prev = next_key, h
        seqs = tuple(range(self._last_seq + 1, seq + 1))
        cp_seq, cp = None, None
        if seq - self._cp_seq >= self._every or ts - self._cp["time"] >= self._interval:
            seq += 1
            cp_seq = seq
            row, cp, key = self._checkpoint_row(seq, prev, key, ts, self._cp["counter"] + 1)
            rows.append(row)
            prev = row[6]
        self._write(conn, rows, blobs, shred, seq, key, cp)
        self._set_state(seq, prev, key, cp_seq or self._cp_seq, cp or self._cp)
        if cp is not None:
            self._after_checkpoint()
        return AppendResult(seqs, cp_seq)

    def maybe_checkpoint(self, now: float) -> bool:
        """Seal an epoch if ``checkpoint_interval_s`` passed since the last checkpoint, even when idle."""
        if _check_now(now) - self._cp["time"] < self._interval:
            return False
        self.checkpoint(now)
        return True

    def checkpoint(self, now: float) -> int:
        """Commit a signed checkpoint now; returns its seq."""
        conn = self._db()
        if self._failed:
            raise JournalError("an earlier commit failed; reopen the journal", code="JOURNAL_FAILED")
        seq = self._last_seq + 1
        row, cp, key = self._checkpoint_row(seq, self._last_hash, self._key, _check_now(now), self._cp["counter"] + 1)
        self._write(conn, [row], [], [], seq, key, cp)
        self._set_state(seq, row[6], key, seq, cp)
        self._after_checkpoint()
        return seq

    def _checkpoint_row(self, seq: int, prev: bytes, key: bytes, ts: float,
                        counter: int) -> tuple[tuple[Any, ...], dict[str, Any], bytes]:
        fields: dict[str, Any] = {"terminal": self.terminal_id, "covers_seq": seq - 1,
                                  "covers_hash": prev.hex(), "time": ts, "counter": counter}
        fields["sig"] = self._signing_key.sign(checkpoint_message(fields)).hex()
        text = canonical_json(fields)
        h = entry_hash(seq, prev, entry_body(ts, CHECKPOINT_KIND, None, text))
        mac, next_key = mac_and_next(key, h)
        return (seq, ts, CHECKPOINT_KIND, None, text, prev, h, mac), fields, next_key

    def _write(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], blobs: list[tuple[str, str, bytes, bytes]],
               shred: list[tuple[str]], last_seq: int, key: bytes, cp: dict[str, Any] | None) -> None:
        try:
            self._write_txn(conn, rows, blobs, shred, last_seq, key, cp)
        except sqlite3.IntegrityError:
            raise  # the caller's records broke a constraint (e.g. a vault blob twice): a bug, not the medium
        except sqlite3.DatabaseError as e:
            # Disk full, read-only file or directory, I/O error, corruption, locked by another process:
            # a journal failure with a stable code (the daemon exits 3 and restarts), not an internal error.
            raise JournalError(f"journal {self.path}: commit failed ({e}); nothing that depends on it was sent "
                               "or shown", code="JOURNAL_WRITE_FAILED") from None

    def _write_txn(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]],
                   blobs: list[tuple[str, str, bytes, bytes]], shred: list[tuple[str]], last_seq: int, key: bytes,
                   cp: dict[str, Any] | None) -> None:
        cur = conn.cursor()
        committing = False
        t0, c0 = time.perf_counter(), time.process_time()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if len(rows) == 1:
                cur.execute(_INSERT_ENTRY, rows[0])
            else:
                cur.executemany(_INSERT_ENTRY, rows)
            if blobs:
                cur.executemany("INSERT INTO vault (ref, txn, nonce, ct) VALUES (?, ?, ?, ?)", blobs)
            if shred:
                cur.executemany("DELETE FROM vault WHERE ref = ?", shred)
            cur.execute("UPDATE ratchet SET next_seq = ?, key = ? WHERE id = 1", (last_seq + 1, key))
            if cur.rowcount != 1:
                raise JournalError("ratchet row missing", code="JOURNAL_RATCHET_MISMATCH")
            if cp is not None:
                cur.execute("UPDATE meta SET v = ? WHERE k = 'checkpoint_counter'", (str(cp["counter"]),))
            committing = True
            self._commit(cur)
        except BaseException:
            if committing:  # durable or not is unknown (e.g. fsync error): fail-stop, reopen from disk
                self._failed = True
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._failed = True
            raise
        self.commit_count += 1
        self.commit_seconds += time.perf_counter() - t0
        self.commit_cpu_seconds += time.process_time() - c0

    def _commit(self, cur: sqlite3.Cursor) -> None:
        """The durable point: WAL append + fsync (synchronous=FULL)."""
        cur.execute("COMMIT")

    def _after_checkpoint(self) -> None:
        if self.wal_truncate_on_checkpoint:
            t0, c0 = time.perf_counter(), time.process_time()
            self.seal_wal()  # SQLite I/O like a commit: counted with the commits in benchmarks
            self.commit_seconds += time.perf_counter() - t0
            self.commit_cpu_seconds += time.process_time() - c0

    def seal_wal(self) -> bool:
        """Checkpoint and truncate the WAL so superseded ratchet keys and shredded vault pages leave it.

        Never waits for readers (busy_timeout 0); returns False if a reader kept old frames alive.
        """
        conn = self._db()
        old = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            busy = int(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
        except sqlite3.OperationalError:
            busy = 1
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(old)}")
        return busy == 0

    # -- reading --

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def last_hash(self) -> bytes:
        return self._last_hash

    def latest_checkpoint(self) -> dict[str, Any]:
        """The newest signed checkpoint: a JSON-serialisable anchor for the host or an auditor."""
        return dict(self._cp)

    def entries(self, since_seq: int = 0) -> Iterator[Entry]:
        cur = self._db().execute(
            "SELECT seq, ts, kind, txn, payload, entry_hash, mac FROM entries WHERE seq > ? ORDER BY seq", (since_seq,))
        for seq, ts, kind, txn, payload, h, mac in cur:
            yield Entry(seq, ts, kind, txn, _payload(seq, payload), h, mac)

    def entries_for(self, txn: str) -> list[Entry]:
        """One transaction's entries in order (indexed): how the engine reads back a transaction
        it no longer keeps in memory."""
        cur = self._db().execute(
            "SELECT seq, ts, kind, txn, payload, entry_hash, mac FROM entries WHERE txn = ? ORDER BY seq", (txn,))
        rows = [Entry(seq, ts, kind, t, _payload(seq, payload), h, mac) for seq, ts, kind, t, payload, h, mac in cur]
        if rows or not self._archived_index():
            return rows
        hit = self._db().execute("SELECT f.path FROM archived_txns a JOIN archive_files f ON f.id = a.archive "
                                 "WHERE a.h = ?", (txn_key_hash(txn),)).fetchone()
        return self._archive_entries(hit[0], txn) if hit else []

    def _archived_index(self) -> bool:
        if self._has_archived is None:
            self._has_archived = self._db().execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'archived_txns'").fetchone() is not None
        return self._has_archived

    def archived_key_hashes(self) -> Iterator[int]:
        """``txn_key_hash`` of every transaction compaction moved to an archive (their ids stay taken)."""
        if self._archived_index():
            for (h,) in self._db().execute("SELECT h FROM archived_txns"):
                yield h

    def _archive_entries(self, archive: str, txn: str) -> list[Entry]:
        """A transaction's entries from the archive file that holds it. An archive that cannot be
        read refuses the request (the id is taken; treating it as new could charge twice)."""
        try:
            conn = self._archives.get(archive)
            if conn is None:
                if not Path(archive).is_file():
                    raise sqlite3.OperationalError("file not found")
                conn = self._archives[archive] = _connect(Path(archive), mode="ro")
            cur = conn.execute("SELECT seq, ts, kind, txn, payload, entry_hash, mac FROM entries WHERE txn = ? "
                               "ORDER BY seq", (txn,))
            return [Entry(seq, ts, kind, t, json.loads(payload), h, mac) for seq, ts, kind, t, payload, h, mac in cur]
        except sqlite3.Error as e:
            raise PosguardError(f"transaction {txn} was archived to {archive}, which cannot be read ({e}); put the "
                                "archive back (posguard journal compact moved it there)", code="ARCHIVE_UNAVAILABLE") from None

    def vault_refs(self) -> set[str]:
        return {r for (r,) in self._db().execute("SELECT ref FROM vault")}

    def vault_open(self, ref: str) -> bytes | None:
        """Decrypt a vault blob; None once shredded. A blob that fails authentication raises VAULT_CORRUPT."""
        row = self._db().execute("SELECT txn, nonce, ct FROM vault WHERE ref = ?", (ref,)).fetchone()
        if row is None:
            return None
        txn, nonce, ct = row
        if vault_ref(nonce, ct) != ref:
            raise JournalError(f"vault blob {ref[:16]} does not match its ref", code="VAULT_CORRUPT")
        try:
            return self._aead.decrypt(nonce, ct, txn.encode())
        except InvalidTag:
            raise JournalError(f"vault blob {ref[:16]} failed authentication", code="VAULT_CORRUPT") from None

    def integrity_check(self, *, full: bool = False) -> list[str]:
        """SQLite's page-level check (quick_check, or integrity_check if ``full``); [] when healthy."""
        rows = self._db().execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchall()
        problems = [r[0] for r in rows]
        return [] if problems == ["ok"] else problems

    # -- operator extensions (guard.ops.compact, guard.ops.rotation, guard.ops.replay): exclusive access,
    #    signing-key rotation, archive segments. Formats: see "segments" below the class.

    @classmethod
    def open_exclusive(cls, path: Path, keys: DeviceKeys, *, terminal_id: str,
                       checkpoint_every: int = CHECKPOINT_EVERY_ENTRIES,
                       checkpoint_interval_s: float = CHECKPOINT_EVERY_S, busy_timeout_s: float = 1.0) -> Journal:
        """Open like :meth:`open`, then hold SQLite's exclusive lock until :meth:`close`.

        Nobody else (the guard daemon, a reader) can use the file meanwhile; JOURNAL_BUSY if
        another connection has it open. For maintenance: replay, compaction, key rotation.
        """
        j = cls.open(path, keys, terminal_id=terminal_id, checkpoint_every=checkpoint_every,
                     checkpoint_interval_s=checkpoint_interval_s)
        conn = j._db()
        try:
            conn.execute(f"PRAGMA busy_timeout = {max(0, int(busy_timeout_s * 1000))}")
            conn.execute("PRAGMA locking_mode = EXCLUSIVE").fetchall()
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("COMMIT")
        except sqlite3.OperationalError:
            j._failed = True  # no WAL sealing attempt on a file someone else holds
            j.close()
            raise JournalError(f"journal {path} is in use by another process; stop the guard daemon first",
                               code="JOURNAL_BUSY") from None
        return j

    def vacuum(self) -> None:
        """Rewrite the file without free pages (after compaction): gives the space back to the disk."""
        conn = self._db()
        conn.execute("VACUUM")
        self.seal_wal()

    def key_history(self) -> list[dict[str, Any]]:
        """Every signing-key rotation statement so far, oldest first: those carried in this file's
        segment record (earlier segments) followed by this file's ``key_rotation`` entries."""
        c = self._db()
        first = c.execute("SELECT kind, payload FROM entries ORDER BY seq LIMIT 1").fetchone()
        out: list[dict[str, Any]] = []
        if first is not None and first[0] == SEGMENT_KIND:
            out += json.loads(first[1])["keys"]
        out += [json.loads(p) for (p,) in c.execute("SELECT payload FROM entries WHERE kind = ? ORDER BY seq",
                                                    (ROTATION_KIND,))]
        return out

    def rotate_signing_key(self, new_key: Ed25519PrivateKey, *, now: float) -> int:
        """Hand checkpoint signing over to ``new_key`` in ONE durable commit; returns the rotation's seq.

        Appends a ``key_rotation`` entry (statement signed by the old key, with the new key's proof
        of possession ``pop``), a checkpoint signed by the OLD key that covers it, and a checkpoint
        signed by the NEW key. Verifiers follow the chain: each key vouches for its successor.
        """
        conn = self._db()
        if self._failed:
            raise JournalError("an earlier commit failed; reopen the journal", code="JOURNAL_FAILED")
        ts = _check_now(now)
        old = self._signing_key
        old_pub, new_pub = public_key_hex(old.public_key()), public_key_hex(new_key.public_key())
        if old_pub == new_pub:
            raise JournalError("the new signing key is the current one", code="JOURNAL_BAD_RECORD")
        seq, prev = self._last_seq + 1, self._last_hash
        fields: dict[str, Any] = {"terminal": self.terminal_id, "old_pub": old_pub, "new_pub": new_pub,
                                  "seq": seq, "time": ts}
        msg = rotation_message(fields)
        text = canonical_json({**fields, "sig": old.sign(msg).hex(), "pop": new_key.sign(msg).hex()})
        h = entry_hash(seq, prev, entry_body(ts, ROTATION_KIND, None, text))
        mac, key = mac_and_next(self._key, h)
        rows: list[tuple[Any, ...]] = [(seq, ts, ROTATION_KIND, None, text, prev, h, mac)]
        row_old, cp_old, key = self._checkpoint_row(seq + 1, h, key, ts, self._cp["counter"] + 1)
        self._signing_key = new_key
        try:
            row_new, cp_new, key = self._checkpoint_row(seq + 2, row_old[6], key, ts, cp_old["counter"] + 1)
            self._write(conn, [*rows, row_old, row_new], [], [], seq + 2, key, cp_new)
        except BaseException:
            self._signing_key = old
            raise
        self._set_state(seq + 2, row_new[6], key, seq + 2, cp_new)
        self._after_checkpoint()
        return seq

    def write_archive(self, dest: Path, *, now: float) -> tuple[int, int]:
        """Copy every entry VERBATIM into a new single-file archive ``dest``; returns (first, last) seq.

        Same schema; meta ``segment_role`` = archive; empty vault; the ratchet row holds
        ``archive_ratchet_commitment(k_{last+1})`` instead of the key, so a verifier with k0 can
        tell the archive ends exactly here without the archive revealing a live MAC key. Durable
        (fsync, atomic rename) before returning. The caller seals the journal with a checkpoint first.
        """
        conn = self._db()
        ts = _check_now(now)
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        a = _connect(tmp, mode="rw")
        try:
            a.execute("PRAGMA journal_mode = DELETE").fetchall()
            a.execute("PRAGMA synchronous = FULL")
            a.execute("BEGIN IMMEDIATE")
            _migrate_in_txn(a)
            meta = {k: v for k, v in conn.execute("SELECT k, v FROM meta") if k != "schema_version"}
            meta.update(segment_role=ROLE_ARCHIVE, archived_at=repr(ts))
            a.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", sorted(meta.items()))
            a.executemany(_INSERT_ENTRY, conn.execute(
                "SELECT seq, ts, kind, txn, payload, prev_hash, entry_hash, mac FROM entries ORDER BY seq"))
            a.execute("INSERT INTO ratchet (id, next_seq, key) VALUES (1, ?, ?)",
                      (self._last_seq + 1, archive_ratchet_commitment(self._key)))
            first = a.execute("SELECT min(seq) FROM entries").fetchone()[0]
            a.execute("COMMIT")
        except BaseException:
            a.close()
            tmp.unlink(missing_ok=True)
            raise
        a.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o400)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return int(first), self._last_seq

    def restart_segment(self, carry_txns: Collection[str], *, records: Sequence[tuple[str, str | None, dict[str, Any]]] = (),
                        note: dict[str, Any] | None = None, now: float, archive: str | None = None) -> tuple[int, int]:
        """Start a new segment IN PLACE, in ONE durable commit; returns (segment seq, carried entries).

        Precondition: every current entry is archived verbatim (:meth:`write_archive`). Deletes all
        entries and the vault blobs of transactions not in ``carry_txns``, then appends: a signed
        ``segment`` record continuing the chain and the MAC ratchet (it covers the last archived
        entry), verbatim copies (same ts, kind, txn, payload; new seq, chain link and MAC) of every
        entry of the carried transactions in journal order, ``records``, and a checkpoint.
        ``archive`` (the archive file's path) is recorded for every transaction not carried in the
        ``archived_txns`` index, so their ids stay taken: ``entries_for`` reads them from there.
        """
        conn = self._db()
        if self._failed:
            raise JournalError("an earlier commit failed; reopen the journal", code="JOURNAL_FAILED")
        ts = _check_now(now)
        prepared = _prepare(records) if records else []
        history = self.key_history()
        prev_first = conn.execute("SELECT min(seq) FROM entries").fetchone()[0]
        cur = conn.cursor()
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS carry_txn (txn TEXT PRIMARY KEY)")
        cur.execute("DELETE FROM carry_txn")
        cur.executemany("INSERT OR IGNORE INTO carry_txn (txn) VALUES (?)", [(t,) for t in carry_txns])
        carried = cur.execute("SELECT ts, kind, txn, payload FROM entries WHERE txn IN (SELECT txn FROM carry_txn) "
                              "AND kind NOT IN (?, ?, ?) ORDER BY seq",
                              (CHECKPOINT_KIND, SEGMENT_KIND, ROTATION_KIND)).fetchall()
        seq, prev, key = self._last_seq + 1, self._last_hash, self._key
        fields: dict[str, Any] = {
            "terminal": self.terminal_id, "covers_seq": seq - 1, "covers_hash": prev.hex(), "time": ts,
            "counter": self._cp["counter"], "prev_first_seq": int(prev_first), "carried": len(carried),
            "signing_pub": public_key_hex(self._signing_key.public_key()), "keys": history, "note": note or {},
        }
        fields["sig"] = self._signing_key.sign(segment_message(fields)).hex()
        text = canonical_json(fields)
        h = entry_hash(seq, prev, entry_body(ts, SEGMENT_KIND, None, text))
        mac, key = mac_and_next(key, h)
        rows: list[tuple[Any, ...]] = [(seq, ts, SEGMENT_KIND, None, text, prev, h, mac)]
        prev = h
        for ets, kind, txn, payload in [*carried, *((ts, k, x, p) for k, x, p in prepared)]:
            seq += 1
            h = entry_hash(seq, prev, entry_body(ets, kind, txn, payload))
            mac, key = mac_and_next(key, h)
            rows.append((seq, ets, kind, txn, payload, prev, h, mac))
            prev = h
        seq += 1
        row, cp, key = self._checkpoint_row(seq, prev, key, ts, self._cp["counter"] + 1)
        rows.append(row)
        trigger = cur.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'entries_no_delete'"
                              ).fetchone()
        committing = False
        cur.execute("BEGIN IMMEDIATE")
        try:
            if trigger is not None:
                cur.execute("DROP TRIGGER entries_no_delete")
            if archive is not None:
                cur.execute("CREATE TABLE IF NOT EXISTS archive_files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL)")
                cur.execute("CREATE TABLE IF NOT EXISTS archived_txns (h INTEGER PRIMARY KEY, archive INTEGER NOT NULL) "
                            "WITHOUT ROWID")
                cur.execute("INSERT OR IGNORE INTO archive_files (path) VALUES (?)", (archive,))
                (file_id,) = cur.execute("SELECT id FROM archive_files WHERE path = ?", (archive,)).fetchone()
                gone = cur.execute("SELECT DISTINCT txn FROM entries WHERE txn IS NOT NULL "
                                   "AND txn NOT IN (SELECT txn FROM carry_txn)").fetchall()
                cur.executemany("INSERT OR REPLACE INTO archived_txns (h, archive) VALUES (?, ?)",
                                [(txn_key_hash(t), file_id) for (t,) in gone])
            cur.execute("DELETE FROM entries")
            if trigger is not None:
                cur.execute(trigger[0])
            cur.execute("DELETE FROM vault WHERE txn NOT IN (SELECT txn FROM carry_txn)")
            cur.executemany(_INSERT_ENTRY, rows)
            cur.execute("UPDATE ratchet SET next_seq = ?, key = ? WHERE id = 1", (seq + 1, key))
            if cur.rowcount != 1:
                raise JournalError("ratchet row missing", code="JOURNAL_RATCHET_MISMATCH")
            cur.execute("UPDATE meta SET v = ? WHERE k = 'checkpoint_counter'", (str(cp["counter"]),))
            cur.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('segment_first_seq', ?)", (str(rows[0][0]),))
            committing = True
            self._commit(cur)
        except BaseException:
            if committing:
                self._failed = True
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._failed = True
            raise
        self.commit_count += 1
        self._has_archived = None
        self._set_state(seq, row[6], key, seq, cp)
        self._after_checkpoint()
        return rows[0][0], len(carried)


# --- segments: archives, carry-over and key rotation (shared with guard.journal.verify) --------------
#
# The journal is ONE logical chain: seq, prev_hash and the MAC ratchet k_seq (from k0) never
# restart. Compaction (guard.ops.compact) cuts it into files: an archive holds a verbatim range of
# entries (the first archive starts at the genesis checkpoint); the live file then starts with
# a signed ``segment`` record at the next seq (covers the archive's last entry, carries the
# checkpoint counter, the key in force and every key rotation so far), followed by verbatim
# copies of the entries of the transactions that stay live. A ``segment`` record can only be
# MACed by whoever held k_seq at that position, so deleting a file's prefix is still detected.

SEGMENT_KIND = "segment"
ROTATION_KIND = "key_rotation"
SEGMENT_DOMAIN = b"posguard.segment.v1"
ROTATION_DOMAIN = b"posguard.key-rotation.v1"
ARCHIVE_RATCHET_DOMAIN = b"posguard.archive-ratchet.v1"
SEGMENT_FIELDS = ("carried", "counter", "covers_hash", "covers_seq", "keys", "note", "prev_first_seq",
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


def ratchet_forward(key: bytes, steps: int) -> bytes:
    """k_{i+steps} from k_i (a verifier with k0 reaching the start of a later segment)."""
    for _ in range(steps):
        ko = key.translate(_XOR5C) + _PAD5C
        key = _sha256(ko + _sha256(key.translate(_XOR36) + _PAD36 + _LABEL).digest()).digest()
    return key


# --- validation ------------------------------------------------------------------------------


def _payload(seq: int, text: Any) -> Any:
    """A stored payload parsed; JOURNAL_CORRUPT naming the entry when it is not JSON (bit rot, or
    edited without the keys) instead of a JSONDecodeError out of the daemon's start."""
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        raise JournalError(f"journal entry {seq}: payload is not JSON; `posguard journal verify` names the first "
                           "entry that changed", code="JOURNAL_CORRUPT") from None


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise JournalError("now must be a finite number of seconds", code="JOURNAL_BAD_RECORD")
    return float(now)


def _check_terminal(terminal_id: str) -> None:
    if not isinstance(terminal_id, str) or not terminal_id:
        raise JournalError("terminal_id must be a non-empty string", code="JOURNAL_BAD_RECORD")


def _prepare(records: Sequence[tuple[str, str | None, dict[str, Any]]]) -> list[tuple[str, str | None, str]]:
    """Validate and serialise every record before the transaction starts."""
    if not records:
        raise JournalError("append needs at least one record", code="JOURNAL_BAD_RECORD")
    out = []
    for i, rec in enumerate(records):
        if not (isinstance(rec, tuple) and len(rec) == 3):
            raise JournalError(f"record {i} is not a (kind, txn, payload) tuple", code="JOURNAL_BAD_RECORD")
        kind, txn, payload = rec
        if not isinstance(kind, str) or (kind not in _GOOD_KINDS and (not _KIND_RE.fullmatch(kind)
                                                                     or kind == CHECKPOINT_KIND)):
            raise JournalError(f"record {i}: kind must match [a-z][a-z0-9_]* and not be 'checkpoint'",
                               code="JOURNAL_BAD_RECORD")
        if txn is not None and not isinstance(txn, str):
            raise JournalError(f"record {i} ({kind}): txn must be a string or None", code="JOURNAL_BAD_RECORD")
        if not isinstance(payload, dict):
            raise JournalError(f"record {i} ({kind}): payload must be a dict", code="JOURNAL_BAD_RECORD")
        try:
            text = canonical_json(payload)
        except (TypeError, ValueError, RecursionError):
            raise JournalError(f"record {i} ({kind}): payload is not JSON-serialisable", code="JOURNAL_BAD_RECORD") from None
        if len(text) > MAX_PAYLOAD_CHARS:
            raise JournalError(f"record {i} ({kind}): payload exceeds {MAX_PAYLOAD_CHARS} characters",
                               code="JOURNAL_BAD_RECORD")
        if (looks_like_pan(text) and _pan_outside_exempt(payload)) or (txn is not None and _txn_has_pan(txn)):
            raise JournalError(f"record {i} ({kind}): contains a card-number-like digit run; store a token or mask",
                               code="JOURNAL_BAD_RECORD")
        out.append((kind, txn, text))
    return out


_GOOD_KINDS = frozenset({"intent", "outcome", "held", "released", "reversal_pending", "reversal_attempt",
                         "reversal_failed", "reversed", "needs_manual", "late_response", "unmatched_response",
                         "host_garbage", "stan_use", "config_loaded"})
_CLEAN_TXNS: dict[str, None] = {}  # txn keys already scanned clean: a sale's later records skip the regex
_CLEAN_TXNS_MAX = 4096


def _txn_has_pan(txn: str) -> bool:
    """``looks_like_pan(txn)``, remembered for clean keys (the same key comes back for each record)."""
    exact = type(txn) is str
    if exact and txn in _CLEAN_TXNS:
        return False
    if looks_like_pan(txn):
        return True
    if exact:
        if len(_CLEAN_TXNS) >= _CLEAN_TXNS_MAX:
            _CLEAN_TXNS.clear()
        _CLEAN_TXNS[txn] = None
    return False


def _check_blob(b: VaultBlob) -> tuple[str, str, bytes, bytes]:
    if not isinstance(b, VaultBlob) or len(b.nonce) != VAULT_NONCE_LEN or vault_ref(b.nonce, b.ct) != b.ref:
        raise JournalError("vault_put items must be VaultBlob from seal_vault()", code="JOURNAL_BAD_RECORD")
    return (b.ref, b.txn, b.nonce, b.ct)


def _fsync_dir(dir: Path) -> None:
    fd = os.open(dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
