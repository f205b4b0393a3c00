"""The host simulator's vocabulary (guard.simulation.hostsim): simulator-only response codes, fault
kinds, the reply actions ``HostCore.handle`` returns, and the ledger records it keeps."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping

from guard.core.constants import (
    SETTLE_SALE,
    F_AMOUNT,
    F_MERCHANT_ID,
    F_STAN,
    F_TERMINAL_ID,
    HOST_TIMEOUT_S,
    RC_APPROVED,
    RC_DO_NOT_HONOUR,
    RC_INSUFFICIENT_FUNDS,
    RC_TOO_LATE,
)


# Response codes used only by the simulator (not in guard.core.constants).
RC_INVALID_TRANSACTION = "12"  # MTI we do not process
RC_FORMAT_ERROR = "30"  # a required field is missing or malformed
RC_TOMBSTONED = RC_TOO_LATE  # original arrived after its own reversal

FAULT_DROP_REQUEST = "drop_request"
FAULT_DEBIT_DROP_RESPONSE = "debit_drop_response"
FAULT_DELAY_RESPONSE = "delay_response"
FAULT_CLOSE_MID_FRAME = "close_mid_frame"
FAULT_DUPLICATE_RESPONSE = "duplicate_response"
FAULT_WRONG_ECHO = "wrong_echo"
FAULT_GARBAGE = "garbage"
FAULT_KINDS: tuple[str, ...] = (
    FAULT_DROP_REQUEST,
    FAULT_DEBIT_DROP_RESPONSE,
    FAULT_DELAY_RESPONSE,
    FAULT_CLOSE_MID_FRAME,
    FAULT_DUPLICATE_RESPONSE,
    FAULT_WRONG_ECHO,
    FAULT_GARBAGE,
)

ACTION_SEND = "send"
ACTION_DROP = "drop"
ACTION_CLOSE_MID_FRAME = "close_mid_frame"
ACTION_GARBAGE = "garbage"

DEFAULT_LATE_DELAY_S = HOST_TIMEOUT_S + 15.0
DEFAULT_FAULT_CLASSES = ("02", "04")  # keepalives (08) are left alone so forced faults hit sales

ApproveRule = Callable[[Mapping[str, str]], str]
LedgerKey = tuple[str, str, str, str]


def default_approve_rule(fields: Mapping[str, str]) -> str:
    """00, except amounts ending in 51 (insufficient funds) or 05 (do not honour)."""
    amount = fields.get(F_AMOUNT, "")
    if amount.endswith("51"):
        return RC_INSUFFICIENT_FUNDS
    if amount.endswith("05"):
        return RC_DO_NOT_HONOUR
    return RC_APPROVED


def garbage_bytes(rng: random.Random) -> bytes:
    """A ``garbage`` fault's payload: 8..47 bytes, first byte 0xFF, so no ISO 8583 spec decodes it."""
    n = rng.randrange(8, 48)
    return b"\xff" + rng.randbytes(n - 1)


def alter_echo(resp: Mapping[str, str], rng: random.Random) -> dict[str, str]:
    """A ``wrong_echo`` fault: one of 41 / 42 / 4 altered, same length (11 when none is present)."""
    out = dict(resp)
    candidates = [f for f in (F_TERMINAL_ID, F_MERCHANT_ID, F_AMOUNT) if f in out]
    if not candidates:
        out[F_STAN] = f"{(int(out.get(F_STAN, '0') or 0) + 1) % 1_000_000:06d}"
        return out
    f = rng.choice(candidates)
    v = out[f]
    if f == F_AMOUNT:
        out[f] = f"{(int(v) + 1) % 10**len(v):0{len(v)}d}"
    else:
        out[f] = v[:-1] + ("X" if v[-1:] != "X" else "Y")
    return out


@dataclass(frozen=True)
class Reply:
    """One thing the adapter must do in answer to a request.

    ``action``: ``send`` the fields; ``drop`` (nothing goes out; ``fields`` shows what would
    have); ``close_mid_frame`` (send the first half of the framed fields, then close);
    ``garbage`` (send ``garbage`` as one well-framed but undecodable message). ``delay`` is
    seconds after the request. ``fault`` names the fault that shaped the reply, if any, and
    ``answer`` the acquirer-profile answer (``partial:10``, ``wrong_mti:0230``, ``silence``, ...).
    """

    fields: dict[str, str] | None
    delay: float = 0.0
    action: str = ACTION_SEND
    garbage: bytes = b""
    fault: str | None = None
    answer: str | None = None  # the acquirer-profile answer kind that shaped it (guard.simulation.acquirer)


@dataclass
class Debit:
    id: int
    tid: str
    mid: str
    stan: str
    date: str
    mti: str
    card: str
    masked_pan: str
    amount: int
    currency: str
    rrn: str
    approval_code: str
    at: float
    reversed: bool = False
    reversal_id: int | None = None
    type: str = SETTLE_SALE  # SALE (a debit, from 0200 or an 0220 advice) or REFUND (a credit, processing code 20)
    response: str = RC_APPROVED  # field 39 the host answered (08, 10, a booked 96, ...)
    requested_amount: int | None = None  # the amount asked, when the host booked less (partial approval)


@dataclass
class ReversalRecord:
    id: int
    mti: str
    stan: str
    tid: str
    mid: str
    orig_mti: str
    orig_stan: str
    orig_date: str
    amount: int
    response: str
    effect: str  # "reversed", "not_found" (tombstoned), "repeat" (no change) or "refused" (debit stays)
    debit_id: int | None
    rrn: str  # the original's RRN; "" when the original was not found
    at: float


@dataclass
class SaleRecord:
    tid: str
    mid: str
    stan: str
    date: str
    mti: str
    amount: int
    rrn: str
    response: str
    debit_id: int | None
    at: float
    type: str = SETTLE_SALE
    booked_amount: int | None = None  # what the host debited when not ``amount`` (partial approval)


@dataclass
class FaultRecord:
    kind: str
    mti: str
    stan: str
    tid: str
    processed: bool
    forced: bool
    at: float

