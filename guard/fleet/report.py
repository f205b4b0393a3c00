"""``fleet report`` (per terminal: last seen, accepted/verified up to, the witnessed checkpoint,
pending reversals, NEEDS_MANUAL, discrepancies of the latest reconcile run, rejected uploads) and
the witness receipt: the fleet's Ed25519 countersignature of a terminal's newest accepted
checkpoint, which a terminal (or its auditor) keeps as proof of what the fleet holds.

Receipt: {"terminal", "checkpoint" (the checkpoint payload verbatim), "accepted_seq", "time",
"fleet_pub", "sig"}; ``sig`` signs RECEIPT_DOMAIN || canonical JSON of the other fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guard.fleet.ingest import FleetError
from guard.fleet.schema import connect
from guard.journal.format import canonical_json
from guard.journal.keys import public_key_hex

RECEIPT_DOMAIN = b"posguard.fleet-receipt.v1"
RECEIPT_FIELDS = ("accepted_seq", "checkpoint", "fleet_pub", "terminal", "time")

_REPORT = """
SELECT t.terminal, t.last_seen, (t.state->>'next_seq')::bigint - 1, (t.audit->>'next_seq')::bigint - 1,
       t.witness_seq, t.audit_problem,
       (SELECT count(*) FROM txns x WHERE x.terminal = t.terminal AND x.state = 'REVERSAL_PENDING'),
       (SELECT count(*) FROM txns x WHERE x.terminal = t.terminal AND x.state = 'NEEDS_MANUAL'),
       (SELECT count(*) FROM discrepancies d WHERE d.terminal = t.terminal
          AND d.run = (SELECT max(id) FROM reconcile_runs)),
       (SELECT count(*) FROM rejections r WHERE r.terminal = t.terminal),
       (SELECT r.code || ' seq ' || coalesce(r.seq::text, '-') || ': ' || r.reason FROM rejections r
          WHERE r.terminal = t.terminal ORDER BY r.id DESC LIMIT 1)
FROM terminals t ORDER BY t.terminal
"""
REPORT_COLUMNS = ("terminal", "last_seen", "accepted_upto", "verified_upto", "witness_seq", "verify_problem",
                  "pending_reversals", "needs_manual", "discrepancies", "rejections", "last_rejection")


def report(dsn: str) -> list[dict[str, Any]]:
    with connect(dsn) as conn:
        rows = conn.execute(_REPORT).fetchall()
    out = []
    for r in rows:
        d = dict(zip(REPORT_COLUMNS, r))
        d["last_seen"] = d["last_seen"].isoformat() if d["last_seen"] is not None else None
        out.append(d)
    return out


def generate_fleet_key(path: Path) -> str:
    """A new fleet signing key (hex seed, 0600, never overwritten); returns the public key hex."""
    seed = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(seed.hex() + "\n")
    return public_key_hex(Ed25519PrivateKey.from_private_bytes(seed).public_key())


def load_fleet_key(path: Path) -> Ed25519PrivateKey:
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(Path(path).read_text().strip()))
    except (OSError, ValueError) as e:
        raise FleetError(f"fleet key {path} cannot be loaded: {e}", code="KEY_FILE_INVALID") from None


def receipt(dsn: str, terminal: str, key: Ed25519PrivateKey, *, now: float) -> dict[str, Any]:
    """The countersigned receipt of ``terminal``'s newest accepted checkpoint."""
    with connect(dsn) as conn:
        row = conn.execute("SELECT witness_cp, (state->>'next_seq')::bigint - 1 FROM terminals WHERE terminal = %s",
                           (terminal,)).fetchone()
    if row is None:
        raise FleetError(f"terminal {terminal!r} is not enrolled", code="FLEET_UNKNOWN_TERMINAL")
    if row[0] is None:
        raise FleetError(f"no checkpoint of terminal {terminal!r} was accepted yet", code="FLEET_ERROR")
    rec: dict[str, Any] = {"terminal": terminal, "checkpoint": json.loads(row[0]), "accepted_seq": int(row[1]),
                           "time": now, "fleet_pub": public_key_hex(key.public_key())}
    rec["sig"] = key.sign(_message(rec)).hex()
    return rec


def receipt_ok(rec: dict[str, Any], fleet_pub: Ed25519PublicKey) -> bool:
    try:
        fleet_pub.verify(bytes.fromhex(rec["sig"]), _message(rec))
        return bool(rec["fleet_pub"] == public_key_hex(fleet_pub))
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False


def _message(rec: dict[str, Any]) -> bytes:
    return RECEIPT_DOMAIN + canonical_json({k: rec[k] for k in RECEIPT_FIELDS}).encode()
