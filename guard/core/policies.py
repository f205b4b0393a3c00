"""Counter-side rules: double swipe, pending reversal on the card, velocity.

`decide` is a pure function of the request, the recent history and the config; `History` is the
bounded memory it reads (sliding-window counters and each card's recent sales), so a journal with
100,000 past sales costs a rule no more than an empty one. The engine journals each verdict with
the request, so every local decision is explained in the journal.

| field problem               | rule                                | verdict                      |
|-----------------------------|-------------------------------------|------------------------------|
| double swipe                | same card + amount within window    | HOLD_DOUBLE_SWIPE            |
| sale while reversal pending | reversal pending on the same card   | HOLD_PENDING_REVERSAL        |
| card used too frequently    | sales / amount per card per window  | DECLINE VELOCITY_CARD_*      |
| abnormal terminal pattern   | sales / amount per terminal window  | DECLINE VELOCITY_TERMINAL_*  |
| wrong amount keyed          | every sale/refund shown for CONFIRM | HOLD_CONFIRM_AMOUNT          |

Velocity counts sales released to the host (sent, whatever their outcome): issuers count
attempts too, and a count that never decreases keeps the check O(1).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Protocol, Sequence

from guard.core.emv import EntryMode
from guard.core.model import TxnKind, TxnState


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
CONFIRM_AMOUNT = Verdict(Action.HOLD, "HOLD_CONFIRM_AMOUNT", "operator to confirm the amount")


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
    confirm_amount: bool = False  # every sale and refund is HELD until the operator confirms its amount
    signature_above: int = 0  # approved sales above this amount (minor units) need a signature (0: never)
    signature_timeout_s: float = 300.0  # no SIGNED within this time after the sale -> flagged missing


@dataclass(frozen=True)
class OfflineConfig:
    """Deferred (offline) authorization while the host is unreachable; off unless enabled.

    Schemes and acquirers cap what a terminal may store (Moneris: 250/500 records; Square: 24 h;
    Clover: 7 days): per-sale amount, total stored amount, stored count, and the age after which
    an offline sale that could not be forwarded is given up (NEEDS_MANUAL, never silently dropped).
    """

    enabled: bool = False
    max_sale_amount: int = 5_000
    max_total_amount: int = 50_000
    max_count: int = 250
    max_age_s: float = 86_400.0
    # Per entry mode (emv.EntryMode value) floor limit for one sale, below max_sale_amount (Adyen
    # chipFloorLimit); 0 or absent: max_sale_amount. Swiped cards (MAGSTRIPE, FALLBACK) are never stored offline.
    floor_limits: tuple[tuple[str, int], ...] = ()

    def refuse(self, amount: int, stored_count: int, stored_total: int, entry_mode: str = "") -> str:
        """The reason this sale may not be stored offline, or "" if it may."""
        if not self.enabled:
            return "NO_HOST"
        if entry_mode in SWIPED:
            return "OFFLINE_SWIPE_REFUSED"
        floor = dict(self.floor_limits).get(entry_mode) or self.max_sale_amount
        if amount > min(self.max_sale_amount, floor):
            return "OFFLINE_LIMIT_SALE_AMOUNT"
        if stored_count + 1 > self.max_count:
            return "OFFLINE_LIMIT_COUNT"
        if stored_total + amount > self.max_total_amount:
            return "OFFLINE_LIMIT_TOTAL_AMOUNT"
        return ""


SWIPED = frozenset(m.value for m in EntryMode if m.swiped)


def horizon_s(cfg: PolicyConfig) -> float:
    """How far back the rules look (double-swipe and velocity windows): a restore that starts
    later than this before its snapshot would forget what they count."""
    windows = [cfg.double_swipe_window_s, *(lim.window_s for lim in (*cfg.card_limits, *cfg.terminal_limits))]
    return max(windows, default=0.0)


OFF = PolicyConfig(double_swipe_window_s=0.0, hold_on_pending_reversal=False, card_limits=(), terminal_limits=())


class Seen(Protocol):
    """What the rules read of an earlier transaction (the engine's Txn has these attributes)."""

    key: str
    created: float
    amount: int
    kind: TxnKind
    state: TxnState


IN_FLIGHT_OR_APPROVED = frozenset({TxnState.JOURNALED, TxnState.SENT, TxnState.APPROVED, TxnState.DEFERRED,
                                   TxnState.AWAITING_COMPLETION})


class Window:
    """Count and sum of amounts in a sliding window; amortised O(1) per add and check."""

    __slots__ = ("window_s", "items", "count", "total")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.items: deque[tuple[float, int]] = deque()
        self.count = 0
        self.total = 0

    def expire(self, now: float) -> None:
        cut = now - self.window_s
        while self.items and self.items[0][0] < cut:
            self.count -= 1
            self.total -= self.items.popleft()[1]

    def add(self, at: float, amount: int) -> None:
        self.items.append((at, amount))
        self.count += 1
        self.total += amount


class History:
    """Bounded memory for the rules: each card's requests within the double-swipe window, the
    card's requests still pending (held or being reversed), and a velocity window per limit per
    card and for the terminal. ``prune`` drops what no window can see any more."""

    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        self._recent: dict[str, deque[Seen]] = {}
        self._recent_order: deque[tuple[str, Seen]] = deque()
        self._pending: dict[str, list[Seen]] = {}
        self._card_windows: dict[str, list[Window]] = {}
        self._count_order: deque[tuple[float, str]] = deque()
        self._card_horizon = max((lim.window_s for lim in cfg.card_limits), default=0.0)
        self._terminal_windows = [Window(lim.window_s) for lim in cfg.terminal_limits]

    def add(self, card_token: str, txn: Seen) -> None:
        """A new request on this card (any verdict): the double-swipe check sees it."""
        if self.cfg.double_swipe_window_s > 0:
            self._recent.setdefault(card_token, deque()).append(txn)
            self._recent_order.append((card_token, txn))

    def pending(self, card_token: str, txn: Seen) -> None:
        """This card's request is held or being reversed: new requests on the card may be held."""
        self._pending.setdefault(card_token, []).append(txn)

    def count(self, card_token: str, at: float, amount: int) -> None:
        """A sale released to the host: it counts toward the velocity windows."""
        if self.cfg.card_limits:
            ws = self._card_windows.get(card_token)
            if ws is None:
                ws = self._card_windows[card_token] = [Window(lim.window_s) for lim in self.cfg.card_limits]
            for w in ws:
                w.add(at, amount)
            self._count_order.append((at, card_token))
        for w in self._terminal_windows:
            w.add(at, amount)

    def prune(self, now: float) -> None:
        cut = now - self.cfg.double_swipe_window_s
        while self._recent_order and self._recent_order[0][1].created < cut:
            token, t = self._recent_order.popleft()
            q = self._recent.get(token)
            if q and q[0] is t:
                q.popleft()
                if not q:
                    del self._recent[token]
        cut = now - self._card_horizon
        while self._count_order and self._count_order[0][0] < cut:
            _, token = self._count_order.popleft()
            ws = self._card_windows.get(token)
            if ws is not None:
                for w in ws:
                    w.expire(now)
                if not any(w.items for w in ws):
                    del self._card_windows[token]

    def for_card(self, card_token: str) -> list[Seen]:
        """The card's requests within the double-swipe window (newest first) and those pending."""
        out = list(reversed(self._recent.get(card_token, ())))
        pend = self._pending.get(card_token)
        if pend is not None:
            pend[:] = [t for t in pend if t.state in (TxnState.REVERSAL_PENDING, TxnState.HELD)]
            if not pend:
                del self._pending[card_token]
            out += [t for t in pend or () if all(t is not o for o in out)]
        return out

    def velocity(self, card_token: str, amount: int, now: float) -> Verdict | None:
        for windows, limits, scope in ((self._card_windows.get(card_token, ()), self.cfg.card_limits, "CARD"),
                                       (self._terminal_windows, self.cfg.terminal_limits, "TERMINAL")):
            for w, lim in zip(windows, limits):
                w.expire(now)
                if lim.max_count and w.count + 1 > lim.max_count:
                    return Verdict(Action.DECLINE, f"VELOCITY_{scope}_COUNT", f"more than {lim.max_count} sales in {int(lim.window_s)} s")
                if lim.max_amount and w.total + amount > lim.max_amount:
                    return Verdict(Action.DECLINE, f"VELOCITY_{scope}_AMOUNT", f"more than {lim.max_amount} in {int(lim.window_s)} s")
        return None

    def size(self) -> int:
        """Entries held (for memory tests): bounded by the windows, not by the journal."""
        return (len(self._recent_order) + len(self._count_order) + sum(len(p) for p in self._pending.values())
                + sum(len(w.items) for w in self._terminal_windows))


def decide(kind: TxnKind, amount: int, now: float, card_recent: Sequence[Seen], history: History, card_token: str,
           cfg: PolicyConfig, *, confirmed: bool = False) -> Verdict:
    """The verdict for a new request. ``confirmed`` is the operator's CONFIRM of a held one."""
    if kind is TxnKind.VOID:
        return ALLOW
    if cfg.hold_on_pending_reversal and any(s.state is TxnState.REVERSAL_PENDING for s in card_recent):
        if not confirmed or kind is TxnKind.REFUND:
            return Verdict(Action.HOLD, "HOLD_PENDING_REVERSAL", "a reversal for this card is still pending")
    confirm = CONFIRM_AMOUNT
    if kind is not TxnKind.SALE:
        return confirm if cfg.confirm_amount and not confirmed else ALLOW
    if cfg.double_swipe_window_s > 0 and not confirmed:
        since = now - cfg.double_swipe_window_s
        for s in card_recent:
            if s.created >= since and s.amount == amount and s.kind is TxnKind.SALE and s.state in IN_FLIGHT_OR_APPROVED:
                return Verdict(Action.HOLD, "HOLD_DOUBLE_SWIPE", f"same card and amount {int(now - s.created)} s ago")
    velocity = history.velocity(card_token, amount, now)
    if velocity is not None:
        return velocity
    return confirm if cfg.confirm_amount and not confirmed else ALLOW
