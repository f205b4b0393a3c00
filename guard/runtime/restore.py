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
from guard.core.policies import horizon_s
from guard.core.txn import CardCrypto

MAX_LOAD_ROUNDS = 64  # a call needs at most its own txn, its original and that sale's refunds


class EntriesFor(Protocol):
    """A journal's entries of one transaction (what answering ``Load`` needs)."""

    def entries_for(self, txn: str) -> list[Any]: ...


class EntrySource(EntriesFor, Protocol):
    """What restoring needs of a journal (``guard.journal.store.Journal`` fits)."""

    def entries(self) -> Iterator[Any]: ...

    def archived_key_hashes(self) -> Iterable[int]: ...


class SnapshotSource(EntriesFor, Protocol):
    """What restoring from a snapshot needs (``guard.journal.store.Journal`` fits)."""

    def entries(self, since_seq: int = 0) -> Iterator[Any]: ...

    def snapshot(self) -> Any: ...


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
                   rng: Randomness | None = None, *, snapshot: bool = True) -> Engine:
    """An engine rebuilt from ``store``: from its newest usable snapshot if it has one (and
    ``snapshot``), else from every entry (archived ids noted first, so a live record of an
    archived transaction finds it)."""
    return restore(cfg, crypto, store, rng, snapshot=snapshot)[0]


def restore(cfg: EngineConfig, crypto: CardCrypto, store: EntrySource, rng: Randomness | None = None, *,
            snapshot: bool = True) -> tuple[Engine, int]:
    """``restore_engine`` and the first seq it replayed in full (0: every entry)."""
    if snapshot and hasattr(store, "snapshot"):
        got = restore_from_snapshot(cfg, crypto, store, rng)  # type: ignore[arg-type]
        if got is not None:
            return got
    engine = Engine(cfg, crypto, rng)
    engine.note_archived(store.archived_key_hashes())
    for e in store.entries():
        _apply(engine, store, e)
    return engine, 0


def restore_from_snapshot(cfg: EngineConfig, crypto: CardCrypto, store: SnapshotSource,
                          rng: Randomness | None = None) -> tuple[Engine, int] | None:
    """The engine from the newest usable snapshot and the entries it names, with the snapshot's
    ``from_seq``; None without a usable one (guard.runtime.snapshot: what it holds and why this
    gives the same engine as reading every entry)."""
    snap = store.snapshot()
    if snap is None:
        return None
    p = snap.entry.payload
    try:
        from_seq, open_keys, horizon = int(p["from_seq"]), [str(k) for k in p["open"]], float(p["horizon_s"])
    except (KeyError, TypeError, ValueError):
        return None
    if horizon < horizon_s(cfg.policy) or not 0 < from_seq <= snap.entry.seq:
        return None  # the rules now look further back than this snapshot kept
    engine = Engine(cfg, crypto, rng)
    engine.load_key_filter(snap.bits)
    older = sorted((e for k in open_keys for e in store.entries_for(k) if e.seq < from_seq), key=lambda e: e.seq)
    for e in older:
        _apply(engine, store, e)
    for e in store.entries(from_seq - 1):
        _apply(engine, store, e)
    return engine, from_seq


def _apply(engine: Engine, store: EntriesFor, e: Any) -> None:
    for _ in range(MAX_LOAD_ROUNDS):
        need = engine.apply(e)
        if need is None:
            return
        answer(engine, need, store)
    raise AssertionError(f"journal entry {e.seq}: the engine asked for data {MAX_LOAD_ROUNDS} times")


def status(engine: Engine, store: EntriesFor, key: str) -> Any:
    """STATUS(id) answered from memory or, for an evicted transaction, from its entries."""
    r = engine.status(key)
    if isinstance(r, Load):
        r = engine.status(key, store.entries_for(key))
    return r
