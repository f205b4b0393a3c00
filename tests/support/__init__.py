"""Helpers shared by test files: repository paths, subprocess environment, guard.toml writing,
the CLI runner, the uplink polling loop and a key-less crypto port for engine tests. Fixtures built on them live in ``tests/conftest.py``;
``ops_support`` makes engine-written journals for the operator-tool tests."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (the directory holding pyproject.toml)."""

TESTS = ROOT / "tests"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a Python child process: this checkout first on PYTHONPATH, so a child
    runs the code under test (and can import ``tests.support``) whatever is installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (nothing listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML document of flat sections (str, bool, int, float values), as a guard.toml holds."""
    lines: list[str] = []
    for section, body in sections.items():
        lines.append(f"[{section}]")
        for key, value in body.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = repr(value)
            else:
                text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def guard_config(*, tid: str = "TERM0001", mid: str = "MERCHANT0000001", reader: str = "loop://", port: int,
                 journal: Path | str = "journal.db", keys: Path | str = "keys", **host: Any) -> dict[str, dict[str, Any]]:
    """The sections of a minimal guard.toml: terminal ids, reader URL, a loopback host (``host``
    adds keys to [host]) and the journal. Add or update sections before writing."""
    return {
        "terminal": {"terminal_id": tid, "merchant_id": mid},
        "reader": {"url": reader},
        "host": {"address": "127.0.0.1", "port": port, **host},
        "journal": {"path": str(journal), "keys": str(keys)},
    }


def write_guard_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``sections`` (e.g. from ``guard_config``) as ``path`` and return it."""
    path.write_text(toml_text(sections))
    return path


def cli(*args: object) -> tuple[int, str, str]:
    """``posguard ARGS`` in-process: (exit code, stdout, stderr); exceptions propagate."""
    from click.testing import CliRunner

    from posguard.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def connected(up: Any, timeout: float = 5.0) -> bool:
    """Drive the uplink's non-blocking ``connect()`` to its end (bounded); True if connected."""
    deadline = time.monotonic() + timeout
    while not up.connect() and up.connecting and time.monotonic() < deadline:
        time.sleep(0.002)
    return bool(up.connected)


def collect(up: Any, done: Callable[[list[Any]], bool], timeout: float = 3.0) -> list[Any]:
    """Poll ``up`` (an Uplink) until ``done(items)`` or the deadline; never loops unbounded."""
    items: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items += up.poll()
        if done(items):
            break
        time.sleep(0.005)
    return items


@dataclass
class Blob:
    """A sealed vault blob as the engine sees it: only its reference."""

    ref: str


class FakeCrypto:
    """The engine's crypto port without keys or a journal: deterministic card tokens and blob refs,
    so a pure engine test needs no files."""

    def token(self, pan: str) -> str:
        return hashlib.sha256(b"k" + pan.encode()).hexdigest()[:32]

    def seal(self, txn: str, plaintext: bytes) -> Blob:
        return Blob(hashlib.sha256(txn.encode()).hexdigest())
