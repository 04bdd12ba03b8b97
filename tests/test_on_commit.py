"""`db.on_commit(callback)`: side effects that run once, and only once, the data is committed."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import Database, Row, bound, http_scope, make_app, new_item, serve
from fastapi import HTTPException
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from fastapi_async_sqlalchemy import (
    CommitCallbackError,
    DBSessionMeta,
    MissingSessionError,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def db(database: Database) -> AsyncIterator[DBSessionMeta]:
    async with bound(database.url) as proxy:
        yield proxy


class Boom(Exception):
    """What a failing callback raises."""


async def call(app: Any, method: str, path: str) -> list[Any]:
    """Drive one request by hand; what the server was sent, in order, as a list shared with
    the app (so a callback can record itself between the messages)."""
    events: list[Any] = []
    app.state.events = events

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        events.append(message["type"] if message["type"] != "http.response.start" else "start")

    await app(http_scope(method, path), receive, send)
    return events


# -- when callbacks run, and when they never do -------------------------------------------------


async def test_callback_runs_after_the_commit_and_before_the_response_starts(
    database: Database,
) -> None:
    """A callback registered before the first query runs once the request's commit is done and
    before the client hears anything; it sees the committed row from another connection."""
    app, db = make_app(database, commit_on_exit=True)
    seen_by_callback: list[list[str]] = []

    async def check_committed() -> None:
        seen_by_callback.append(await database.names())
        app.state.events.append("callback")

    @app.post("/items")
    async def add() -> dict[str, str]:
        db.on_commit(check_committed)
        await db.session.execute(new_item("written"))
        return {"added": "written"}

    async with serve(app):
        events = await call(app, "POST", "/items")
    assert events[:2] == ["callback", "start"]
    assert seen_by_callback == [["written"]]


@pytest.mark.parametrize("ending", ["404", "raises", "no commit_on_exit"])
async def test_callback_never_runs_when_the_request_does_not_commit(
    database: Database, ending: str
) -> None:
    """A request that ends 4xx, raises, or does not commit drops its callbacks."""
    app, db = make_app(database, commit_on_exit=ending != "no commit_on_exit")
    ran: list[str] = []

    @app.post("/items")
    async def add() -> None:
        db.on_commit(lambda: ran.append("ran"))
        await db.session.execute(new_item("written"))
        if ending == "404":
            raise HTTPException(status_code=404)
        if ending == "raises":
            raise Boom("route failed")

    async with serve(app) as client:
        response = await client.post("/items")
    assert response.status_code == {"404": 404, "raises": 500}.get(ending, 200)
    assert ran == []
    assert await database.names() == []


async def test_savepoints_move_callbacks_up_or_drop_them(
    database: Database, db: DBSessionMeta
) -> None:
    """A callback registered in a released savepoint waits for the root commit; one registered in
    a rolled-back savepoint never runs."""
    ran: list[str] = []
    async with db(commit_on_exit=True):
        await db.session.execute(new_item("outer"))
        async with db.session.begin_nested():
            db.on_commit(lambda: ran.append("released"))
            await db.session.execute(new_item("kept"))
        after_release = list(ran)
        savepoint = await db.session.begin_nested()
        db.on_commit(lambda: ran.append("rolled back"))
        await db.session.execute(new_item("undone"))
        await savepoint.rollback()
    assert after_release == []
    assert ran == ["released"]
    assert await database.names() == ["kept", "outer"]


async def test_explicit_commit_runs_the_callbacks_registered_so_far(
    database: Database, db: DBSessionMeta
) -> None:
    """`await db.session.commit()` runs the callbacks registered before it, then later ones wait
    for the next commit."""
    ran: list[str] = []
    async with db():
        db.on_commit(lambda: ran.append("first"))
        await db.session.execute(new_item("one"))
        await db.session.commit()
        after_commit = list(ran)
        db.on_commit(lambda: ran.append("second"))
        await db.session.execute(new_item("two"))
    assert after_commit == ["first"]
    assert ran == ["first"]  # the block did not commit the second transaction
    assert await database.names() == ["one"]


async def test_sync_and_async_callbacks_run_in_order_and_may_register_more(
    db: DBSessionMeta,
) -> None:
    """Callbacks run in registration order, sync and async alike; one registered by a callback
    runs after it."""
    ran: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0)
        ran.append("second")
        db.on_commit(lambda: ran.append("registered by second"))

    async with db(commit_on_exit=True):
        db.on_commit(lambda: ran.append("first"))
        db.on_commit(second)
        db.on_commit(lambda: ran.append("third"))
        await db.session.execute(text("SELECT 1"))
    assert ran == ["first", "second", "third", "registered by second"]


async def test_callback_runs_with_no_session_and_can_open_its_own(
    database: Database, db: DBSessionMeta
) -> None:
    """In a callback db.session raises MissingSessionError; `async with db():` works there."""
    outcome: list[Any] = []

    async def audit() -> None:
        try:
            db.session  # noqa: B018
        except MissingSessionError as exc:
            outcome.append(type(exc))
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("audit"))

    async with db(commit_on_exit=True):
        db.on_commit(audit)
        await db.session.execute(new_item("work"))
    assert outcome == [MissingSessionError]
    assert await database.names() == ["audit", "work"]


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("robust", [False, True])
async def test_failing_callback_in_a_request_is_logged_and_the_response_unchanged(
    database: Database, caplog: pytest.LogCaptureFixture, robust: bool
) -> None:
    """A callback that raises after a request's commit: the client still gets its 2xx and the
    row stays; the error is logged with its traceback; later callbacks run only if the failing
    one was robust."""
    app, db = make_app(database, commit_on_exit=True)
    ran: list[str] = []

    def fail() -> None:
        raise Boom("mail server down")

    @app.post("/items")
    async def add() -> dict[str, str]:
        db.on_commit(fail, robust=robust)
        db.on_commit(lambda: ran.append("after"))
        await db.session.execute(new_item("written"))
        return {"added": "written"}

    async with serve(app) as client:
        response = await client.post("/items")
    assert response.status_code == 200
    assert await database.names() == ["written"]
    assert ran == (["after"] if robust else [])
    [record] = [r for r in caplog.records if r.name == "fastapi_async_sqlalchemy"]
    assert record.levelno == logging.ERROR
    assert isinstance(record.exc_info[1], Boom)  # type: ignore[index]


async def test_failing_callback_in_a_block_raises_after_the_commit(
    database: Database, db: DBSessionMeta
) -> None:
    """`async with db():` raises CommitCallbackError, which says the data was committed and
    carries the callback's error."""

    def fail() -> None:
        raise Boom("cache unreachable")

    with pytest.raises(CommitCallbackError, match="was committed") as raised:
        async with db(commit_on_exit=True):
            db.on_commit(fail)
            await db.session.execute(new_item("written"))
    assert isinstance(raised.value.__cause__, Boom)
    assert [type(error) for error in raised.value.errors] == [Boom]
    assert await database.names() == ["written"]
    assert db.pool_status()["checked_out"] in (0, None)


# -- several sessions ----------------------------------------------------------------------------


async def test_multi_session_child_callback_runs_when_that_child_commits(
    database: Database, db: DBSessionMeta
) -> None:
    """A callback registered in a gathered child runs when that child commits, not at the end
    of the block; a failing child's callback never runs."""
    ran: list[str] = []

    async def child(name: str, fail: bool) -> None:
        db.on_commit(lambda: ran.append(name))
        await db.session.execute(new_item(name))
        if fail:
            raise Boom("child failed")

    async with db(multi_sessions=True, commit_on_exit=True):
        await db.gather(child("ok", False), child("failed", True), return_exceptions=True)
        after_gather = list(ran)
    assert after_gather == ["ok"]
    assert ran == ["ok"]
    assert await database.names() == ["ok"]


async def test_two_proxies_run_only_the_committed_ones_callbacks(database: Database) -> None:
    """With two databases, a callback of the proxy whose block committed runs; the other
    proxy's, rolled back, does not."""
    ran: list[str] = []
    async with (
        bound(database.url) as primary,
        bound(database.url) as archive,
        primary(commit_on_exit=True),
    ):
        primary.on_commit(lambda: ran.append("primary"))
        await primary.session.execute(select(1))
        with pytest.raises(Boom):
            async with archive(commit_on_exit=True):
                archive.on_commit(lambda: ran.append("archive"))
                await archive.session.execute(select(1))
                raise Boom("archive failed")
    assert ran == ["primary"]


async def test_on_commit_outside_any_scope_raises_missing_session(db: DBSessionMeta) -> None:
    """Outside a request or a block on_commit raises MissingSessionError, never runs at once."""
    ran: list[str] = []
    with pytest.raises(MissingSessionError):
        db.on_commit(lambda: ran.append("ran"))
    with pytest.raises(TypeError, match="callable"):
        async with db():
            db.on_commit(ran.append("called instead of passed"))  # type: ignore[func-returns-value]
    assert ran == ["called instead of passed"]


# -- cost ----------------------------------------------------------------------------------------


def test_no_listener_until_the_first_on_commit() -> None:
    """An app that never calls on_commit has no SQLAlchemy listener of ours; the first call adds
    them, once for the process."""
    code = """
import asyncio
from sqlalchemy import event
from sqlalchemy.orm import Session
from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db
from fastapi_async_sqlalchemy import _hooks

async def main():
    middleware = SQLAlchemyMiddleware(app=None, db_url="sqlite+aiosqlite://")
    async with db(commit_on_exit=True):
        await db.session.execute(__import__("sqlalchemy").text("SELECT 1"))
    before = event.contains(Session, "after_commit", _hooks._after_commit)
    for _ in range(1000):
        async with db(commit_on_exit=True):
            db.on_commit(lambda: None)
    after = event.contains(Session, "after_commit", _hooks._after_commit)
    await middleware.dispose()
    print(before, after)

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.split() == ["False", "True"]


async def test_finalized_sessions_keep_no_callbacks(database: Database) -> None:
    """Over many requests registering callbacks, every finalized session's callback state is
    empty (nothing grows), and the callbacks ran once each."""
    app, db = make_app(database, commit_on_exit=True)
    ran: list[int] = []
    sessions: list[Any] = []

    @app.get("/{number}")
    async def work(number: int) -> None:
        db.on_commit(lambda: ran.append(number))
        sessions.append(db.session)
        if number % 2:
            raise HTTPException(status_code=409)

    async with serve(app) as client:
        for number in range(200):
            await client.get(f"/{number}")
    assert ran == list(range(0, 200, 2))
    leftovers = [
        session.sync_session.info.get("fastapi_async_sqlalchemy.on_commit") for session in sessions
    ]
    assert leftovers == [None] * 200


async def test_callback_in_a_savepoint_whose_flush_failed_never_runs(
    database: Database, db: DBSessionMeta
) -> None:
    """A callback registered in a savepoint after its flush failed belongs to that savepoint,
    and is dropped when it is rolled back, though the root commits."""
    await database.insert("taken")
    ran: list[str] = []
    async with db(commit_on_exit=True):
        await db.session.execute(new_item("kept"))
        savepoint = await db.session.begin_nested()
        db.session.add(Row(10**8, "taken"))
        with pytest.raises(IntegrityError):
            await db.session.flush()
        db.on_commit(lambda: ran.append("ran"))
        await savepoint.rollback()
    assert ran == []
    assert await database.names() == ["kept", "taken"]
