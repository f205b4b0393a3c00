"""fsync for files written then renamed or linked into place (journals, archives, key files)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a closed file (its contents) or a directory (the entries created, linked or renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
