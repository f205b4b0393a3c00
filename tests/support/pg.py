"""The ``pg_server`` fixture: a throwaway PostgreSQL (``posguard.bench.pg``, shared with the fleet
benchmark) for the session."""

from __future__ import annotations

import os

from posguard.bench.pg import PgServer, find_bindir, start_server

__all__ = ["PgServer", "find_bindir", "pg_server", "start_server"]


def _pg_server_fixture() -> object:
    import pytest

    @pytest.fixture(scope="session")
    def pg_server() -> object:
        """A throwaway PostgreSQL for the session; skipped without server binaries, except in CI (fails)."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail("psycopg is not installed: pip install -e '.[test]'")
            pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
        if find_bindir() is None:
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL server binaries not found (apt-get install postgresql)")
            pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql; README)")
        srv = start_server()
        assert srv is not None
        try:
            yield srv
        finally:
            srv.stop()

    return pg_server


pg_server = _pg_server_fixture()
