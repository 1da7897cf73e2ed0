"""The PostgreSQL under test: ``TEST_PG_DSN`` (default: the machine's on 127.0.0.1:5432 as
``postgres``, trust auth), read here and nowhere else. Each test gets a database of its own,
holding a table shaped like Patchwork's ``patchwork_event`` (the columns that matter: id
from a sequence, date, category, project; and the item the API double serves), and dropped
after it. ``own_postgres`` runs a server of a test's own, for the tests that restart one:
the machine's shared one is never stopped."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

PG_DSN = os.environ.get("TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")

EVENT_TABLE = """
CREATE TABLE patchwork_event (
    id serial PRIMARY KEY,
    category varchar(25) NOT NULL,
    project_id integer NOT NULL,
    date timestamp NOT NULL,
    body bytea
);
CREATE INDEX patchwork_event_date ON patchwork_event (date)
"""


@asynccontextmanager
async def patchwork_database(name: str, server: str = PG_DSN) -> AsyncIterator[str]:
    """A fresh database ``name`` with ``patchwork_event`` on ``server``; yields its DSN."""
    async with await psycopg.AsyncConnection.connect(server, autocommit=True) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server, dbname=name)
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
            await db.execute(EVENT_TABLE)
        yield dsn
    finally:
        async with await psycopg.AsyncConnection.connect(server, autocommit=True) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class OwnPostgres:
    """A PostgreSQL server in a temporary directory, on a free port: a test may restart it."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        self.bin = Path(found[-1]).parent if found else None
        self.dir = Path(tempfile.mkdtemp(prefix="pwb-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    async def _run(self, *argv: str) -> None:
        """As the postgres user when we are root (initdb refuses root)."""
        assert self.bin is not None
        command = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(process.communicate(), 120)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])}: {out.decode()[-2000:]}")

    async def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        await self._run("pg_ctl", "start", "-w", "-D", str(self.dir / "data"), "-o", options,
                        "-l", str(self.dir / "log"))  # fmt: skip

    async def stop(self, mode: str = "fast") -> None:
        await self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.dir / "data"))

    async def __aenter__(self) -> OwnPostgres:
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        await self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust")
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            with contextlib.suppress(RuntimeError):  # stopped already
                await self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
