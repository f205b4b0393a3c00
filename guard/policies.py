"""Counter-side rules as pure functions: double swipe, pending reversal on the card, velocity.

Each rule looks only at the request, the recent history the engine keeps in memory (bounded by
the longest window) and the config, and returns a verdict with a stable code. The engine journals
the verdict with the request, so every local decision is explained in the journal.

| field problem                | rule                         | verdict                    |
|------------------------------|------------------------------|----------------------------|
| double swipe                 | same card + amount in window | HOLD_DOUBLE_SWIPE          |
| sale while a reversal pends  | reversal pending on the card | HOLD_PENDING_REVERSAL      |
| card used too frequently     | count / amount per card      | DECLINE VELOCITY_CARD_*    |
| abnormal terminal pattern    | count / amount per terminal  | DECLINE VELOCITY_TERMINAL_*|
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .model import TxnKind, TxnState


class Action(str, enum.Enum):
    ALLOW = "ALLOW"
    HOLD = "HOLD"  # journaled, not sent; the operator's CONFIRM (same txn id) releases it
    DECLINE = "DECLINE"  # local decline, journaled, never sent


@dataclass(frozen=True)
class Verdict:
    action: Action
    code: str = ""
    detail: str = ""


ALLOW = Verdict(Action.ALLOW)


@dataclass(frozen=True)
class VelocityLimit:
    """At most ``max_count`` sales and ``max_amount`` minor units in ``window_s`` (0 = no limit)."""

    window_s: float
    max_count: int = 0
    max_amount: int = 0


@dataclass(frozen=True)
class PolicyConfig:
    double_swipe_window_s: float = 120.0  # 0 disables
    hold_on_pending_reversal: bool = True
    hold_expiry_s: float = 300.0  # an unconfirmed hold becomes DECLINED HOLD_EXPIRED
    card_limits: tuple[VelocityLimit, ...] = (VelocityLimit(600.0, max_count=5), VelocityLimit(86400.0, max_amount=500_000))
    terminal_limits: tuple[VelocityLimit, ...] = (VelocityLimit(60.0, max_count=30),)

    @property
    def horizon_s(self) -> float:
        """How much history the rules ever look at: the engine prunes beyond it."""
        windows = [self.double_swipe_window_s] + [v.window_s for v in self.card_limits + self.terminal_limits]
        return max(windows, default=0.0)


OFF = PolicyConfig(double_swipe_window_s=0.0, hold_on_pending_reversal=False, card_limits=(), terminal_limits=())


@dataclass(frozen=True)
class Seen:
    """What the rules need to know about an earlier transaction."""

    key: str
    created: float
    amount: int
    kind: TxnKind
    state: TxnState


COUNTED = frozenset({TxnState.JOURNALED, TxnState.SENT, TxnState.APPROVED})
IN_FLIGHT_OR_APPROVED = COUNTED


def decide(
    kind: TxnKind,
    amount: int,
    now: float,
    card_recent: Sequence[Seen],
    terminal_recent: Iterable[Seen],
    cfg: PolicyConfig,
    *,
    confirmed: bool = False,
) -> Verdict:
    """The verdict for a new request. ``confirmed`` is the operator's CONFIRM of a held one."""
    if kind is TxnKind.VOID:
        return ALLOW
    if cfg.hold_on_pending_reversal and any(s.state is TxnState.REVERSAL_PENDING for s in card_recent):
        if not confirmed or kind is TxnKind.REFUND:
            return Verdict(Action.HOLD, "HOLD_PENDING_REVERSAL", "a reversal for this card is still pending")
    if kind is not TxnKind.SALE:
        return ALLOW
    if cfg.double_swipe_window_s > 0 and not confirmed:
        since = now - cfg.double_swipe_window_s
        for s in card_recent:
            if s.created >= since and s.amount == amount and s.kind is TxnKind.SALE and s.state in IN_FLIGHT_OR_APPROVED:
                return Verdict(Action.HOLD, "HOLD_DOUBLE_SWIPE", f"same card and amount {int(now - s.created)} s ago")
    v = _velocity(amount, now, card_recent, cfg.card_limits, "CARD")
    if v is not None:
        return v
    v = _velocity(amount, now, list(terminal_recent), cfg.terminal_limits, "TERMINAL")
    return v if v is not None else ALLOW


def _velocity(amount: int, now: float, recent: Sequence[Seen], limits: Sequence[VelocityLimit], scope: str) -> Verdict | None:
    for lim in limits:
        since = now - lim.window_s
        counted = [s for s in recent if s.created >= since and s.kind is TxnKind.SALE and s.state in COUNTED]
        if lim.max_count and len(counted) + 1 > lim.max_count:
            return Verdict(Action.DECLINE, f"VELOCITY_{scope}_COUNT", f"more than {lim.max_count} sales in {int(lim.window_s)} s")
        if lim.max_amount and sum(s.amount for s in counted) + amount > lim.max_amount:
            return Verdict(Action.DECLINE, f"VELOCITY_{scope}_AMOUNT", f"more than {lim.max_amount} in {int(lim.window_s)} s")
    return None


@dataclass
class History:
    """Recent transactions per card token and per terminal, pruned to the rules' horizon."""

    horizon_s: float
    by_card: dict[str, list[object]] = field(default_factory=dict)
    terminal: list[object] = field(default_factory=list)

    def add(self, card_token: str, txn: object) -> None:
        self.by_card.setdefault(card_token, []).append(txn)
        self.terminal.append(txn)

    def prune(self, now: float) -> None:
        cut = now - self.horizon_s
        if self.terminal and getattr(self.terminal[0], "created") < cut:
            self.terminal = [t for t in self.terminal if getattr(t, "created") >= cut or _pending(t)]
            for token in list(self.by_card):
                kept = [t for t in self.by_card[token] if getattr(t, "created") >= cut or _pending(t)]
                if kept:
                    self.by_card[token] = kept
                else:
                    del self.by_card[token]


def _pending(t: object) -> bool:
    return getattr(t, "state") in (TxnState.REVERSAL_PENDING, TxnState.HELD)
