"""When the request's session ends while the response goes out, and what may still use it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Database, http_scope, items, make_app, new_item, serve
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy import event, select
from starlette.middleware.gzip import GZipMiddleware

from fastapi_async_sqlalchemy import SessionFinalizedError, create_middleware_and_session_proxy

pytestmark = pytest.mark.anyio


def count_transactions(db: Any) -> dict[str, int]:
    """Counts of the COMMITs and ROLLBACKs the engine's connections really run."""
    counts = {"commit": 0, "rollback": 0}

    def counter(kind: str) -> Any:
        def count(connection: Any) -> None:
            counts[kind] += 1

        return count

    for kind in counts:
        event.listen(db.engine.sync_engine, kind, counter(kind))
    return counts


# -- streaming responses --------------------------------------------------------------------


@pytest.mark.parametrize("commit_on_exit", [True, False])
async def test_streaming_response_finalizes_the_route_work_before_streaming(
    database: Database, commit_on_exit: bool
) -> None:
    """Writes made before a StreamingResponse commit with commit_on_exit, and roll back without."""
    app, db = make_app(database, commit_on_exit=commit_on_exit)

    async def body() -> AsyncIterator[bytes]:
        yield b"one,"
        yield b"two"

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        await db.session.execute(new_item("before-stream"))
        return StreamingResponse(body())

    async with serve(app) as client:
        response = await client.post("/stream")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 200
    assert response.text == "one,two"
    assert await database.names() == (["before-stream"] if commit_on_exit else [])


@pytest.mark.parametrize("route_used_session", [True, False])
async def test_request_session_inside_streaming_body_raises_session_finalized_error(
    database: Database, route_used_session: bool
) -> None:
    """After the first chunk, db.session in the generator raises, naming `async with db():`."""
    app, db = make_app(database, commit_on_exit=True)
    errors: list[BaseException] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"first,"
        try:
            db.session  # noqa: B018 - the read itself is what must fail
        except SessionFinalizedError as exc:
            errors.append(exc)
        yield b"last"

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        if route_used_session:
            await db.session.execute(new_item("route"))
        return StreamingResponse(body())

    async with serve(app) as client:
        response = await client.post("/stream")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 200
    assert response.text == "first,last"
    assert len(errors) == 1
    assert "async with db():" in str(errors[0])
    assert await database.names() == (["route"] if route_used_session else [])


async def test_streaming_body_reads_and_writes_through_its_own_session(database: Database) -> None:
    """A generator's `async with db(commit_on_exit=True):` sees the route's commit and commits."""
    app, db = make_app(database, commit_on_exit=True)
    seen: list[list[str]] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"started,"
        async with db(commit_on_exit=True):
            result = await db.session.execute(select(items.c.name).order_by(items.c.name))
            seen.append(list(result.scalars()))
            await db.session.execute(new_item("from-stream"))
        yield b"done"

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        await db.session.execute(new_item("from-route"))
        return StreamingResponse(body())

    async with serve(app) as client:
        response = await client.post("/stream")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 200
    assert response.text == "started,done"
    assert seen == [["from-route"]]
    assert await database.names() == ["from-route", "from-stream"]


# -- what the server sees: the session is finalized before http.response.start --------------


@pytest.mark.parametrize("final_message", ["http.response.body", "http.response.pathsend"])
async def test_commit_is_visible_before_the_server_receives_the_response_start(
    database: Database, tmp_path: Path, final_message: str
) -> None:
    """The write is committed by the time the server gets http.response.start; the rest follows."""
    Middleware, db = create_middleware_and_session_proxy()
    path = tmp_path / "file.txt"
    path.write_text("file contents")
    final: dict[str, Any] = (
        {"type": "http.response.body", "body": b"done", "more_body": False}
        if final_message == "http.response.body"
        else {"type": "http.response.pathsend", "path": str(path)}
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.session.execute(new_item("written"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send(final)

    middleware = Middleware(app, db_url=database.url, commit_on_exit=True)
    sent: list[dict[str, Any]] = []
    committed_at_start: list[list[str]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            committed_at_start.append(await database.names())
        sent.append(message)

    try:
        await middleware(http_scope("POST", "/write"), receive, send)
        assert db.engine.pool.checkedout() == 0
    finally:
        await middleware.dispose()

    assert committed_at_start == [["written"]]
    assert [message["type"] for message in sent] == ["http.response.start", final_message]
    assert sent[1] == final


# -- background tasks -----------------------------------------------------------------------


@pytest.mark.parametrize("background_writes", [False, True])
async def test_failing_background_task_keeps_the_request_committed(
    database: Database, background_writes: bool
) -> None:
    """A background task that raises neither undoes the request's commit nor leaks a connection."""
    app, db = make_app(database, commit_on_exit=True)
    ran = asyncio.Event()

    async def fail() -> None:
        ran.set()
        if background_writes:
            async with db(commit_on_exit=True):
                await db.session.execute(new_item("from-background"))
                raise RuntimeError("background task failed")
        raise RuntimeError("background task failed")

    @app.post("/write")
    async def write(tasks: BackgroundTasks) -> dict[str, bool]:
        await db.session.execute(new_item("from-request"))
        tasks.add_task(fail)
        return {"ok": True}

    async with serve(app) as client:
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 200
    assert ran.is_set()
    assert await database.names() == ["from-request"]


# -- FastAPI dependencies with yield ---------------------------------------------------------


@pytest.mark.parametrize("dependency_scope", ["function", "request"])
@pytest.mark.parametrize("begin_style", ["async with begin()", "begin() then commit()"])
@pytest.mark.parametrize("commit_on_exit", [True, False])
@pytest.mark.parametrize("status", [200, 400])
async def test_yield_dependency_that_begins_a_transaction_owns_it(
    database: Database, dependency_scope: str, begin_style: str, commit_on_exit: bool, status: int
) -> None:
    """A `yield` dependency's `db.session.begin()` alone decides: one COMMIT, or one ROLLBACK."""
    app, db = make_app(database, commit_on_exit=commit_on_exit)

    async def transaction() -> AsyncIterator[None]:
        if begin_style == "async with begin()":
            async with db.session.begin():
                yield
        else:
            await db.session.begin()
            yield
            await db.session.commit()

    @app.post("/write", dependencies=[Depends(transaction, scope=dependency_scope)])
    async def write() -> dict[str, bool]:
        await db.session.execute(new_item("owned"))
        if status >= 400:
            raise HTTPException(status_code=status)
        return {"ok": True}

    async with serve(app) as client:
        counts = count_transactions(db)
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == status
    if status < 400:
        assert await database.names() == ["owned"]
        assert counts == {"commit": 1, "rollback": 0}
    else:
        assert await database.names() == []
        assert counts == {"commit": 0, "rollback": 1}


@pytest.mark.parametrize("commit_on_exit", [True, False])
@pytest.mark.parametrize("status", [200, 400])
async def test_function_scoped_dependency_teardown_is_part_of_the_request(
    database: Database, commit_on_exit: bool, status: int
) -> None:
    """A `scope="function"` teardown runs before the response, so its writes follow the route's."""
    app, db = make_app(database, commit_on_exit=commit_on_exit)

    async def audit() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await db.session.execute(new_item("from-teardown"))

    @app.post("/write", dependencies=[Depends(audit, scope="function")])
    async def write() -> dict[str, bool]:
        await db.session.execute(new_item("from-route"))
        if status >= 400:
            raise HTTPException(status_code=status)
        return {"ok": True}

    async with serve(app) as client:
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == status
    committed = commit_on_exit and status < 400
    assert await database.names() == (["from-route", "from-teardown"] if committed else [])


@pytest.mark.parametrize("route_used_session", [True, False])
async def test_request_session_in_dependency_teardown_raises_session_finalized_error(
    database: Database, route_used_session: bool
) -> None:
    """After the response, db.session in a teardown raises; `async with db():` there works."""
    app, db = make_app(database, commit_on_exit=True)
    errors: list[BaseException] = []

    async def audit() -> AsyncIterator[None]:
        yield
        try:
            db.session  # noqa: B018 - the read itself is what must fail
        except SessionFinalizedError as exc:
            errors.append(exc)
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("from-teardown"))

    @app.post("/write", dependencies=[Depends(audit)])
    async def write() -> dict[str, bool]:
        if route_used_session:
            await db.session.execute(new_item("from-route"))
        return {"ok": True}

    async with serve(app) as client:
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 200
    assert len(errors) == 1
    assert "async with db():" in str(errors[0])
    expected = ["from-route", "from-teardown"] if route_used_session else ["from-teardown"]
    assert await database.names() == expected


async def test_closing_a_captured_session_in_dependency_teardown_is_harmless(
    database: Database,
) -> None:
    """The classic `yield session` then `await session.close()` dependency still works."""
    app, db = make_app(database, commit_on_exit=True)
    closed: list[bool] = []

    async def get_session() -> AsyncIterator[Any]:
        session = db.session
        try:
            yield session
        finally:
            await session.close()
            closed.append(True)

    @app.post("/write")
    async def write(session: Any = Depends(get_session)) -> dict[str, bool]:  # noqa: B008
        await session.execute(new_item("written"))
        return {"ok": True}

    async with serve(app) as client:
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == 200
    assert closed == [True]
    assert await database.names() == ["written"]


# -- middlewares that run inside ours --------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400])
async def test_function_middleware_inside_shares_the_request_session(
    database: Database, status: int
) -> None:
    """An inner @app.middleware('http') and the route share one session, finalized by status."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    seen: dict[str, Any] = {}

    # Starlette wraps the last-added middleware outermost: added first, this one runs inside ours.
    @app.middleware("http")
    async def record(request: Request, call_next: Any) -> Response:
        seen["middleware"] = db.session
        await db.session.execute(new_item("from-middleware"))
        response: Response = await call_next(request)
        return response

    app.add_middleware(Middleware, db_url=database.url, commit_on_exit=True)

    @app.post("/write")
    async def write() -> dict[str, bool]:
        seen["route"] = db.session
        await db.session.execute(new_item("from-route"))
        if status >= 400:
            raise HTTPException(status_code=status)
        return {"ok": True}

    async with serve(app) as client:
        response = await client.post("/write")
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == status
    assert seen["middleware"] is seen["route"]
    committed = ["from-middleware", "from-route"] if status < 400 else []
    assert await database.names() == committed


@pytest.mark.parametrize("status", [200, 400])
async def test_gzip_middleware_inside_keeps_the_status_rule(
    database: Database, status: int
) -> None:
    """Behind GZipMiddleware a compressed 200 commits and a compressed 400 rolls back."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(GZipMiddleware, minimum_size=100)
    app.add_middleware(Middleware, db_url=database.url, commit_on_exit=True)
    text = "compress me " * 200

    @app.post("/write")
    async def write() -> PlainTextResponse:
        await db.session.execute(new_item("written"))
        if status >= 400:
            raise HTTPException(status_code=status, detail=text)
        return PlainTextResponse(text)

    async with serve(app) as client:
        response = await client.post("/write", headers={"accept-encoding": "gzip"})
        assert db.engine.pool.checkedout() == 0

    assert response.status_code == status
    assert response.headers["content-encoding"] == "gzip"
    assert text in response.text
    assert await database.names() == (["written"] if status < 400 else [])


# -- cancellation and client disconnects -----------------------------------------------------


@pytest.mark.parametrize("again_during_rollback", [False, True])
async def test_cancelled_request_rolls_back_and_returns_its_connection(
    database: Database, again_during_rollback: bool
) -> None:
    """A request cancelled mid-route, even twice, commits nothing and returns its connection."""
    app, db = make_app(database, commit_on_exit=True)
    wrote = asyncio.Event()
    sent: list[dict[str, Any]] = []
    invalidated: list[object] = []

    @app.post("/hang")
    async def hang() -> dict[str, bool]:
        await db.session.execute(new_item("cancelled"))
        wrote.set()
        await asyncio.Event().wait()
        return {"ok": True}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with serve(app):
        request = asyncio.create_task(app(http_scope("POST", "/hang"), receive, send))
        if again_during_rollback:
            # A second cancellation (a server shutting down) lands while the rollback runs.
            event.listen(db.engine.sync_engine, "rollback", lambda connection: request.cancel())
        event.listen(db.engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
        await wrote.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert db.engine.pool.checkedout() == 0

    assert sent == []
    assert invalidated == []
    assert await database.names() == []


async def test_client_disconnect_during_streaming_body_leaks_nothing(database: Database) -> None:
    """A disconnect mid-stream rolls back the generator's own session; the route's commit stays."""
    app, db = make_app(database, commit_on_exit=True)
    stream_wrote = asyncio.Event()
    sent: list[dict[str, Any]] = []
    invalidated: list[object] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("from-stream"))
            stream_wrote.set()
            await asyncio.Event().wait()
        yield b"never sent"

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        await db.session.execute(new_item("from-route"))
        return StreamingResponse(body())

    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await stream_wrote.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with serve(app):
        event.listen(db.engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))
        await app(http_scope("POST", "/stream"), receive, send)
        assert db.engine.pool.checkedout() == 0

    # The rollback ran to its end: the connection went back healthy, not thrown away.
    assert invalidated == []
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"first"
    assert await database.names() == ["from-route"]
