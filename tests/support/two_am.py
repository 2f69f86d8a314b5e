"""Helpers for the "2 AM" end-to-end scenario (``tests/e2e/test_two_am.py``).

* :class:`PostgresCluster` — a private PostgreSQL cluster: ``initdb`` in a temp
  dir, a free loopback port, trust authentication on 127.0.0.1 only, the unix
  socket in its own dir, given settings (``max_connections``...). When run as
  root (initdb refuses root) the cluster is owned and run by the ``postgres``
  user. Stopped with a fast shutdown (SIGINT, then SIGQUIT/SIGKILL) and removed.
* :class:`Lines` — collects a subprocess stream line by line; tests wait for a line.

Plain Python (no pytest), like the rest of ``tests/support``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from .services import free_port, wait_until


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``postgres``."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if (Path(p).parent / "postgres").exists()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


POSTGRES_BIN = postgres_bindir()
POSTGRES_MISSING = ("PostgreSQL server binaries (initdb, postgres) not found under /usr/lib/postgresql/*/bin "
                    "(install the Debian package postgresql; .ci/run does)")


class PostgresCluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>, superuser ``postgres``, trust auth."""

    superuser = "postgres"

    def __init__(self, settings: Mapping[str, str | int] | None = None, *,
                 standby_of: PostgresCluster | None = None) -> None:
        if POSTGRES_BIN is None:
            raise FileNotFoundError(POSTGRES_MISSING)
        self.bindir = POSTGRES_BIN
        self.port = free_port()
        self.settings = dict(settings or {})
        self.standby_of = standby_of  # a streaming standby of that (running) cluster: pg_basebackup -R
        self.root = Path(tempfile.mkdtemp(prefix="agentjobs-two-am-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # initdb refuses to run as root: then the cluster belongs to the `postgres` system user.
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._run_as = pwd.getpwnam("postgres")
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)

    def dsn(self, user: str | None = None, dbname: str = "postgres") -> str:
        return f"postgresql://{user or self.superuser}@127.0.0.1:{self.port}/{dbname}"

    @property
    def address(self) -> str:
        """The server's address without credentials (what agents get)."""
        return f"postgresql://127.0.0.1:{self.port}/postgres"

    def _popen_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {"stdin": subprocess.DEVNULL, "cwd": self.root,
                                     "env": {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "TZ": "UTC"}}
        if self._run_as is not None:
            kwargs |= {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        return kwargs

    def _init(self) -> None:
        self.sockdir.mkdir()
        if self._run_as is not None:
            os.chown(self.sockdir, self._run_as.pw_uid, self._run_as.pw_gid)
        if self.standby_of is not None:  # a copy of the primary that streams from it (standby.signal)
            command = [str(self.bindir / "pg_basebackup"), "-D", str(self.datadir), "-R", "-X", "stream",
                       "--no-sync", "-h", "127.0.0.1", "-p", str(self.standby_of.port), "-U", self.superuser]
        else:
            command = [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.superuser, "--auth=trust",
                       "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]
        done = subprocess.run(command, capture_output=True, timeout=120, check=False,
                              **self._popen_kwargs())  # type: ignore[call-overload]
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}):\n"
                               f"{done.stdout.decode()}{done.stderr.decode()}")
        # trust on 127.0.0.1 only (and the private socket), replication included; nothing else is accepted
        (self.datadir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n")
        settings = {"listen_addresses": "127.0.0.1", "port": self.port,
                    "unix_socket_directories": str(self.sockdir), "fsync": "off",
                    "synchronous_commit": "off", "full_page_writes": "off", "shared_buffers": "16MB",
                    **self.settings}
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/support/two_am.py\n")
            conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([str(self.bindir / "postgres"), "-D", str(self.datadir)], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          **self._popen_kwargs())  # type: ignore[call-overload]

    async def start(self, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self._init)
        await asyncio.to_thread(self._spawn)

        async def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited early:\n{self.log_tail()}")
            import psycopg

            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn(), connect_timeout=2)
            except psycopg.OperationalError:
                return False
            await conn.close()
            return True

        await wait_until(ready, timeout=timeout, what=f"PostgreSQL on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        """Fast shutdown (sessions terminated), then immediate, then kill; the directory is removed."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 15), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)):
                proc.send_signal(sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def roles(self) -> set[str]:
        """Names of the roles in the cluster."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.dsn(), autocommit=True) as conn:
            cur = await conn.execute("SELECT rolname FROM pg_roles")
            return {row[0] for row in await cur.fetchall()}


@contextlib.asynccontextmanager
async def running_cluster(settings: Mapping[str, str | int] | None = None, *,
                          standby_of: PostgresCluster | None = None) -> AsyncIterator[PostgresCluster]:
    cluster = PostgresCluster(settings, standby_of=standby_of)
    try:
        await cluster.start()
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)
