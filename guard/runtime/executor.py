"""The one executor: runs an engine's actions strictly in order over small ports.

Every driver (the daemon loop, ``posguard replay``, the deterministic simulator, tests) executes
actions here and nowhere else, so the simulation exercises the code the daemon runs.

- ``Append``: one durable commit (records, vault puts and shreds). A failed commit raises: nothing
  after it runs (fail-stop), so nothing is sent or shown that the journal does not hold.
- ``SendHost``: fields 2 and 14 are filled from the action's card or, after a restart, from the
  vault blob ``card_ref``. Not connected or NOT_SENT: ``engine.send_failed`` (NOT_SENT also drops
  the link); MAYBE_SENT: the link is dropped and ``engine.on_host_down`` runs. What the engine
  returns then runs before the rest of the actions.
- ``Reply``: handed to the reader port.

Every call into an engine entry point goes through ``invoke``, which also answers the engine's
``Load`` ("need data": the journal entries of a transaction it no longer keeps in memory) from the
store and repeats the call. ``Policy`` carries the replay's batching: consecutive Appends coalesced into
one commit (still before any later send or reply, so write-ahead holds), TCP cork around bursts
of sends, and host answers of one burst collected to run with the round's tick.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from guard.core import constants as C
from guard.core.engine import Action, Append, Engine, Reply, SendHost, card_from_plaintext
from guard.core.model import CardData
from guard.hostlink.uplink import SendOutcome
from guard.runtime import restore
from guard.runtime.events import log_committed
from guard.runtime.ports import Clock, HostPort, ReaderPort, Record, StorePort


@dataclass(frozen=True)
class Policy:
    """How actions are grouped; the default is the daemon's one commit per Append."""

    coalesce: bool = False  # consecutive Appends -> one commit (before any later SendHost / Reply)
    cork: bool = False  # TCP cork around back-to-back SendHosts
    collect: bool = False  # actions of ``defer``red calls run with the next ``call``'s


DAEMON = Policy()
BATCH = Policy(coalesce=True, cork=True, collect=True)  # posguard replay: throughput over latency


def card_fields(card: CardData, wanted: frozenset[str] | None, ksn_field: str) -> dict[str, str]:
    """The ISO 8583 fields of ``card`` a message carries (``wanted``; None: all it has): 2, 14,
    23, 35, 52 with its KSN, 55 (binary fields as hex, as the codec takes them)."""
    out = {C.F_PAN: card.pan}
    if card.expiry:
        out[C.F_EXPIRY] = card.expiry
    if card.pan_seq:
        out[C.F_CARD_SEQ] = card.pan_seq
    if card.track2:
        out[C.F_TRACK2] = card.track2
    if card.pin_block:
        out[C.F_PIN_BLOCK] = card.pin_block.hex().upper()
        out[ksn_field] = card.ksn.hex().upper()
    if card.icc:
        out[C.F_ICC] = card.icc.hex().upper()
    if wanted is not None:
        out = {k: v for k, v in out.items() if k in wanted}
    return out


class Executor:
    """Runs ``engine``'s actions over ``store``, ``host`` and ``reader`` with ``clock``'s time."""

    def __init__(self, engine: Engine, store: StorePort, host: HostPort, reader: ReaderPort, clock: Clock, *,
                 policy: Policy = DAEMON, on_commit: Callable[[Sequence[Record]], None] | None = None,
                 before: Callable[[Action], None] | None = None) -> None:
        self.engine = engine
        self.store = store
        self.host = host
        self.reader = reader
        self.clock = clock
        self.policy = policy
        self.on_commit = on_commit  # after each durable commit, with its records (replay forgets finals)
        self.before = before  # before each action (the simulator's power loss); may raise
        self._pending: list[Action] = []

    # ------------------------------------------------------------------ engine entry points

    def invoke(self, fn: Callable[..., list[Action]], *args: Any) -> list[Action]:
        """Call engine entry point ``fn(*args, now)``; the only place the engine is called from.
        A ``Load`` is answered from the store and the call repeated (the engine changed nothing)."""
        now = self.clock()
        return restore.call(self.engine, self.store, lambda: fn(*args, now))

    def status(self, key: str) -> Any:
        """STATUS(id) from memory or, for an evicted transaction, from its journal entries."""
        return restore.status(self.engine, self.store, key)

    def call(self, fn: Callable[..., list[Action]], *args: Any) -> None:
        """Call ``fn(*args, now)`` and run its actions (after any deferred ones)."""
        acts = self.invoke(fn, *args)
        if self._pending:
            acts, self._pending = self._pending + acts, []
        self.run(acts)

    def defer(self, fn: Callable[..., list[Action]], *args: Any) -> None:
        """Like ``call``; with ``policy.collect`` the actions wait for the next ``call`` or ``flush``."""
        if not self.policy.collect:
            self.call(fn, *args)
            return
        self._pending += self.invoke(fn, *args)

    def flush(self) -> None:
        """Run deferred actions now."""
        acts, self._pending = self._pending, []
        if acts:
            self.run(acts)

    def lost_connection(self, notify: bool = True) -> None:
        """The link went away outside a send (peer closed, read error): drop it, tell the engine."""
        self.host.drop(self.clock())
        if notify:
            self.call(self.engine.on_host_down)

    def checkpoint_if_due(self) -> None:
        self.store.maybe_checkpoint(self.clock())

    # ------------------------------------------------------------------ actions

    def run(self, actions: Iterable[Action]) -> None:
        """Run ``actions`` in order; what a send returns runs before the rest. A failed commit raises."""
        queue: deque[Action] = deque(actions)
        coalesce, cork = self.policy.coalesce, self.policy.cork
        buf: Append | None = None
        while queue:
            a = queue.popleft()
            if self.before is not None:
                self.before(a)
            if isinstance(a, Append):
                if not coalesce:
                    self._commit(a)
                elif buf is None:
                    buf = Append(list(a.records), list(a.vault_put), list(a.vault_shred))
                else:
                    buf.records.extend(a.records)
                    buf.vault_put.extend(a.vault_put)
                    buf.vault_shred.extend(a.vault_shred)
                continue
            if buf is not None:  # write-ahead: commit before anything that depends on it
                self._commit(buf)
                buf = None
            if isinstance(a, SendHost):
                burst = cork and bool(queue) and isinstance(queue[0], SendHost)
                if burst:
                    self.host.cork(True)  # let the kernel send the burst in as few segments as it can
                queue.extendleft(reversed(self._send(a)))
                if cork and not (queue and isinstance(queue[0], SendHost)):
                    self.host.cork(False)
            elif isinstance(a, Reply):
                self.reader.deliver(a.result)
        if buf is not None:
            self._commit(buf)

    def _commit(self, a: Append) -> None:
        self.store.append(a.records, now=self.clock(), vault_put=a.vault_put, vault_shred=a.vault_shred)
        log_committed(a.records)
        if self.on_commit is not None:
            self.on_commit(a.records)

    def _send(self, a: SendHost) -> list[Action]:
        host = self.host
        if not host.connected:
            return self.invoke(self.engine.send_failed, a.key)
        fields = dict(a.fields)
        card = a.card
        if card is None and a.card_ref:
            plain = self.store.vault_open(a.card_ref)
            card = card_from_plaintext(plain) if plain else None
        if card is not None:
            fields.update(card_fields(card, a.card_fields, a.ksn_field))
        outcome = host.send(fields)
        if outcome is SendOutcome.NOT_SENT:
            acts = self.invoke(self.engine.send_failed, a.key)
            host.drop(self.clock())
            return acts
        if outcome is SendOutcome.MAYBE_SENT:
            host.drop(self.clock())
            return self.invoke(self.engine.on_host_down)
        return []
