"""Shared pieces of the operator commands (posguard.ops_cli, posguard.journal_cli): path types,
exit with a message, a progress bar on stderr, config loading, atomic text output, consoles."""

from __future__ import annotations

import contextlib
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
    click.echo(f"posguard: {err}", err=True)
    sys.exit(code)


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


def load_cfg(config_path: Path) -> Any:
    from posguard.config import load

    try:
        return load(config_path)
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

