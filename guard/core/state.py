"""The engine's state and the internals every kind of event shares: bounded memory of
transactions, loading evicted ones as data the executor hands in, and the record-writing steps
(finish, reverse) that change a transaction's state through ``txn.evolve``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from random import Random  # the injected randomness's default type; never drawn from the OS here
from typing import Any, TypeVar, cast

from guard.core import constants as C
from guard.core.actions import Action, Append, EngineConfig, Load, Randomness, Reply, SendHost
from guard.core.errors import JournalError
from guard.core.fields import transmission_dt
from guard.core.keyfilter import KeyFilter
from guard.core.model import CardData, TxnKind, TxnState
from guard.core.policies import History
from guard.core.records import Kind, Record
from guard.core.txn import CardCrypto, Txn, evolve, rebuild

AWAITING = frozenset({TxnState.JOURNALED, TxnState.SENT})
WATCHED = frozenset({TxnState.JOURNALED, TxnState.SENT, TxnState.HELD, TxnState.PARTIAL, TxnState.AWAITING_COMPLETION})  # states with a timer or a drain to wait for


class NeedData(Exception):
    """Raised inside the engine before any state change; entry points turn it into ``Load``."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__(keys)
        self.keys = keys


F = TypeVar("F", bound=Callable[..., list[Action]])


def entry(fn: F) -> F:
    """An event entry point: a ``NeedData`` raised before any state change becomes ``[Load]``;
    data handed in by ``load`` is dropped once the call has used it; write-ahead is asserted."""

    def call(self: EngineState, *args: Any, **kwargs: Any) -> list[Action]:
        mark = self._mark()
        try:
            acts = fn(self, *args, **kwargs)
        except NeedData as n:
            assert self._mark() == mark, f"{fn.__name__} changed state before asking for data"
            return [Load(n.keys)]
        if self._loaded:
            self._loaded.clear()
        assert write_ahead(acts), f"{fn.__name__}: a send before the commit it depends on: {acts}"
        return acts

    call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return cast(F, call)


def write_ahead(acts: Sequence[Action]) -> bool:
    """No ``SendHost`` before the first ``Append`` of the same list: every message the engine
    sends follows the commit of the intent or attempt it carries."""
    for a in acts:
        if isinstance(a, Append):
            return True
        if isinstance(a, SendHost):
            return False
    return True


class EngineState:
    """State shared by the reader-side and host-side events. Not thread-safe: one executor owns it."""

    def __init__(self, cfg: EngineConfig, crypto: CardCrypto, rng: Randomness | None = None) -> None:
        self.cfg = cfg
        self.crypto = crypto
        self.rng: Randomness = rng or Random(0)
        # Every key the journal holds (added at its intent, and archived ones): a key in neither
        # memory nor this filter is new; one in the filter but not in memory is read back.
        self._evicted = KeyFilter()
        self._loaded: dict[str, Txn | None] = {}  # handed in by ``load`` for the call being retried
        self._finals: OrderedDict[str, None] = OrderedDict()
        self.txns: dict[str, Txn] = {}
        self.newest: dict[str, str] = {}  # reader id -> key of its newest transaction (STATUS LAST)
        self.by_stan: dict[int, str] = {}
        self.last_stan = 0
        self.host_up = False
        self.last_host_activity = 0.0
        self.echo_stan: int | None = None
        self.echo_deadline: float | None = None
        self.deposit_stan: int | None = None
        self.deposit_result: str | None = None  # the host's field 39 for the last checkpoint deposit
        self._saf: OrderedDict[str, None] = OrderedDict()  # pending reversals, journal order
        self._adv: OrderedDict[str, None] = OrderedDict()  # deferred sales owing an 0220, journal order
        self._stored: dict[str, int] = {}  # DEFERRED (not final) sales -> amount, for the offline limits
        self._held_cards: dict[str, CardData] = {}  # HELD sales with an online PIN: their card, memory only
        self._sig_due: dict[str, float] = {}  # approved sales awaiting a signature -> when it is missing
        # Keys that may be in a WATCHED state (a superset, pruned lazily): timers and drains look at
        # these instead of every transaction in memory (up to keep_final), once per loop round.
        self._watch: dict[str, None] = {}
        self.stats: dict[str, int] = {}
        self.history = History(cfg.policy)
        self._f7_sec = -1.0
        self._f7 = ""
        self._writes = 0  # records made: an entry point asking for data must not have made one

    def _mark(self) -> tuple[int, int, int]:
        """What any state change moves (reading a transaction back into memory is not one)."""
        return self.last_stan, len(self._saf), self._writes

    # ------------------------------------------------------------------ bounded memory

    def load(self, key: str, entries: Iterable[Any]) -> None:
        """The executor's answer to ``Load``: ``key``'s journal entries (none if it has none)."""
        try:
            self._loaded[key] = rebuild(key, entries)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise corrupt(f"of {key}", exc) from None

    def _maybe_journaled(self, key: str) -> bool:
        return bool(key) and key not in self.txns and key not in self._loaded and key in self._evicted

    def _get(self, key: str) -> Txn | None:
        """A transaction, brought back into memory if it was evicted (raises NeedData first)."""
        t = self.txns.get(key)
        if t is not None or not key:
            return t
        if self._maybe_journaled(key):
            raise NeedData((key,))
        t = self._loaded.get(key)
        if t is None:
            return None
        self.count("reloaded")
        self.txns[key] = t
        self._watch[key] = None
        # Findable by STAN again, like at its intent: a VOID or completion failure reverses it
        # and the 0410 must find it (a VOID shares its sale's STAN and never owns the slot).
        if t.kind is not TxnKind.VOID and self.by_stan.get(t.stan) not in self.txns:
            self.by_stan[t.stan] = key
        if t.state.final:
            self._finalized(t)
        return t

    def _peek_many(self, keys: Sequence[str]) -> list[Txn | None]:
        """Transactions to look at without bringing them back into memory (reading one back may
        evict the one the caller holds). Raises NeedData for all missing ones at once."""
        missing = tuple(k for k in keys if self._maybe_journaled(k))
        if missing:
            raise NeedData(missing)
        return [self.txns.get(k) or self._loaded.get(k) for k in keys]

    def _finalized(self, t: Txn) -> None:
        """Final transactions stay in memory up to ``keep_final``; older ones are read back from
        the journal when a reader asks about them (idempotency and STATUS never forget)."""
        assert t.state.final, t.state
        self._watch.pop(t.key, None)
        self._held_cards.pop(t.key, None)
        self._adv.pop(t.key, None)
        self._stored.pop(t.key, None)
        self._finals[t.key] = None
        self._finals.move_to_end(t.key)
        while len(self._finals) > self.cfg.keep_final:
            old, _ = self._finals.popitem(last=False)
            o = self.txns.get(old)
            if o is None or not o.state.final:
                continue
            self.forget(old)
            self.count("evicted")

    def note_archived(self, key_hashes: Iterable[int]) -> int:
        """Ids (``txn_key_hash``) of transactions compaction archived: looked up if a reader re-uses one."""
        n = 0
        for n, h in enumerate(key_hashes, 1):
            self._evicted.add_hash(h)
        return n

    def open_keys(self) -> list[str]:
        """Transactions a restore must bring back even if their entries lie before where it
        starts reading (``guard.runtime.snapshot``): not final, or owing the host or the operator
        something (a reversal, an advice, a signature)."""
        queued = (self._saf, self._adv, self._stored, self._sig_due)
        out = []
        for key in dict.fromkeys([*self._watch, *self._saf, *self._adv, *self._stored, *self._sig_due]):
            t = self.txns.get(key)
            if t is not None and (not t.state.final or any(key in q for q in queued)):
                out.append(key)
        return out

    def in_flight(self) -> bool:
        """A request sits between its intent and its answer (retention waits for a moment without one)."""
        return any(t.state in AWAITING for t in self._watched(prune=False))

    def key_filter(self) -> bytes:
        """The filter of every journaled key, for a snapshot (restored by ``load_key_filter``)."""
        return bytes(self._evicted.bits)

    def load_key_filter(self, bits: bytes) -> None:
        """Start from a snapshot's key filter instead of reading every key of the journal."""
        if len(bits) != len(self._evicted.bits):
            raise JournalError("snapshot key filter has the wrong size", code="JOURNAL_CORRUPT")
        self._evicted.bits[:] = bits

    def forget(self, key: str) -> None:
        """Drop a transaction from memory; the executor can hand it back with ``load``."""
        t = self.txns.pop(key, None)
        self._evicted.add(key)
        if t is not None and self.by_stan.get(t.stan) == key:
            del self.by_stan[t.stan]

    def _watched(self, prune: bool = True) -> list[Txn]:
        """Transactions in a WATCHED state, in the order they were first watched; events prune the
        rest, queries (``prune=False``) leave the set as it is."""
        out: list[Txn] = []
        gone: list[str] = []
        txns = self.txns
        for key in self._watch:
            t = txns.get(key)
            if t is not None and t.state in WATCHED:
                out.append(t)
            else:
                gone.append(key)
        if prune:
            for key in gone:
                del self._watch[key]
        return out

    # ------------------------------------------------------------------ shared steps

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def f7(self, now: float) -> str:
        """Field 7 for ``now``; every message within one second shares it."""
        sec = now // 1
        if sec != self._f7_sec:
            self._f7_sec, self._f7 = sec, transmission_dt(now)
        return self._f7

    def _next_stan(self, now: float) -> int:
        """The next STAN: 000001-999999, wrapping; with ``stan_clock_floor`` never below the
        clock's floor for ``now`` (1 + 11 per second since UTC midnight), so a journal replaced or
        restored the same day cannot reuse a STAN its predecessor drew (constants: STANs)."""
        nxt = self.last_stan + 1
        if self.cfg.stan_clock_floor:
            nxt = max(nxt, stan_floor(now))
        self.last_stan = nxt if nxt <= C.STAN_MAX else (stan_floor(now) if self.cfg.stan_clock_floor else C.STAN_MIN)
        return self.last_stan

    def _record(self, t: Txn, kind: Kind, payload: dict[str, Any]) -> Record:
        """Apply a record to ``t`` (the same ``evolve`` restore uses) and return it for the commit."""
        evolve(t, kind, payload)
        self._writes += 1
        return (kind, t.key, payload)

    def _shred(self, t: Txn) -> list[str]:
        ref, t.vault_ref = t.vault_ref, None
        return [ref] if ref else []

    def _finish(self, t: Txn, state: TxnState, *, approval: str = "", rrn: str = "", reason: str = "",
                approved_amount: int | None = None, extra: dict[str, Any] | None = None) -> list[Action]:
        if state is TxnState.APPROVED:
            self._sig_watch(t, required=True)
        payload: dict[str, Any] = {"state": state.value, "rc": t.rc, "approval": approval, "rrn": rrn, "reason": reason}
        if approved_amount is not None:
            payload["approved_amount"] = approved_amount
        if t.signature:
            payload["signature"] = t.signature
        payload.update(extra or {})
        rec = self._record(t, Kind.OUTCOME, payload)
        self.count(state.value.lower())
        self._finalized(t)
        return [Append([rec], vault_shred=self._shred(t)), Reply(t.result())]

    def _sig_watch(self, t: Txn, required: bool = False) -> None:
        """Start the missing-signature clock for a sale shown as approved above the limit."""
        lim = self.cfg.policy.signature_above
        if required and t.kind is TxnKind.SALE and lim and t.amount > lim and not t.signature:
            t.signature = "REQUIRED"
        if t.signature == "REQUIRED":
            self._sig_due[t.key] = t.created + self.cfg.policy.signature_timeout_s

    def _to_reversal(self, t: Txn, reason: str, now: float, extra: dict[str, Any] | None = None) -> Record:
        """UNKNOWN outcome or an undo: REVERSAL_PENDING, queued; returns the record to commit."""
        rec = self._record(t, Kind.REVERSAL_PENDING, {"reason": reason, "stan": t.stan, **(extra or {})})
        t.issuer_icc = b""
        self.history.pending(t.card_token, t)
        self._finals.pop(t.key, None)
        t.rev_next_at, t.rev_since = now, 0.0
        self._saf[t.key] = None
        return rec

    def _reverse_many(self, ts: Sequence[Txn], reason: str, now: float, extra: dict[str, Any] | None = None) -> list[Action]:
        """Commit REVERSAL_PENDING before telling the reader anything."""
        recs = [self._to_reversal(t, reason, now, extra) for t in ts]
        self.count("reversal_pending", len(recs))
        acts: list[Action] = [Append(recs)]
        acts += [Reply(t.result()) for t in ts]
        acts += self._dispatch_reversals(now)
        return acts

    def _dispatch_reversals(self, now: float) -> list[Action]:  # pragma: no cover - HostEvents
        raise NotImplementedError

    def tick(self, now: float) -> list[Action]:  # pragma: no cover - Engine
        raise NotImplementedError

    def _backoff(self, failures: int) -> float:
        base: float = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** max(0, failures - 1)))
        return base * (0.5 + self.rng.random() / 2)

    def _void_follow(self, o: Txn, state: TxnState) -> tuple[list[Record], list[Action]]:
        """The VOID's outcome record and reply when the sale it voids is settled."""
        v = self.txns.get(o.voided_by or "")
        if v is None or v.state.final:
            return [], []
        reason = "" if state is TxnState.APPROVED else o.reason
        rec = self._record(v, Kind.OUTCOME, {"state": state.value, "rc": "", "approval": "", "rrn": "", "reason": reason})
        self._finalized(v)
        return [rec], [Reply(v.result())]


def stan_floor(now: float) -> int:
    """The lowest STAN drawn at ``now``: 1 + STAN_FLOOR_PER_SECOND per second since UTC midnight."""
    return 1 + int(now % 86_400) * C.STAN_FLOOR_PER_SECOND


def corrupt(where: Any, exc: BaseException) -> JournalError:
    """A journal entry the engine cannot replay (bit rot, or edited without the keys): a journal
    failure naming where, never a traceback. The exception text is left out: it quotes payload."""
    return JournalError(f"journal entry {where} cannot be replayed ({type(exc).__name__}); `posguard journal verify` "
                        "names the first entry that changed", code="JOURNAL_CORRUPT")
