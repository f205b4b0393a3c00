"""What the engine asks its executor to do, and the engine's configuration.

The executor runs a list of actions strictly in order; every ``Append`` (one durable commit)
precedes the ``SendHost`` or ``Reply`` that depends on it, which is what makes the guard
write-ahead. ``Load`` is the engine's "need data" (as in h11): it has changed nothing and wants the
journal entries of some transactions before the same call is made again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from guard.core import constants as C
from guard.core.errors import ConfigError, RequestInvalid
from guard.core.model import CardData, Result
from guard.core.policies import OfflineConfig, PolicyConfig
from guard.core.records import Record

__all__ = ["Action", "Append", "EngineConfig", "Load", "Randomness", "Record", "Reply", "SendHost"]


@dataclass(frozen=True)
class Append:
    """One durable journal commit: records are (kind, txn key, payload)."""

    records: list[Record]
    vault_put: list[Any] = field(default_factory=list)  # sealed blobs (guard.journal VaultBlob)
    vault_shred: list[str] = field(default_factory=list)


@dataclass(frozen=True, repr=False)
class SendHost:
    """Send an ISO 8583 message. Card fields (2, 14) are filled by the executor from ``card`` or,
    after a restart, from the vault blob ``card_ref``; the engine keeps no clear PAN."""

    key: str | None
    fields: dict[str, str]
    card: CardData | None = None
    card_ref: str | None = None
    # Which card fields the executor fills: None all it has (2, 14, 22 is the engine's, 23, 35,
    # 52 + KSN, 55); a reversal names the few its host profile asks for.
    card_fields: frozenset[str] | None = None
    ksn_field: str = C.F_KSN

    def __repr__(self) -> str:
        return f"SendHost({self.key}, mti={self.fields.get('t')}, stan={self.fields.get(C.F_STAN)})"


@dataclass(frozen=True)
class Reply:
    """Tell the reader. Always after the commit of the state it reports."""

    result: Result


@dataclass(frozen=True)
class Load:
    """Need data: the journal entries of ``keys`` (only those with seq < ``before_seq`` when set),
    handed back through ``Engine.load`` before the same call is made again. Always returned alone."""

    keys: tuple[str, ...]
    before_seq: int | None = None


Action = Union[Append, SendHost, Reply, Load]


class Randomness(Protocol):
    """The engine's injected randomness (reversal backoff jitter): ``random.Random`` fits."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class EngineConfig:
    terminal_id: str
    merchant_id: str
    host_timeout_s: float = C.HOST_TIMEOUT_S
    reversal_timeout_s: float = C.REVERSAL_TIMEOUT_S
    reversal_max_attempts: int = C.REVERSAL_MAX_ATTEMPTS
    backoff_base_s: float = C.REVERSAL_BACKOFF_BASE_S
    backoff_max_s: float = C.REVERSAL_BACKOFF_MAX_S
    saf_window: int = C.SAF_WINDOW
    echo_idle_s: float = C.ECHO_IDLE_S
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    keep_final: int = 5000  # final transactions kept in memory; older ones are read from the journal
    reversal_max_age_s: float = C.REVERSAL_MAX_AGE_S  # an unanswered reversal repeats this long
    # The host profile's field 39 classes of a 0210 (docs/HOST.md); anything in none is reversed.
    rc_approved: frozenset[str] = C.RC_APPROVED_CLASS
    rc_partial: frozenset[str] = C.RC_PARTIAL_CLASS
    rc_declined: frozenset[str] = C.RC_DECLINED_CLASS
    rc_duplicate: frozenset[str] = C.RC_DUPLICATE_CLASS
    partial_amount_field: str = C.F_AMOUNT  # where a partial approval's amount comes: "4" or "54"
    partial_approvals: bool = True  # the reader can show PARTIAL and send CONFIRM / CANCEL
    partial_expiry_s: float = 120.0  # a PARTIAL neither accepted nor cancelled is reversed
    stan_clock_floor: bool = False  # STANs never below the clock's floor (posguard run turns it on)
    # Chip sales (docs/HOST.md): how long a host approval waits for the card's decision (COMPLETE),
    # field 22 per entry mode, the field carrying the PIN block's KSN, and whether a reversal of a
    # chip sale carries its fields 23 and 55.
    completion_timeout_s: float = C.COMPLETION_TIMEOUT_S
    entry_mode_codes: Mapping[str, str] = field(default_factory=lambda: dict(C.POS_ENTRY_CODES))
    ksn_field: str = C.F_KSN
    reversal_icc: bool = True

    def __post_init__(self) -> None:
        if len(self.terminal_id) != 8 or not (self.terminal_id.isascii() and self.terminal_id.isprintable()):
            raise RequestInvalid("terminal id (field 41) must be exactly 8 printable ASCII characters",
                                 code="CONFIG_TERMINAL_ID")
        if len(self.merchant_id) != 15 or not (self.merchant_id.isascii() and self.merchant_id.isprintable()):
            raise RequestInvalid("merchant id (field 42) must be exactly 15 printable ASCII characters",
                                 code="CONFIG_MERCHANT_ID")
        check_response_classes(self.rc_approved, self.rc_partial, self.rc_declined, self.rc_duplicate)
        if self.partial_amount_field not in (C.F_AMOUNT, C.F_ADDITIONAL_AMOUNTS):
            raise ConfigError("host.partial_amount_field", "must be 4 or 54")
        if not self.completion_timeout_s > 0:
            raise ConfigError("reader.completion_timeout_s", "must be above 0")
        missing = sorted(set(C.POS_ENTRY_CODES) - set(self.entry_mode_codes))
        bad = sorted(k for k, v in self.entry_mode_codes.items() if not (len(v) == 3 and v.isascii() and v.isdigit()))
        if missing or bad:
            raise ConfigError("host.entry_mode_codes", f"needs a 3-digit code for each of {sorted(C.POS_ENTRY_CODES)}")


def check_response_classes(approved: frozenset[str], partial: frozenset[str], declined: frozenset[str],
                           duplicate: frozenset[str]) -> None:
    """A host profile must approve 00, and no code may be in two classes (ConfigError otherwise)."""
    classes = {"approved": approved, "partial": partial, "declined": declined, "duplicate": duplicate}
    for name, codes in classes.items():
        bad = sorted(c for c in codes if not (isinstance(c, str) and len(c) == 2 and c.isascii() and c.isalnum()))
        if bad:
            raise ConfigError(f"response_codes.{name}", f"{bad[:3]} are not 2-character response codes")
    if C.RC_APPROVED not in approved:
        raise ConfigError("response_codes.approved", "must include 00")
    names = list(classes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(classes[a] & classes[b])
            if both:
                raise ConfigError(f"response_codes.{b}", f"{', '.join(both)} also in {a}: a code has one meaning")
