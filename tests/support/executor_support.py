"""Test ports for the one ``guard.runtime.executor.Executor``: tests drive the engine through the
daemon's executor instead of private copies of its dispatch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from guard.core.engine import Engine
from guard.core.model import Result
from guard.hostlink.uplink import SendOutcome
from guard.runtime.executor import DAEMON, Executor, Policy
from guard.simulation.hostsim import HostCore
from guard.simulation.hosttypes import ACTION_SEND
from posguard.bench.data import RecordingHost, Shown  # noqa: F401  (one copy: the benchmarks use them too)


class CoreHost(RecordingHost):
    """HostPort over an in-process ``HostCore``: each message is handled at once and the host's
    answers are fed back to the engine through the executor (before the sender's next action)."""

    def __init__(self, core: HostCore, clock: Callable[[], float]) -> None:
        super().__init__()
        self.core = core
        self.clock = clock
        self.executor: Executor | None = None

    def send(self, fields: dict[str, str]) -> SendOutcome:
        self.sent.append(fields)
        ex = self.executor
        assert ex is not None, "CoreHost.executor not set"
        for r in self.core.handle(fields, self.clock()):
            if r.fields is not None and r.action == ACTION_SEND:
                ex.call(ex.engine.host_message, r.fields)
        return SendOutcome.SENT


class ListStore:
    """StorePort that keeps appended records in memory (``Log`` style tests, no SQLite)."""

    def __init__(self) -> None:
        self.commits: list[tuple[float, list[tuple[str, str | None, dict[str, Any]]]]] = []

    def append(self, records: Sequence[tuple[str, str | None, dict[str, Any]]], *, now: float,
               vault_put: Sequence[Any] = (), vault_shred: Sequence[str] = ()) -> None:
        self.commits.append((now, list(records)))

    def vault_open(self, ref: str) -> bytes | None:
        return None

    def maybe_checkpoint(self, now: float) -> bool:
        return False


def executor(engine: Engine | Any, store: Any, host: Any, reader: Any, clock: Callable[[], float],
             policy: Policy | None = None) -> Executor:
    ex = Executor(engine, store, host, reader, clock, policy=policy or DAEMON)
    if isinstance(host, CoreHost):
        host.executor = ex
    return ex
