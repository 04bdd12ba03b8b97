"""The testing kit's query assertions: `assert_num_queries(n)`, `assert_max_queries(n)`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from conftest import Database, bound, items, make_app, new_item, serve
from fastapi import BackgroundTasks
from sqlalchemy import event, func, select, text

from fastapi_async_sqlalchemy import create_middleware_and_session_proxy
from fastapi_async_sqlalchemy.testing import (
    Queries,
    assert_max_queries,
    assert_num_queries,
    capture_queries,
)
from fastapi_async_sqlalchemy.testing import _queries as queries_module

pytestmark = pytest.mark.anyio

COUNT = select(func.count()).select_from(items)


async def test_counts_what_a_request_sends_from_every_task(database: Database) -> None:
    """Statements of the route, of a multi-session child and of a background task that runs
    within the ASGI call are all counted, each with the line that sent it."""
    app, db = make_app(database, commit_on_exit=True)

    async def child() -> None:
        await db.session.execute(COUNT)  # line of the child's statement

    async def later() -> None:
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("background"))

    @app.post("/work")
    async def work(background: BackgroundTasks) -> dict[str, str]:
        await db.session.execute(new_item("route"))
        async with db(multi_sessions=True):
            await db.gather(child())
        background.add_task(later)
        return {"ok": "yes"}

    async with serve(app) as client:
        with assert_num_queries(3) as sent:
            assert (await client.post("/work")).status_code == 200
    here = __file__.rsplit("/", 1)[-1]
    assert [query.location.split(":")[0].rsplit("/", 1)[-1] for query in sent] == [here] * 3
    assert [query.statement.split()[0].upper() for query in sent] == [
        "INSERT",
        "SELECT",
        "INSERT",
    ]
    assert await database.names() == ["background", "route"]


async def test_failure_lists_each_statement_with_its_line(database: Database) -> None:
    """A wrong count fails with an AssertionError that lists every statement and the test
    line that sent it."""
    async with bound(database.url) as db:
        with pytest.raises(AssertionError) as failed, assert_num_queries(1):
            async with db():
                await db.session.execute(text("SELECT 1"))
                await db.session.execute(COUNT)  # the second query
    message = str(failed.value)
    assert message.startswith("Expected 1 queries, 2 were sent:")
    assert "1. SELECT 1" in message
    assert f"test_testing_queries.py:{_line_of('# the second query')}" in message


async def test_max_queries_allows_fewer_and_refuses_more(database: Database) -> None:
    """assert_max_queries passes at or under its limit and fails above it."""
    async with bound(database.url) as db:
        with assert_max_queries(2):
            async with db():
                await db.session.execute(text("SELECT 1"))
        with (
            pytest.raises(AssertionError, match="at most 1 queries, 2 were sent"),
            assert_max_queries(1),
        ):
            async with db():
                await db.session.execute(text("SELECT 1"))
                await db.session.execute(text("SELECT 2"))


async def test_savepoints_are_not_counted(database: Database) -> None:
    """SAVEPOINT, RELEASE and ROLLBACK TO are bookkeeping: only the app's statements count."""
    async with bound(database.url) as db:
        with assert_num_queries(2):
            async with db(commit_on_exit=True):
                async with db.session.begin_nested():
                    await db.session.execute(new_item("kept"))
                savepoint = await db.session.begin_nested()
                await db.session.execute(new_item("undone"))
                await savepoint.rollback()
    assert await database.names() == ["kept"]


async def test_a_proxy_bound_during_the_block_is_counted(database: Database) -> None:
    """An app (and its proxy) built inside the block is watched too; nothing stays installed
    on any engine after the block."""
    with capture_queries() as sent:
        Middleware, db = create_middleware_and_session_proxy()
        middleware = Middleware(None, db_url=database.url)
        try:
            async with db():
                await db.session.execute(text("SELECT 1"))
            engine = middleware.engine.sync_engine
        finally:
            await middleware.dispose()
    assert len(sent) == 1
    assert not event.contains(engine, "before_cursor_execute", _any_listener(engine))


def test_fixtures_come_from_the_plugin(
    assert_num_queries: Callable[[int], AbstractContextManager[Queries]],
    assert_max_queries: Callable[[int], AbstractContextManager[Queries]],
) -> None:
    """With the package installed, pytest offers the assertions as fixtures, no import needed."""
    assert assert_num_queries is queries_module.assert_num_queries
    assert assert_max_queries is queries_module.assert_max_queries


def _line_of(code: str) -> int:
    """The first line of this file that holds ``code``."""
    with open(__file__, encoding="utf-8") as source:
        lines = source.read().splitlines()
    return min(number for number, line in enumerate(lines, 1) if code in line)


def _any_listener(engine: Any) -> Any:
    listeners = list(engine.dispatch.before_cursor_execute)
    return listeners[0] if listeners else (lambda *args: None)
