"""The PostgreSQL under test: ``TEST_PG_DSN`` (default: the machine's on 127.0.0.1:5432 as
``postgres``, trust auth), read here and nowhere else. Each test gets a database of its own,
holding a table shaped like Patchwork's ``patchwork_event`` (the columns that matter: id
from a sequence, date, category, project), and dropped after it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg.conninfo import make_conninfo

PG_DSN = os.environ.get("TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")

EVENT_TABLE = """
CREATE TABLE patchwork_event (
    id serial PRIMARY KEY,
    category varchar(25) NOT NULL,
    project_id integer NOT NULL,
    date timestamp NOT NULL
)
"""


@asynccontextmanager
async def patchwork_database(name: str) -> AsyncIterator[str]:
    """A fresh database ``name`` with ``patchwork_event``; yields its DSN."""
    async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(PG_DSN, dbname=name)
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
            await db.execute(EVENT_TABLE)
        yield dsn
    finally:
        async with await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as admin:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
