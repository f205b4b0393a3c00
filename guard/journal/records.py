"""Checks on what callers hand the journal, before any transaction starts: record shape and kind,
payload size and JSON form, and no card-number-like digit run in a payload or transaction key."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from guard.core.errors import JournalError
from guard.core.model import luhn_ok
from guard.core.records import kind_of
from guard.journal.format import CHECKPOINT_KIND, VAULT_NONCE_LEN, VaultBlob, canonical_json, vault_ref

MAX_PAYLOAD_CHARS = 65_536
# Payload keys whose values may legitimately be 13-19 digit Luhn-valid numbers: merchant/terminal
# ids (ISO 8583 fields 42/41, echoed in unmatched_response) and the 16-hex diagnostic digest
# (all-decimal ~5e-4 of the time, Luhn-valid a tenth of that). Never exempt card_token/fp/vault_ref:
# as 32/64-hex strings they can't match (runs glued to letters or longer than 19 digits never do),
# so exempting them would only hide the bug this check exists for (a PAN passed as the token).
PAN_SCAN_EXEMPT_KEYS = frozenset({"41", "42", "merchant_id", "terminal_id", "mid", "tid", "digest"})


# A 13-19 digit run (optionally grouped by spaces/dashes) not glued to letters/digits or a decimal point.
_PAN_RE = re.compile(r"(?<![0-9A-Za-z.])\d(?:[ -]?\d){12,18}(?![0-9A-Za-z])")
_DIGIT_CLASS = bytes(48 if 48 <= b <= 57 else 120 for b in range(256))  # digits -> "0", rest -> "x"
_THIRTEEN_DIGITS = b"0" * 13  # prefilter: no PAN without 13 digits separated only by " " or "-"
_enc = json.encoder.encode_basestring_ascii  # the C encoder json.dumps uses

def looks_like_pan(text: str) -> bool:
    """True if ``text`` holds a 13-19 digit run passing the Luhn check (defence in depth)."""
    if _THIRTEEN_DIGITS not in text.encode("utf-8", "replace").translate(_DIGIT_CLASS, b" -"):
        return False
    for m in _PAN_RE.finditer(text):
        if luhn_ok(m.group().replace(" ", "").replace("-", "")):
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


def _prepare(records: Sequence[tuple[str, str | None, dict[str, Any]]],
             clean_txns: dict[str, None] | None = None) -> list[tuple[str, str | None, str]]:
    """Validate and serialise every record before the transaction starts.

    ``clean_txns``: the caller's cache of transaction keys already scanned clean (see ``_txn_has_pan``).
    """
    if not records:
        raise JournalError("append needs at least one record", code="JOURNAL_BAD_RECORD")
    out = []
    for i, rec in enumerate(records):
        if not (isinstance(rec, tuple) and len(rec) == 3):
            raise JournalError(f"record {i} is not a (kind, txn, payload) tuple", code="JOURNAL_BAD_RECORD")
        kind, txn, payload = rec
        if not isinstance(kind, str) or kind == CHECKPOINT_KIND:
            raise JournalError(f"record {i}: kind must be a record kind (guard.core.records.Kind), not a checkpoint",
                               code="JOURNAL_BAD_RECORD")
        if txn is not None and not isinstance(txn, str):
            raise JournalError(f"record {i} ({kind[:40]}): txn must be a string or None", code="JOURNAL_BAD_RECORD")
        if not isinstance(payload, dict):
            raise JournalError(f"record {i} ({kind[:40]}): payload must be a dict", code="JOURNAL_BAD_RECORD")
        if kind_of(kind) is None:  # one list of kinds for every writer (guard.core.records.Kind)
            raise JournalError(f"record {i}: refusing to journal a record of unknown kind {kind[:40]!r}",
                               code="JOURNAL_BAD_RECORD")
        try:
            text = canonical_json(payload)
        except (TypeError, ValueError, RecursionError):
            raise JournalError(f"record {i} ({kind}): payload is not JSON-serialisable", code="JOURNAL_BAD_RECORD") from None
        if len(text) > MAX_PAYLOAD_CHARS:
            raise JournalError(f"record {i} ({kind}): payload exceeds {MAX_PAYLOAD_CHARS} characters",
                               code="JOURNAL_BAD_RECORD")
        if (looks_like_pan(text) and _pan_outside_exempt(payload)) or (txn is not None and _txn_has_pan(txn, clean_txns)):
            raise JournalError(f"record {i} ({kind}): contains a card-number-like digit run; store a token or mask",
                               code="JOURNAL_BAD_RECORD")
        out.append((kind, txn, text))
    return out


CLEAN_TXNS_MAX = 4096  # bound of a journal's cache of txn keys scanned clean


def _txn_has_pan(txn: str, clean: dict[str, None] | None) -> bool:
    """``looks_like_pan(txn)``, remembered in ``clean`` for clean keys (a sale's later records skip the regex)."""
    cache = clean if type(txn) is str else None
    if cache is not None and txn in cache:
        return False
    if looks_like_pan(txn):
        return True
    if cache is not None:
        if len(cache) >= CLEAN_TXNS_MAX:
            cache.clear()
        cache[txn] = None
    return False


def _check_blob(b: VaultBlob) -> tuple[str, str, bytes, bytes]:
    if not isinstance(b, VaultBlob) or len(b.nonce) != VAULT_NONCE_LEN or vault_ref(b.nonce, b.ct) != b.ref:
        raise JournalError("vault_put items must be VaultBlob from seal_vault()", code="JOURNAL_BAD_RECORD")
    return (b.ref, b.txn, b.nonce, b.ct)

