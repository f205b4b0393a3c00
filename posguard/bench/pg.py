"""A throwaway PostgreSQL server (the fleet benchmark and tests): initdb into a temporary directory,
pg_ctl start with a unix socket there (no TCP), fsync off. Run as root (initdb refuses), the server
runs as the ``postgres`` user (or ``nobody``) through ``runuser``."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def find_bindir() -> Path | None:
    """The newest PostgreSQL server bin directory (Debian layout), or the one on PATH."""
    env = os.environ.get("POSGUARD_PG_BINDIR")
    if env and (Path(env) / "initdb").exists():
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if
                   p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


@dataclass
class PgServer:
    bindir: Path
    root: Path
    user: str | None  # the OS user the server runs as (None: ourselves)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dsn(self) -> str:
        return f"host={self.root} port=5432 user=postgres dbname=postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        opts = (f"-c listen_addresses='' -c unix_socket_directories={self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40 "
                "-c shared_buffers=128MB -c max_wal_size=2GB -c max_locks_per_transaction=1024")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def fresh_dsn(self, name: str) -> str:
        """A new empty database on this server (one per test that needs a clean slate)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        return f"host={self.root} port=5432 user=postgres dbname={name}"


def start_server() -> PgServer | None:
    """A running server, or None if no server binaries are installed."""
    bindir = find_bindir()
    if bindir is None:
        return None
    root = Path(tempfile.mkdtemp(prefix="posguard-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            ent = pwd.getpwnam(user)
        except KeyError:
            user, ent = "nobody", pwd.getpwnam("nobody")
        os.chown(root, ent.pw_uid, ent.pw_gid)
        os.chmod(root, 0o755)
    srv = PgServer(bindir, root, user)
    srv.start()
    return srv
