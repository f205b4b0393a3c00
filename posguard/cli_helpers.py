"""Shared pieces of the operator commands (posguard.ops_cli, posguard.journal_cli): path types,
exit with a message, a progress bar on stderr, config loading, atomic text output, consoles."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from guard.core.errors import PosguardError

PATH_FILE = click.Path(dir_okay=False, path_type=Path)
PATH_DIR = click.Path(file_okay=False, path_type=Path)

def die(code: int, err: BaseException | str) -> NoReturn:
    """Exit ``code`` with the message on stderr; with ``--json`` also one JSON document on stdout
    (``{"error": CODE, "message": ..., "exit_code": N}``) so scripts parse failures like reports."""
    click.echo(f"posguard: {err}", err=True)
    if json_requested():
        click.echo(json.dumps(error_json(code, err), sort_keys=True))
    sys.exit(code)


# Journal errors that mean "could not complete, run it again" (exit 3); every other one is bad input (2).
COULD_NOT_COMPLETE = frozenset({"JOURNAL_BUSY", "JOURNAL_FAILED", "JOURNAL_ERROR", "JOURNAL_WRITE_FAILED"})


def exit_for(e: PosguardError) -> int:
    """The documented exit status for a PosguardError: 3 journal in use or a write failed, else 2."""
    return 3 if e.code in COULD_NOT_COMPLETE else 2


def die_for(e: PosguardError) -> NoReturn:
    die(exit_for(e), e)


def interrupted(what: str) -> NoReturn:
    """Ctrl-C: exit 3 (could not complete) with a line, never a traceback."""
    die(3, f"interrupted: {what}")


def json_requested() -> bool:
    """True inside a click command invoked with ``--json``."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


def error_json(code: int, err: BaseException | str) -> dict[str, Any]:
    if isinstance(err, PosguardError):
        return {"error": err.code, "message": str(err.args[0]), "exit_code": code}
    return {"error": "POSGUARD_ERROR", "message": str(err), "exit_code": code}


SQLITE_MAGIC = b"SQLite format 3\x00"


def not_a_journal(path: Path) -> str | None:
    """Why ``path`` cannot be a journal at all (empty, or not a SQLite file), else None. A SQLite
    file whose tables were altered is a failed verification (exit 1), not bad input."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        return f"{path} cannot be read: {e.strerror}"
    if head != SQLITE_MAGIC:
        return f"{path} is not a posguard journal ({'empty file' if not head else 'not a SQLite database'})"
    return None


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def progress(label: str, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr (only on a terminal); yields ``update(done, total[, label])``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = stderr_console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=quiet or not console.is_terminal) as p:
        task = p.add_task(label, total=None)

        def update(done: int, total: int, what: str | None = None) -> None:
            if what:
                p.update(task, description=what)
            p.update(task, completed=done, total=total or None)

        yield update


CONFIG_HELP = ("guard.toml; default: $POSGUARD_CONFIG, else /etc/posguard/guard.toml "
               "(`posguard config-example` prints one).")


def load_cfg(config_path: Path | None) -> Any:
    """Load ``--config`` (or the discovered one: ``posguard.config.discover``); exit 2 if unusable."""
    from posguard.config import discover, load

    try:
        return load(discover(config_path))
    except PosguardError as e:
        die(2, e)


def atomic_text_out(out: Path | None) -> Any:
    """stdout, or a temp file renamed over ``out`` on success (0600: exports name card tokens)."""
    if out is None:
        return contextlib.nullcontext(sys.stdout)

    @contextlib.contextmanager
    def cm() -> Iterator[Any]:
        tmp = out.with_name(out.name + f".tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    return cm()

def wide_console() -> Any:
    """stdout console; piped output gets a wide fixed width instead of 80 columns."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=220)

