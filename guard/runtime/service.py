"""The driver: owns the journal and the host connection, feeds the engine, executes its actions.

Actions run strictly in order; a failed commit stops everything after it (fail-stop), so nothing
is ever sent or shown that the journal does not hold. The loop is a plain ``selectors`` loop so
the reader's serial port can share it (``register``).
"""

from __future__ import annotations

import logging
import selectors
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from guard.core.engine import Action, Append, Engine, Reply, SendHost, card_from_plaintext
from guard.runtime import restore
from guard.journal.store import Journal
from guard.journal.keys import CARD_TOKEN_HEX_LEN
from guard.journal.mac import HmacSha256
from guard.core.model import Result
from guard.hostlink.uplink import Disconnected, SendOutcome, Uplink
from guard.hostlink.iso import HostGarbage, HostMessage

log = logging.getLogger("posguard.service")
REPLIES_KEPT = 1024  # latest results kept for callers polling by key; older ones: engine.status(key)
CONNECT_POLL_S = 0.02  # while the uplink is connecting, call connect() again this often


class JournalCrypto:
    """Card token and vault sealing backed by the device keys and the journal's vault."""

    def __init__(self, journal: Journal, token_key: bytes) -> None:
        self.journal = journal
        self.token_key = token_key
        self._mac = HmacSha256(token_key)  # keys.card_token's value, padded key prepared once

    def token(self, pan: str) -> str:
        return self._mac.digest(pan.encode()).hex()[:CARD_TOKEN_HEX_LEN]

    def seal(self, txn: str, plaintext: bytes) -> Any:
        return self.journal.seal_vault(txn, plaintext)


class GuardService:
    """One terminal's guard: journal + engine + uplink, driven by ``step``."""

    def __init__(
        self,
        engine: Engine,
        journal: Journal,
        uplink: Uplink,
        *,
        clock: Callable[[], float] = time.time,
        reconnect_s: float = 1.0,
        on_reply: Callable[[Result], None] | None = None,
    ) -> None:
        self.engine = engine
        self.journal = journal
        self.uplink = uplink
        self.clock = clock
        self.reconnect_s = reconnect_s
        self.on_reply = on_reply or (lambda r: None)
        self.selector = selectors.DefaultSelector()
        self._next_connect = 0.0
        self._registered_fd: int | None = None
        self._extra: dict[int, Callable[[], None]] = {}
        self.replies: OrderedDict[str, Result] = OrderedDict()
        self.tickers: list[Callable[[], None]] = []  # run every loop round (reader link timers)
        self.wait_hints: list[Callable[[], float]] = []  # seconds until another adapter has timer work

    # ------------------------------------------------------------------ actions

    def execute(self, actions: Iterable[Action]) -> None:
        """Run ``actions`` in order; what a send returns runs before the rest. A failed commit raises."""
        for a in actions if type(actions) is list else list(actions):
            if isinstance(a, Append):
                self.journal.append(a.records, now=self.clock(), vault_put=a.vault_put, vault_shred=a.vault_shred)
            elif isinstance(a, SendHost):
                follow = self._send(a)
                if follow:
                    self.execute(follow)
            elif isinstance(a, Reply):
                r = a.result
                replies = self.replies
                replies[r.key] = r
                replies.move_to_end(r.key)
                while len(replies) > REPLIES_KEPT:
                    replies.popitem(last=False)
                self.on_reply(r)

    def _send(self, a: SendHost) -> list[Action]:
        now = self.clock()
        if not self.uplink.connected:
            return self.engine.send_failed(a.key, now)
        fields = dict(a.fields)
        card = a.card
        if card is None and a.card_ref:
            plain = self.journal.vault_open(a.card_ref)
            card = card_from_plaintext(plain) if plain else None
        if card is not None:
            fields["2"] = card.pan
            if card.expiry:
                fields["14"] = card.expiry
        outcome = self.uplink.send(fields)
        if outcome is SendOutcome.NOT_SENT:
            acts = self.engine.send_failed(a.key, now)
            self._lost_connection(now, notify=False)
            return acts
        if outcome is SendOutcome.MAYBE_SENT:
            return self._lost_connection(now)
        return []

    # ------------------------------------------------------------------ reader entry points

    def submit(self, request: Any) -> None:
        """Accept a reader request (raises IdempotencyConflict / RequestInvalid, nothing lost)."""
        self.call(lambda: self.engine.submit(request, self.clock()))

    def call(self, fn: Callable[[], list[Action]]) -> None:
        """Run an engine entry point (answering its Load from the journal) and execute its actions."""
        self.execute(restore.call(self.engine, self.journal, fn))

    # ------------------------------------------------------------------ loop

    def register(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Let another adapter (the reader's serial port) share the loop."""
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def unregister(self, fileobj: Any) -> None:
        self.selector.unregister(fileobj)

    def _lost_connection(self, now: float, notify: bool = True) -> list[Action]:
        if self._registered_fd is not None:
            try:
                self.selector.unregister(self._registered_fd)
            except (KeyError, ValueError):
                pass
            self._registered_fd = None
        self.uplink.close()
        self._next_connect = now + self.reconnect_s
        return self.engine.on_host_down(now) if notify else []

    def _ensure_connected(self, now: float) -> None:
        if self.uplink.connected or now < self._next_connect:
            return
        if self.uplink.connect():
            fd = self.uplink.fileno()
            self.selector.register(fd, selectors.EVENT_READ, self._on_host_readable)
            self._registered_fd = fd
            log.info("host connected")
            self.execute(self.engine.on_host_up(self.clock()))
        elif getattr(self.uplink, "connecting", False):
            self._next_connect = now + CONNECT_POLL_S  # non-blocking attempt: advance it soon
        else:
            self._next_connect = now + self.reconnect_s

    def _on_host_readable(self) -> None:
        for item in self.uplink.poll():
            now = self.clock()
            if isinstance(item, HostMessage):
                self.execute(self.engine.host_message(item.fields, now))
            elif isinstance(item, HostGarbage):
                log.warning("host sent unusable bytes: %s (%d bytes)", item.code, item.raw_len)
                self.execute(self.engine.host_garbage(item.code, item.detail, item.raw_len, item.digest, now))
            elif isinstance(item, Disconnected):
                log.warning("host connection lost")
                self.execute(self._lost_connection(now))
                return

    def step(self, max_wait: float = 0.05) -> None:
        """One loop round: reconnect if due, wait for input up to the next deadline, fire timers."""
        now = self.clock()
        self._ensure_connected(now)
        flush = getattr(self.uplink, "flush", None)
        if self._registered_fd is not None and flush is not None and not flush():
            self._on_host_readable()  # the outbox stalled or failed: poll() reports the Disconnected
        deadline = self.engine.next_deadline()
        wait = max_wait if deadline is None else max(0.0, min(max_wait, deadline - now))
        if not self.uplink.connected:
            wait = min(wait, max(0.0, self._next_connect - now))
        for hint in self.wait_hints:
            wait = min(wait, hint())
        for key, _ in self.selector.select(wait):
            key.data()
        for ticker in self.tickers:
            ticker()
        self.execute(self.engine.tick(self.clock()))
        self.journal.maybe_checkpoint(self.clock())

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if done():
                return True
            self.step()
        return done()

    def drain(self, timeout: float) -> bool:
        """Run until nothing awaits the host (all sales decided, reversal queue empty)."""
        return self.run_until(lambda: not self.engine.busy(), timeout)

    def close(self) -> None:
        if self._registered_fd is not None:
            try:
                self.selector.unregister(self._registered_fd)
            except (KeyError, ValueError):
                pass
        self.uplink.close()
        self.selector.close()
        self.journal.close()


def open_guard(
    journal_path: Any,
    keys: Any,
    ecfg: Any,
    uplink: Uplink,
    *,
    rng: Any = None,
    clock: Callable[[], float] = time.time,
    **kwargs: Any,
) -> GuardService:
    """Open (or create) the journal, rebuild the engine from it and queue recovery reversals.

    Every intent without an outcome is moved to REVERSAL_PENDING (committed) before the uplink
    is even connected: a sale interrupted by a crash is never left to chance.
    """
    from pathlib import Path

    from guard.core.engine import Engine

    path = Path(journal_path)
    if path.exists():
        journal = Journal.open(path, keys, terminal_id=ecfg.terminal_id)
    else:
        journal = Journal.create(path, keys, terminal_id=ecfg.terminal_id, now=clock())
    try:
        engine = restore.restore_engine(ecfg, JournalCrypto(journal, keys.token_key), journal, rng)
        svc = GuardService(engine, journal, uplink, clock=clock, **kwargs)
        svc.execute(engine.recover(clock()))
    except BaseException:
        journal.close()
        raise
    return svc
