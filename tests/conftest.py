"""Shared test harness: fixtures for the set-ups several test files repeat, and isolation of the
logging configuration between tests. The repository root is on sys.path through
``[tool.pytest.ini_options] pythonpath`` in pyproject.toml, so ``tests.support`` imports anywhere."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge.nullmodem import NullModem
from guard.hostlink.iso import HostCodec
from guard.journal.keys import DeviceKeys, init_keys
from guard.journal.store import Journal
from guard.simulation.hostsim import HostCore
from guard.simulation.hostserver import HostServer
from tests.support import guard_config, write_guard_toml
from tests.support.pg import pg_server  # noqa: F401  (session fixture: a throwaway PostgreSQL)

T0 = 1_700_000_000.0
"""The creation time of the ``journal`` fixture."""


def _loggers() -> list[logging.Logger]:
    named = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return [logging.getLogger(), *named]


def _own(handlers: list[logging.Handler]) -> list[logging.Handler]:
    """The handlers not installed by pytest's logging plugin (it adds and removes its own per phase)."""
    return [h for h in handlers if not type(h).__module__.startswith("_pytest")]


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Put back the handlers, level, propagation and disabled flag of the root logger and every
    named logger (and ``logging.disable``) after each test. ``posguard.run.setup_logging`` gives
    the "posguard" logger a handler on the sys.stderr of the moment (pytest's capture stream in an
    in-process test) and stops propagation: left in place, later tests' records go to a closed
    stream ("ValueError: I/O operation on closed file") and never reach caplog."""
    saved = {lg.name: (_own(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in _loggers()}
    disabled_below = logging.root.manager.disable
    yield
    logging.disable(disabled_below)
    for lg in _loggers():
        handlers, level, propagate, disabled = saved.get(lg.name, ([], logging.NOTSET, True, False))
        lg.handlers[:] = [h for h in lg.handlers if h not in _own(lg.handlers)] + handlers
        lg.setLevel(level)
        lg.propagate = propagate
        lg.disabled = disabled


@pytest.fixture
def keys(tmp_path: Path) -> DeviceKeys:
    """Fresh device keys in ``tmp_path / "keys"`` (the directory a guard.toml names)."""
    return init_keys(tmp_path / "keys")


@pytest.fixture
def journal(tmp_path: Path, keys: DeviceKeys) -> Path:
    """An empty, closed journal ``tmp_path / "j.db"`` for terminal TERM0001, signed with ``keys``."""
    path = tmp_path / "j.db"
    Journal.create(path, keys, terminal_id="TERM0001", now=T0).close()
    return path


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config(port=..., **kw)`` writes ``tmp_path / "guard.toml"`` from
    ``tests.support.guard_config(**kw)`` (extra [host] keys as keywords; ``sections=`` merges more
    sections or keys) and returns its path; call again to rewrite it."""

    def write(*, sections: dict[str, dict[str, Any]] | None = None, name: str = "guard.toml", **kw: Any) -> Path:
        cfg = guard_config(**kw)
        for section, body in (sections or {}).items():
            cfg.setdefault(section, {}).update(body)
        return write_guard_toml(tmp_path / name, cfg)

    return write


@pytest.fixture
def host_server() -> Iterator[Callable[..., tuple[HostServer, int]]]:
    """``host_server(core=None, **kw)`` starts ``HostServer(core, HostCodec(), **kw)`` on a
    loopback port (a ``HostCore(seed=7, dup_detection=True)`` if no core is given) and returns
    (server, port); every server started is stopped after the test."""
    started: list[HostServer] = []

    def start(core: HostCore | None = None, codec: HostCodec | None = None, **kw: Any) -> tuple[HostServer, int]:
        server = HostServer(core if core is not None else HostCore(seed=7, dup_detection=True),
                            codec if codec is not None else HostCodec(), **kw)
        port = server.start()
        started.append(server)
        return server, port

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def null_modem() -> Iterator[NullModem]:
    """A pty null-modem cable (``firmware_bridge.nullmodem.NullModem``): open ``.a`` for the guard
    and ``.b`` for the reader; closed after the test."""
    cable = NullModem()
    yield cable
    cable.close()
