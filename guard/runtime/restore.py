"""Answering the engine's ``Load`` from the journal, and restoring an engine from it.

The engine never reads the journal itself; when it needs a transaction it no longer keeps in
memory (evicted, or archived by compaction) it returns ``Load`` having changed nothing, and the
code here hands it that transaction's entries and repeats the call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from guard.core.actions import Action, EngineConfig, Load, Randomness
from guard.core.engine import Engine
from guard.core.txn import CardCrypto

MAX_LOAD_ROUNDS = 64  # a call needs at most its own txn, its original and that sale's refunds


class EntriesFor(Protocol):
    """A journal's entries of one transaction (what answering ``Load`` needs)."""

    def entries_for(self, txn: str) -> list[Any]: ...


class EntrySource(EntriesFor, Protocol):
    """What restoring needs of a journal (``guard.journal.store.Journal`` fits)."""

    def entries(self) -> Iterator[Any]: ...

    def archived_key_hashes(self) -> Iterable[int]: ...


def answer(engine: Engine, need: Load, store: EntriesFor) -> None:
    """Hand the engine the entries a ``Load`` asks for."""
    for key in need.keys:
        entries = store.entries_for(key)
        if need.before_seq is not None:
            entries = [e for e in entries if e.seq < need.before_seq]
        engine.load(key, entries)


def call(engine: Engine, store: EntriesFor, fn: Callable[[], list[Action]]) -> list[Action]:
    """Run an engine entry point, answering its ``Load`` until it returns real actions."""
    for _ in range(MAX_LOAD_ROUNDS):
        acts = fn()
        if len(acts) == 1 and isinstance(acts[0], Load):
            answer(engine, acts[0], store)
            continue
        assert not any(isinstance(a, Load) for a in acts), "Load must come alone"
        return acts
    raise AssertionError(f"the engine asked for data {MAX_LOAD_ROUNDS} times in one call")


def restore_engine(cfg: EngineConfig, crypto: CardCrypto, store: EntrySource,
                   rng: Randomness | None = None) -> Engine:
    """An engine rebuilt from every entry of ``store`` (archived ids noted first, so a live record
    of an archived transaction finds it)."""
    engine = Engine(cfg, crypto, rng)
    engine.note_archived(store.archived_key_hashes())
    for e in store.entries():
        for _ in range(MAX_LOAD_ROUNDS):
            need = engine.apply(e)
            if need is None:
                break
            answer(engine, need, store)
        else:
            raise AssertionError(f"journal entry {e.seq}: the engine asked for data {MAX_LOAD_ROUNDS} times")
    return engine


def status(engine: Engine, store: EntriesFor, key: str) -> Any:
    """STATUS(id) answered from memory or, for an evicted transaction, from its entries."""
    r = engine.status(key)
    if isinstance(r, Load):
        r = engine.status(key, store.entries_for(key))
    return r
