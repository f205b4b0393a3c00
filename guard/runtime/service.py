"""The daemon loop: owns the journal and the host connection, feeds the engine through the one
``Executor`` and serves readers through the ``GuardFacade``.

Actions run strictly in order (``guard.runtime.executor``); a failed commit stops everything after
it (fail-stop), so nothing is ever sent or shown that the journal does not hold. The loop is a
plain ``selectors`` loop so the reader's serial port can share it (``register``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import selectors
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

from guard.core.engine import Action, Engine
from guard.core.model import Result
from guard.hostlink.iso import HostGarbage, HostMessage
from guard.hostlink.uplink import Disconnected, SendOutcome, Uplink
from guard.core.records import Kind
from guard.journal.format import CHECKPOINT_KIND, canonical_json
from guard.journal.keys import CARD_TOKEN_HEX_LEN
from guard.journal.store import Journal
from guard.runtime.restore import restore
from guard.runtime.snapshot import Snapshotter
from guard.runtime.executor import DAEMON, Executor, Policy
from guard.runtime.facade import REPLIES_KEPT, GuardFacade
from guard.runtime.ports import Clock, RandBytes, Record

log = logging.getLogger("posguard.service")
CONNECTING_WAIT_S = 0.02  # select cap while a non-blocking connect / TLS handshake makes progress
GARBAGE_PER_CONNECTION = 64  # unusable frames (garbage, unmatched answers) one connection may send before it is dropped
GARBAGE_BACKOFF_MAX_S = 60.0  # cap of the reconnect delay, doubled after each connection dropped for garbage
HOST_DOWN_LOG_EVERY_S = 60.0  # while the host stays unreachable for the same reason, one log line per this many seconds
DEPOSIT_ANSWER_S = 30.0  # a checkpoint deposit unanswered this long no longer holds back the next one
_DEPOSIT_NOISE = frozenset({CHECKPOINT_KIND, Kind.CHECKPOINT_DEPOSITED.value, Kind.STAN_USE.value})  # a deposit's own traffic
__all__ = ["GuardService", "JournalCrypto", "open_guard", "REPLIES_KEPT"]


class JournalCrypto:
    """Card token and vault sealing backed by the device keys and the journal's vault.

    ``randbytes`` is the randomness port: vault nonces come from it (os.urandom in the daemon,
    a seeded source in the simulator, so a seed's journal is byte-identical run after run).
    """

    def __init__(self, journal: Journal, token_key: bytes, randbytes: RandBytes = os.urandom) -> None:
        self.journal = journal
        self.token_key = token_key
        self.randbytes = randbytes
        # HMAC-SHA256 (RFC 2104) with the padded keys prepared once: the same value as
        # keys.card_token, at a fraction of hmac.digest's per-call cost under OpenSSL 3.
        key = token_key if len(token_key) <= 64 else hashlib.sha256(token_key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))  # states after the padded key block
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def token(self, pan: str) -> str:
        inner = self._inner.copy()
        inner.update(pan.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:CARD_TOKEN_HEX_LEN]

    def seal(self, txn: str, plaintext: bytes) -> Any:
        return self.journal.seal_vault(txn, plaintext, rng=self.randbytes)


class _UplinkPort:
    """HostPort over the service's uplink; ``drop`` also leaves the select loop and schedules a reconnect."""

    def __init__(self, svc: GuardService) -> None:
        self.svc = svc

    @property
    def connected(self) -> bool:
        return self.svc.uplink.connected

    def send(self, fields: dict[str, str]) -> SendOutcome:
        return self.svc.uplink.send(fields)

    def drop(self, now: float) -> None:
        self.svc._drop_link(now)

    def cork(self, on: bool) -> None:
        cork = getattr(self.svc.uplink, "cork", None)
        if cork is not None:
            cork(on)


class GuardService:
    """One terminal's guard: journal + engine + uplink, driven by ``step``.

    ``clock`` is the one clock (wall-clock seconds) shared by the executor, the loop and the
    reader adapters. ``policy`` groups actions (``executor.BATCH`` for the replay); with
    ``policy.collect`` the loop also polls briefly right after a burst of host answers instead
    of scanning the engine's deadlines.
    """

    def __init__(
        self,
        engine: Engine,
        journal: Journal,
        uplink: Uplink | Any,
        *,
        clock: Clock = time.time,
        reconnect_s: float = 1.0,
        on_reply: Callable[[Result], None] | None = None,
        policy: Policy = DAEMON,
        on_commit: Callable[[Sequence[Record]], None] | None = None,
        deposit_checkpoints: bool | None = None,
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
        self._had_input = False
        self._garbage_seen = 0  # unusable frames on the current connection
        self._garbage_drops = 0  # connections dropped in a row for garbage: the reconnect backoff's exponent
        self.tickers: list[Callable[[], None]] = []  # run every loop round (reader link timers)
        self.wait_hints: list[Callable[[], float]] = []  # seconds until another adapter has timer work
        self.guard = GuardFacade(engine)
        self.executor = Executor(engine, journal, _UplinkPort(self), self.guard, clock, policy=policy,
                                 on_commit=on_commit)
        self.guard.executor = self.executor
        self.guard.subscribe("", lambda r: self.on_reply(r))
        # the daemon deposits each new checkpoint; ``replay`` (BATCH) deposits one when drained
        self.deposit_checkpoints = policy is DAEMON if deposit_checkpoints is None else deposit_checkpoints
        self._deposited_cp_seq = self._cp_seq()  # the newest checkpoint handed to (or skipped for) the host
        self._deposit_sent_at = 0.0
        self._down: dict[str, Any] = {}  # the current host outage: since, reason, attempts, logged_at
        self.snapshots: Snapshotter | None = None  # open_guard sets it: the daemon snapshots its state
        self.retention: Any = None  # a guard.runtime.retention.Retention: the daemon archives on its own

    @property
    def replies(self) -> OrderedDict[str, Result]:
        """Latest results by key (the newest REPLIES_KEPT)."""
        return self.guard.replies

    def execute(self, actions: Iterable[Action]) -> None:
        """Run already computed actions through the executor (callers outside the loop)."""
        self.executor.run(actions)

    def submit(self, request: Any) -> None:
        """Accept a reader request (raises IdempotencyConflict / RequestInvalid, nothing lost)."""
        self.guard.submit(request)

    # ------------------------------------------------------------------ loop

    def register(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Let another adapter (the reader's serial port) share the loop."""
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def unregister(self, fileobj: Any) -> None:
        self.selector.unregister(fileobj)

    def _drop_link(self, now: float) -> None:
        if self._registered_fd is not None:
            try:
                self.selector.unregister(self._registered_fd)
            except (KeyError, ValueError):
                pass
            self._registered_fd = None
        self.uplink.close()
        self._next_connect = now + self._reconnect_delay()

    def _reconnect_delay(self) -> float:
        """``reconnect_s``, doubled per connection dropped in a row for sending garbage."""
        if not self._garbage_drops:
            return self.reconnect_s
        return min(self.reconnect_s * 2.0 ** min(self._garbage_drops, 16), max(self.reconnect_s, GARBAGE_BACKOFF_MAX_S))

    def _ensure_connected(self, now: float) -> None:
        if self.uplink.connected or now < self._next_connect:
            return
        if self.uplink.connect():
            fd = self.uplink.fileno()
            self.selector.register(fd, selectors.EVENT_READ, self._on_host_readable)
            self._registered_fd = fd
            self._garbage_seen = 0
            down, self._down = self._down, {}
            fields = {"event": "host_connected", "host": self._host_name()}
            if down:
                fields.update(down_s=round(now - down["since"], 1), attempts=down["attempts"])
            log.info("host connected", extra={"fields": fields})
            self.executor.call(self.engine.on_host_up)
        elif not getattr(self.uplink, "connecting", False):  # in progress: call connect() again next round
            self._next_connect = now + self.reconnect_s
            self._host_unreachable(now)

    def _host_name(self) -> str:
        return f"{getattr(self.uplink, 'host', '?')}:{getattr(self.uplink, 'port', '?')}"

    def _host_unreachable(self, now: float) -> None:
        """One structured line when an outage starts or its reason changes, then one per
        HOST_DOWN_LOG_EVERY_S: refused, DNS failure, timeout, TLS handshake (``Uplink.last_error``)."""
        reason = getattr(self.uplink, "last_error", "") or "CONNECT_FAILED"
        down = self._down
        if not down:
            down.update(since=now, attempts=0, reason="", logged_at=now)
        down["attempts"] += 1
        if reason == down["reason"] and now < down["logged_at"] + HOST_DOWN_LOG_EVERY_S:
            return
        down.update(reason=reason, logged_at=now)
        log.warning("host unreachable: %s", reason, extra={"fields": {
            "event": "host_unreachable", "host": self._host_name(), "reason": reason, "attempts": down["attempts"],
            "down_s": round(now - down["since"], 1), "reversals_queued": self.engine.pending_reversals()}})

    def _on_host_readable(self) -> None:
        """Hand what the host sent to the engine (one bounded ``poll`` per round). A connection
        that sends more than GARBAGE_PER_CONNECTION unusable frames (undecodable, or answers that
        match nothing we sent: each costs a commit) is dropped and reconnected with a growing
        delay: a hostile or broken peer cannot keep the loop and the disk busy."""
        ex = self.executor
        stats = self.engine.stats
        for item in self.uplink.poll():
            if isinstance(item, HostMessage):
                unmatched = stats.get("unmatched", 0)
                ex.defer(self.engine.host_message, item.fields)
                if stats.get("unmatched", 0) == unmatched:
                    self._garbage_drops = 0
                    continue
                self._garbage_seen += 1
            elif isinstance(item, HostGarbage):
                self._garbage_seen += 1
                if self._garbage_seen <= 3:
                    log.warning("host sent unusable bytes: %s (%d bytes)", item.code, item.raw_len)
                ex.defer(self.engine.host_garbage, item.code, item.detail, item.raw_len, item.digest)
            elif isinstance(item, Disconnected):
                log.warning("host connection lost: %s", item.reason, extra={"fields": {
                    "event": "host_disconnected", "host": self._host_name(), "reason": item.reason}})
                ex.flush()
                ex.lost_connection()
                return
            if self._garbage_seen > GARBAGE_PER_CONNECTION and self.uplink.connected:
                self._garbage_drops += 1
                log.warning("host sent %d unusable frames on this connection: dropping it, reconnecting in %.1f s",
                            self._garbage_seen, self._reconnect_delay())
                ex.flush()
                ex.lost_connection()
                return

    def step(self, max_wait: float = 0.05) -> None:
        """One loop round: reconnect if due, wait for input up to the next deadline, fire timers."""
        now = self.clock()
        self._ensure_connected(now)
        connected = self.uplink.connected
        if self._had_input and connected:
            wait = min(max_wait, 0.005)  # answers keep arriving: skip the O(n) deadline scan
        else:
            deadline = self.engine.next_deadline()
            wait = max_wait if deadline is None else max(0.0, min(max_wait, deadline - now))
            if getattr(self.uplink, "connecting", False):  # progress needs connect() calls, not a busy loop
                wait = min(wait, CONNECTING_WAIT_S)
            elif not connected:
                wait = min(wait, max(0.0, self._next_connect - now))
        backlog = connected and getattr(self.uplink, "backlog", False)
        if backlog:  # held back by poll()'s bound: the descriptor may not say so
            wait = 0.0
        for hint in self.wait_hints:
            wait = min(wait, hint())
        events = self.selector.select(wait)
        self._had_input = bool(events) and self.executor.policy.collect
        for key, _ in events:
            key.data()
        if backlog and self.uplink.connected and not any(key.fd == self._registered_fd for key, _ in events):
            self._on_host_readable()
        for ticker in self.tickers:
            ticker()
        self.executor.call(self.engine.tick)  # with policy.collect: the answers' records in the same commit
        self.executor.checkpoint_if_due()
        if self.deposit_checkpoints:
            self._deposit_if_due(now)
        if self.snapshots is not None:
            self.snapshots.maybe(self.clock())
        if self.retention is not None:
            self.retention.step(self.clock())

    def _cp_seq(self) -> int:
        """The seq of the journal's newest checkpoint (it covers the entry before it)."""
        return int(self.journal.latest_checkpoint().get("covers_seq", -1)) + 1

    def _deposit_if_due(self, now: float) -> None:
        """Hand the host each new checkpoint (0800/880): an anchor off the device, so rolling the
        journal back or deleting its -wal can hide at most the entries since the last one (one
        checkpoint = at most CHECKPOINT_EVERY_ENTRIES entries / CHECKPOINT_EVERY_S, plus a round
        trip). Non-blocking (the answer comes through the loop); one deposit in flight at a time,
        DEPOSIT_ANSWER_S at most; skipped when only deposits happened since the last one (idle)."""
        seq = self._cp_seq()
        eng = self.engine
        if seq <= self._deposited_cp_seq or not (self.uplink.connected and eng.host_up):
            return
        if eng.deposit_stan is not None and now < self._deposit_sent_at + DEPOSIT_ANSWER_S:
            return
        since = self._deposited_cp_seq
        self._deposited_cp_seq = seq
        if not any(e.kind not in _DEPOSIT_NOISE for e in self.journal.entries(since)):
            return
        self._deposit_sent_at = now
        self.executor.call(eng.deposit_checkpoint, canonical_json(self.journal.latest_checkpoint()))

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
    clock: Clock = time.time,
    randbytes: RandBytes = os.urandom,
    **kwargs: Any,
) -> GuardService:
    """Open (or create) the journal, rebuild the engine from it and queue recovery reversals.

    Every intent without an outcome is moved to REVERSAL_PENDING (committed) before the uplink
    is even connected: a sale interrupted by a crash is never left to chance.
    """
    from pathlib import Path

    path = Path(journal_path)
    if path.exists():
        journal = Journal.open(path, keys, terminal_id=ecfg.terminal_id)
    else:
        journal = Journal.create(path, keys, terminal_id=ecfg.terminal_id, now=clock())
    try:
        engine, floor = restore(ecfg, JournalCrypto(journal, keys.token_key, randbytes), journal, rng)
        svc = GuardService(engine, journal, uplink, clock=clock, **kwargs)
        svc.executor.call(engine.recover)
        svc.snapshots = Snapshotter(engine, journal, floor)
    except BaseException:
        journal.close()
        raise
    return svc
