"""Kept for old habits: the benchmarks ship with posguard (``posguard bench``, ``python -m posguard.bench``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posguard.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
