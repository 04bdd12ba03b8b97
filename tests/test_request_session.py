"""The request's session: lazy, finalized before the response, committed only on success."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from conftest import Database, Row, make_app, new_item, serve, while_the_pool_is_held
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from starlette.background import BackgroundTask

from fastapi_async_sqlalchemy import (
    MissingSessionError,
    SessionFinalizedError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("commit_on_exit", [True, False])
@pytest.mark.parametrize("status", [200, 201, 302, 400, 404, 422, 500])
@pytest.mark.parametrize("raises", [False, True])
async def test_writes_are_committed_only_when_the_request_succeeds(
    database: Database, commit_on_exit: bool, status: int, raises: bool
) -> None:
    """A write commits with commit_on_exit and a status below 400 and no exception, never else."""
    app, db = make_app(database, commit_on_exit=commit_on_exit)

    @app.post("/write")
    async def write() -> Any:
        await db.session.execute(new_item("written"))
        if raises:
            raise RuntimeError("handler failed")
        if status >= 400:
            raise HTTPException(status_code=status)
        return JSONResponse({}, status_code=status, headers={"location": "/x"})

    async with serve(app) as client:
        response = await client.post("/write", follow_redirects=False)
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == (500 if raises else status)
    committed = commit_on_exit and not raises and status < 400
    assert await database.names() == (["written"] if committed else [])


def app_whose_commit_fails(database: Database) -> tuple[FastAPI, Any]:
    """A route that succeeds, but whose commit by the middleware hits a unique constraint."""
    app, db = make_app(database, commit_on_exit=True)

    @app.post("/write")
    async def write() -> dict[str, str]:
        await db.session.execute(text("SELECT 1"))

        # The duplicate is only written, and only fails, when the middleware commits.
        @event.listens_for(db.session.sync_session, "before_commit")
        def insert_duplicate(session: Any) -> None:
            session.execute(new_item("taken"))

        return {"status": "ok"}

    return app, db


async def test_commit_failure_never_reaches_client_as_200(database: Database) -> None:
    """A commit that fails turns the response into a 500 and keeps nothing."""
    await database.insert("taken")
    app, db = app_whose_commit_fails(database)

    async with serve(app) as client:
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 500
    assert await database.names() == ["taken"]


async def test_commit_failure_is_raised_to_the_server_with_its_traceback(
    database: Database,
) -> None:
    """The commit's own error, not a generic one, reaches the server."""
    await database.insert("taken")
    app, _ = app_whose_commit_fails(database)

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)  # app errors are raised here
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with pytest.raises(IntegrityError):
                await client.post("/write")


async def test_commit_that_waits_for_a_connection_keeps_the_pools_deadline(
    database: Database,
) -> None:
    """A commit that must check out a connection from a full pool fails in time with a 500.

    The route only adds a row (``session.add()``), so the connection is checked out by the
    commit, which runs shielded from cancellation; the pool's own deadline must still apply.
    """
    app, db = make_app(
        database,
        commit_on_exit=True,
        engine_args={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2},
    )

    @app.post("/add")
    async def add() -> dict[str, str]:
        db.session.add(Row(1, "never"))
        return {"status": "ok"}

    async with serve(app) as client:
        response = await while_the_pool_is_held(db.engine, client.post("/add"))
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 500
    assert await database.names() == []


async def test_request_that_never_touches_the_database_checks_out_no_connection(
    database: Database,
) -> None:
    """No session and no connection for a request that does not read db.session."""
    app, db = make_app(database, commit_on_exit=True)
    connects: list[object] = []

    @app.get("/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    async with serve(app) as client:
        event.listen(db.engine.sync_engine, "checkout", lambda *args: connects.append(args))
        response = await client.get("/plain")

    assert response.status_code == 200
    assert connects == []


async def test_connection_is_back_in_the_pool_before_background_tasks_run(
    database: Database,
) -> None:
    """By the time a background task runs, the request's connection has been returned."""
    app, db = make_app(database, commit_on_exit=True)
    seen: dict[str, Any] = {}

    async def background() -> None:
        seen["checked_out"] = db.engine.pool.checkedout()
        seen["committed"] = await database.names()

    @app.post("/write")
    async def write() -> JSONResponse:
        await db.session.execute(new_item("before-background"))
        return JSONResponse({}, background=BackgroundTask(background))

    async with serve(app) as client:
        response = await client.post("/write")

    assert response.status_code == 200
    assert seen == {"checked_out": 0, "committed": ["before-background"]}


async def test_background_task_gets_a_clear_error_and_its_own_session_works(
    database: Database,
) -> None:
    """db.session in a background task raises SessionFinalizedError; `async with db()` works."""
    app, db = make_app(database, commit_on_exit=True)
    errors: list[BaseException] = []

    async def background() -> None:
        try:
            db.session  # noqa: B018 - the read itself is what must fail
        except SessionFinalizedError as exc:
            errors.append(exc)
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("from-background"))

    @app.post("/write")
    async def write() -> JSONResponse:
        return JSONResponse({}, background=BackgroundTask(background))

    async with serve(app) as client:
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 200
    assert len(errors) == 1
    assert "async with db():" in str(errors[0])
    assert await database.names() == ["from-background"]


async def test_session_kept_past_the_request_cannot_reopen_a_connection(
    database: Database,
) -> None:
    """A session object captured in the route raises after finalization, and leaks nothing."""
    app, db = make_app(database, commit_on_exit=True)
    captured: list[Any] = []

    @app.post("/write")
    async def write() -> dict[str, bool]:
        captured.append(db.session)
        await db.session.execute(new_item("kept"))
        return {"ok": True}

    async with serve(app) as client:
        assert (await client.post("/write")).status_code == 200
        with pytest.raises(Exception, match="permanently closed"):
            await captured[0].execute(text("SELECT 1"))
        assert db.engine.pool.checkedout() == 0


async def test_db_session_outside_any_scope_says_how_to_open_one(database: Database) -> None:
    """Outside a request, db.session raises MissingSessionError naming `async with db():`."""
    app, db = make_app(database)
    async with serve(app):
        with pytest.raises(MissingSessionError, match=r"async with db\(\):"):
            db.session  # noqa: B018


async def test_excluded_paths_get_no_session(database: Database) -> None:
    """A request to an excluded path runs with no scope at all."""
    app, db = make_app(database, exclude_paths=["/health"])
    outcomes: list[str] = []

    @app.get("/health")
    async def health() -> dict[str, bool]:
        try:
            db.session  # noqa: B018
        except MissingSessionError:
            outcomes.append("no session")
        return {"ok": True}

    async with serve(app) as client:
        assert (await client.get("/health")).status_code == 200
    assert outcomes == ["no session"]


class CommitOn2xxOnly:
    """A status rule that also refuses to commit redirects."""

    @staticmethod
    def should_commit(status_code: int) -> bool:
        return 200 <= status_code < 300


@pytest.mark.parametrize(("status", "committed"), [(200, True), (302, False)])
async def test_status_rule_is_overridable_in_a_subclass(
    database: Database, status: int, committed: bool
) -> None:
    """Overriding should_commit changes which statuses commit."""
    Middleware, db = create_middleware_and_session_proxy()

    class StrictMiddleware(Middleware):  # type: ignore[misc,valid-type]
        def should_commit(self, status_code: int) -> bool:
            return CommitOn2xxOnly.should_commit(status_code)

    app = FastAPI()
    app.add_middleware(StrictMiddleware, db_url=database.url, commit_on_exit=True)

    @app.post("/write")
    async def write() -> JSONResponse:
        await db.session.execute(new_item("maybe"))
        return JSONResponse({}, status_code=status, headers={"location": "/x"})

    async with serve(app) as client:
        response = await client.post("/write", follow_redirects=False)
    assert response.status_code == status
    assert await database.names() == (["maybe"] if committed else [])
