"""A Patchwork double whose events live in PostgreSQL, in a table shaped like Patchwork's
``patchwork_event``: what the API serves is what has committed, so late commits, rollbacks
that burn ids and visibility are the database's own, not simulated.

Writers behave as Patchwork's mail parser does: the event's date is taken when the event
is built, its id from the sequence at the insert a moment later, inside a transaction that
may stay open a while (the rest of ``parse_mail``) and commit or roll back. The API double
(``FakePatchwork``'s paging, filters and quirks) reads the table on a connection of its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg

from bridge.demo.patchwork_double import (
    CATEGORIES,
    COMMENT_CATEGORIES,
    FakePatchwork,
    _Crash,
    _Invalid,
    _parse_date,
)
from bridge.demo.patchwork_store import StoredItem, _date_text
from tests.patchwork_cost import CostedPatchwork

WRITERS = 8
"""Connections writers share: Patchwork's mail feeders at once."""


class PgPatchwork(FakePatchwork):
    def __init__(self, *, dsn: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._dsn = dsn
        self._reads: psycopg.AsyncConnection | None = None
        self._writers: asyncio.Queue[psycopg.AsyncConnection] = asyncio.Queue()
        self.rolled_back: list[int] = []
        """Ids taken by transactions that rolled back: gaps for good."""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._reads = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        for _ in range(WRITERS):
            self._writers.put_nowait(await psycopg.AsyncConnection.connect(self._dsn))
        return await super().start(host, port)

    async def stop(self) -> None:
        await super().stop()
        if self._reads is not None:
            await self._reads.close()
            self._reads = None
        while not self._writers.empty():
            await self._writers.get_nowait().close()

    async def write(
        self,
        category: str = "patch-created",
        project: str | None = None,
        *,
        hold_s: float = 0.0,
        build_s: float = 0.0,
        commit: bool = True,
    ) -> dict[str, Any] | None:
        """One event as Patchwork writes it: dated at build, ``build_s`` later inserted
        (its id from the sequence), held ``hold_s`` in the open transaction, then committed
        (the event as the API serves it) or rolled back (None)."""
        link_name = project if project is not None else next(self._round_robin)
        project_id = self._project(link_name)["id"]
        date = self.now()
        if build_s:
            await asyncio.sleep(build_s)
        connection = await self._writers.get()
        try:
            for attempt in (1, 2):
                if connection.closed or connection.broken:  # the server restarted meanwhile
                    connection = await psycopg.AsyncConnection.connect(self._dsn)
                try:
                    body = await self._insert(
                        connection, category, link_name, project_id, date, hold_s, commit
                    )
                    break
                except psycopg.OperationalError:
                    if attempt == 2:
                        raise
                    await connection.close()
        finally:
            self._writers.put_nowait(connection)
        return json.loads(body) if commit else None

    async def _insert(
        self,
        connection: psycopg.AsyncConnection,
        category: str,
        link_name: str,
        project_id: int,
        date: datetime,
        hold_s: float,
        commit: bool,
    ) -> bytes:
        async with connection.transaction():
            row = await (
                await connection.execute(
                    "INSERT INTO patchwork_event (category, project_id, date) "
                    "VALUES (%s, %s, %s) RETURNING id",
                    (category, project_id, date),
                )
            ).fetchone()
            assert row is not None
            event_id = int(row[0])
            body = self._shape(category, link_name).build(event_id, _date_text(date))
            await connection.execute(
                "UPDATE patchwork_event SET body = %s WHERE id = %s", (body, event_id)
            )
            if hold_s:
                await asyncio.sleep(hold_s)
            if not commit:
                self.rolled_back.append(event_id)
                raise psycopg.Rollback()
        return body

    async def select(self, query: Any, version: str) -> list[StoredItem]:
        """As the in-memory double's ``_select``, from the table's committed rows. A lost
        connection is opened again for the next request, as Django does; this one fails
        (a 500), as Patchwork's would while its database restarts."""
        try:
            return await self._select_rows(query, version)
        except psycopg.OperationalError:
            if self._reads is not None:
                await self._reads.close()
                self._reads = None
            raise _Crash("the database went away") from None

    async def _select_rows(self, query: Any, version: str) -> list[StoredItem]:
        if self._reads is None or self._reads.closed or self._reads.broken:
            self._reads = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        clauses: list[str] = ["body IS NOT NULL"]
        params: list[Any] = []
        if since := _parse_date(query.get("since")):
            clauses.append("date >= %s")
            params.append(since)
        if before := _parse_date(query.get("before")):
            clauses.append("date < %s")
            params.append(before)
        if project := query.get("project"):
            clauses.append("project_id = %s")
            params.append(self._project(self._project_link(project))["id"])
        if category := query.get("category"):
            if category not in CATEGORIES:
                raise _Invalid(category)
            clauses.append("category = %s")
            params.append(category)
        if version < "1.3":
            clauses.append("category <> ALL(%s)")
            params.append(list(COMMENT_CATEGORIES))
        rows = await (
            await self._reads.execute(
                "SELECT id, date, category, project_id, body FROM patchwork_event "
                f"WHERE {' AND '.join(clauses)} ORDER BY date, id",
                params,
            )
        ).fetchall()
        names = {p["id"]: link for link, p in self._projects.items()}
        return [
            StoredItem((date, event_id), bytes(body), names.get(project_id), category, event_id)
            for event_id, date, category, project_id, body in rows
        ]


class CostedPgPatchwork(CostedPatchwork, PgPatchwork):
    """The PostgreSQL double at Patchwork's measured serving cost."""


def crossings(events: Sequence[dict[str, Any]]) -> list[timedelta]:
    """For each event dated outside its id neighbours' dates, by how much: how far a
    young gap's range must reach beyond them to hold it."""
    ordered = sorted(events, key=lambda e: e["id"])
    dates = [_parse_date(e["date"]) for e in ordered]
    out = []
    for i in range(1, len(ordered) - 1):
        below, at, above = dates[i - 1], dates[i], dates[i + 1]
        assert below is not None and at is not None and above is not None
        if at < below:
            out.append(below - at)
        elif at > above:
            out.append(at - above)
    return out
