"""The small ports the executor runs an engine's actions over.

Each port is what one side of the guard must offer, nothing more: the daemon backs them with
the SQLite journal, the TCP uplink and the reader link; the deterministic simulator with the
same journal, a simulated network and simulated readers; tests with whatever they observe.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from guard.core.model import Result
from guard.hostlink.uplink import SendOutcome

Record = tuple[str, "str | None", dict[str, Any]]
Clock = Callable[[], float]  # wall-clock seconds (journal timestamps, field 7); one object shared by all
RandBytes = Callable[[int], bytes]  # os.urandom in the daemon, a seeded source in the simulator


class StorePort(Protocol):
    """The journal as the executor needs it (``guard.journal.store.Journal`` is one)."""

    def append(self, records: Sequence[Record], *, now: float, vault_put: Sequence[Any] = (),
               vault_shred: Sequence[str] = ()) -> Any: ...

    def vault_open(self, ref: str) -> bytes | None: ...

    def maybe_checkpoint(self, now: float) -> bool: ...

    def entries_for(self, txn: str) -> list[Any]: ...  # a transaction's entries, to answer Load


class HostPort(Protocol):
    """The acquirer link: whether it is up, one send, and dropping it.

    ``send`` returns SENT (every byte left), NOT_SENT (nothing left: the request can fail cleanly)
    or MAYBE_SENT (failed part-way: must be treated as sent). ``drop`` tears the link down
    (close, schedule a reconnect); the executor tells the engine when the engine must know.
    """

    @property
    def connected(self) -> bool: ...

    def send(self, fields: dict[str, str]) -> SendOutcome: ...

    def drop(self, now: float) -> None: ...

    def cork(self, on: bool) -> None: ...


class ReaderPort(Protocol):
    """Where a ``Reply`` goes: the reader side (facade subscribers, a simulated reader, a test)."""

    def deliver(self, result: Result) -> None: ...
