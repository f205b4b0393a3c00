"""The guard as the reader side sees it: requests in, results out, nothing else.

A reader adapter (``firmware_bridge.daemon.ReaderBridge``) talks to this facade instead of the
engine or the loop: every request runs through the one ``Executor``, and results reach the
adapter through a subscription for its reader's key prefix. The facade is also the executor's
``ReaderPort``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from guard.core.emv import CardDecision
from guard.core.engine import Engine
from guard.core.model import Request, Result
from guard.runtime.executor import Executor
from guard.runtime.ports import Clock

REPLIES_KEPT = 1024  # latest results kept for callers polling by key; older ones: status(key)
Subscriber = Callable[[Result], None]


class GuardFacade:
    """Reader-facing entry points of one guard. Engine refusals (PosguardError) propagate."""

    def __init__(self, engine: Engine, executor: Executor | None = None) -> None:
        self.engine = engine
        self.executor = executor  # set by the owner once the executor (which delivers here) exists
        self.replies: OrderedDict[str, Result] = OrderedDict()
        self._subs: list[tuple[str, Subscriber]] = []

    @property
    def clock(self) -> Clock:
        return self._ex().clock

    def _ex(self) -> Executor:
        if self.executor is None:
            raise RuntimeError("GuardFacade used before its executor was attached")
        return self.executor

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request) -> None:
        """Accept a reader request (raises IdempotencyConflict / RequestInvalid, nothing lost)."""
        self._ex().call(self.engine.submit, request)

    def confirm(self, key: str) -> None:
        self._ex().call(self.engine.confirm, key)

    def cancel(self, key: str) -> None:
        self._ex().call(self.engine.cancel, key)

    def signed(self, key: str) -> None:
        self._ex().call(self.engine.signed, key)

    def complete(self, key: str, decision: CardDecision, icc: bytes = b"") -> None:
        """The reader's COMPLETE: the card's final decision on a chip sale (raises TXN_UNKNOWN)."""
        self._ex().call(self.engine.complete, key, decision, icc)

    def status(self, key: str) -> Result | None:
        r = self._ex().status(key)
        assert r is None or isinstance(r, Result)
        return r

    def last_for_reader(self, reader_id: str) -> Result | None:
        """STATUS(LAST): the newest AUTH/REFUND/VOID this reader sent (read from the journal if
        it left memory)."""
        key = self.engine.newest.get(reader_id)
        return None if key is None else self.status(key)

    # ------------------------------------------------------------------ results

    def subscribe(self, prefix: str, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn`` with every result whose key starts with ``prefix``; returns an unsubscribe."""
        entry = (prefix, fn)
        self._subs.append(entry)
        return lambda: self._subs.remove(entry) if entry in self._subs else None

    def deliver(self, result: Result) -> None:
        """ReaderPort: remember the latest result per key, then fan out to subscribers."""
        replies = self.replies
        replies[result.key] = result
        replies.move_to_end(result.key)
        while len(replies) > REPLIES_KEPT:
            replies.popitem(last=False)
        for prefix, fn in list(self._subs):
            if result.key.startswith(prefix):
                fn(result)
