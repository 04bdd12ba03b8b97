"""Operability: excluded paths, admission control and pool saturation warnings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import Database, http_scope, serve
from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import fastapi_async_sqlalchemy._pool
from fastapi_async_sqlalchemy import (
    DBSessionMeta,
    MissingSessionError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio

Message = dict[str, Any]

LOGGER = "fastapi_async_sqlalchemy.middleware"


class Holds:
    """Requests that wait inside the app until released, and how many are inside right now."""

    def __init__(self) -> None:
        self.inside = 0
        self.changed = asyncio.Event()
        self.release = asyncio.Event()

    async def wait_here(self) -> None:
        self.inside += 1
        self.changed.set()
        try:
            await self.release.wait()
        finally:
            self.inside -= 1

    async def until_inside(self, count: int) -> None:
        while self.inside < count:
            self.changed.clear()
            await self.changed.wait()


class Service:
    """A FastAPI app behind the middleware, with routes that hold, stream, raise and send files.

    ``asgi`` is what the server calls: it notes each request entering before the middleware
    sees it, so a test knows when a request is waiting for a permit.
    """

    def __init__(self, database: Database, tmp_path: Path, **options: Any) -> None:
        Middleware, db = create_middleware_and_session_proxy()
        self.db = db
        self.holds = Holds()
        self.entered = asyncio.Event()
        self.work_calls = 0
        self.app = app = FastAPI()
        app.add_middleware(Middleware, db_url=database.url, **options)
        file = tmp_path / "file.txt"
        file.write_text("file body")

        @app.get("/hold")
        async def hold() -> dict[str, bool]:
            await db.session.execute(text("SELECT 1"))  # held with its connection
            await self.holds.wait_here()
            return {"held": True}

        @app.get("/work")
        async def work() -> dict[str, int]:
            self.work_calls += 1
            return {"answer": (await db.session.execute(text("SELECT 1"))).scalar_one()}

        @app.get("/stream")
        async def stream() -> StreamingResponse:
            await db.session.execute(text("SELECT 1"))

            async def chunks() -> Any:
                for number in range(3):
                    yield f"{number}\n"

            return StreamingResponse(chunks())

        @app.get("/raise")
        async def fail() -> None:
            await db.session.execute(text("SELECT 1"))
            raise RuntimeError("handler failed")

        @app.get("/file")
        async def send_file() -> FileResponse:
            await db.session.execute(text("SELECT 1"))
            return FileResponse(file)

        @app.get("/health")
        async def health() -> dict[str, bool]:
            try:
                db.session  # noqa: B018
            except MissingSessionError:
                return {"session": False}
            return {"session": True}

    async def asgi(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.entered.set()
        await self.app(scope, receive, send)

    async def hold(self, client: httpx.AsyncClient, count: int) -> list[asyncio.Task[Any]]:
        """Start ``count`` requests to /hold and wait until all of them are inside the app."""
        held = [asyncio.create_task(client.get("/hold")) for _ in range(count)]
        try:
            async with asyncio.timeout(5):  # a refused one would be waited for forever
                await self.holds.until_inside(count)
        except TimeoutError:
            statuses = [response.status_code for response in await self.let_go(held)]
            pytest.fail(f"{count} requests could not be in flight at once: {statuses}")
        return held

    async def let_go(self, held: list[asyncio.Task[Any]]) -> list[httpx.Response]:
        """Release the held requests and give back their responses."""
        self.holds.release.set()
        responses = await asyncio.gather(*held)
        self.holds.release = asyncio.Event()
        return responses

    async def call_with_pathsend(self, path: str) -> list[Message]:
        """Call ``path`` as a server that offers the pathsend extension; the messages it sent."""
        sent: list[Message] = []
        done = asyncio.Event()
        requested = False

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "http.response.pathsend":
                done.set()

        scope = http_scope("GET", path)
        await self.asgi(scope, receive, send)
        return sent


async def assert_exactly_in_flight(service: Service, client: httpx.AsyncClient, limit: int) -> None:
    """``limit`` requests can be in flight at once, and one more is then answered 503."""
    held = await service.hold(client, limit)
    one_more = await client.get("/work")
    responses = await service.let_go(held)
    assert [response.status_code for response in responses] == [200] * limit
    assert one_more.status_code == 503


# -- excluded paths ---------------------------------------------------------------------------


async def test_excluded_path_has_no_session_and_answers_while_every_permit_is_taken(
    database: Database, tmp_path: Path
) -> None:
    """An excluded path gets no session and is served even when admission would refuse it."""
    service = Service(
        database, tmp_path, max_concurrent_requests=1, exclude_paths=["/health", "/other"]
    )

    async with serve(service.asgi) as client:
        held = await service.hold(client, 1)
        health = await client.get("/health")
        refused = await client.get("/work")
        responses = await service.let_go(held)

    assert (health.status_code, health.json()) == (200, {"session": False})
    assert refused.status_code == 503
    assert [response.status_code for response in responses] == [200]


# -- admission control ------------------------------------------------------------------------


async def test_request_beyond_capacity_gets_503_without_reaching_the_app(
    database: Database, tmp_path: Path
) -> None:
    """With the only permit taken, a request waits its queue timeout and gets a JSON 503."""
    service = Service(database, tmp_path, max_concurrent_requests=1, request_queue_timeout=0.1)

    async with serve(service.asgi) as client:
        held = await service.hold(client, 1)
        refused = await client.get("/work")
        calls_while_full = service.work_calls
        [first] = await service.let_go(held)
        admitted = await client.get("/work")
        assert service.db.engine.pool.checkedout() == 0

    assert first.status_code == 200
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"  # what 0.8.1 sends, whatever the timeout
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {"detail": "Database request capacity exhausted"}
    assert calls_while_full == 0
    assert (admitted.status_code, admitted.json()) == (200, {"answer": 1})
    assert service.work_calls == 1


REQUEST_ENDINGS = [
    "returned",
    "raised",
    "streamed",
    "sent a file by pathsend",
    "cancelled in the app",
    "cancelled while queued",
]


async def end_one_request(service: Service, client: httpx.AsyncClient, ending: str) -> None:
    """Send one request that ends as ``ending`` says, and check it did end that way."""
    if ending == "returned":
        assert (await client.get("/work")).status_code == 200
    elif ending == "raised":
        assert (await client.get("/raise")).status_code == 500
    elif ending == "streamed":
        async with client.stream("GET", "/stream") as response:
            assert [line async for line in response.aiter_lines()] == ["0", "1", "2"]
    elif ending == "sent a file by pathsend":
        sent = await service.call_with_pathsend("/file")
        assert [message["type"] for message in sent] == [
            "http.response.start",
            "http.response.pathsend",
        ]
        assert sent[0]["status"] == 200
    elif ending == "cancelled in the app":
        [request] = await service.hold(client, 1)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    else:
        held = await service.hold(client, 2)  # every permit taken
        service.entered.clear()
        queued = asyncio.create_task(client.get("/work"))
        await service.entered.wait()  # it ran on into the middleware and now waits for a permit
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert [response.status_code for response in await service.let_go(held)] == [200, 200]


@pytest.mark.parametrize("ending", REQUEST_ENDINGS)
async def test_permits_come_back_however_a_request_ends(
    database: Database, tmp_path: Path, ending: str
) -> None:
    """After requests that end in any way, exactly max_concurrent_requests still get in at once."""
    # A request cancelled while queued must still be waiting when it is cancelled.
    timeout = 1.0 if ending == "cancelled while queued" else 0.1
    service = Service(database, tmp_path, max_concurrent_requests=2, request_queue_timeout=timeout)

    async with serve(service.asgi) as client:
        for _ in range(3):  # more requests than permits: one leaked permit each would show
            await end_one_request(service, client, ending)
        calls_before = service.work_calls
        await assert_exactly_in_flight(service, client, 2)
        assert service.db.engine.pool.checkedout() == 0
    assert service.work_calls == calls_before  # the refused request never reached the app


def test_each_event_loop_has_its_own_permits(tmp_path: Path) -> None:
    """The only permit held in one event loop does not hold back requests in another loop."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    holds_by_loop: dict[asyncio.AbstractEventLoop, Holds] = {}

    @app.get("/hold")
    async def hold() -> dict[str, bool]:
        await db.session.execute(text("SELECT 1"))
        await holds_by_loop[asyncio.get_running_loop()].wait_here()
        return {"held": True}

    @app.get("/work")
    async def work() -> dict[str, int]:
        return {"answer": (await db.session.execute(text("SELECT 1"))).scalar_one()}

    middleware = Middleware(
        app,
        db_url=f"sqlite+aiosqlite:///{tmp_path / 'loops.sqlite3'}",
        engine_args={"poolclass": NullPool},  # no connection is handed from one loop to another
        max_concurrent_requests=1,
    )

    async def hold_the_permit_then(in_other_loop: Any = None) -> list[int]:
        """Hold this loop's permit, show it is taken, and meanwhile run ``in_other_loop``."""
        holds = holds_by_loop[asyncio.get_running_loop()] = Holds()
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = asyncio.create_task(client.get("/hold"))
            try:
                async with asyncio.timeout(5):  # a refused request would be waited for forever
                    await holds.until_inside(1)
            except TimeoutError:
                pytest.fail(f"the first request of a loop was refused: {(await held).status_code}")
            refused = await client.get("/work")
            other: list[int] = []
            if in_other_loop is not None:
                other = await asyncio.to_thread(asyncio.run, in_other_loop())
            holds.release.set()
            statuses = [(await held).status_code, refused.status_code]
        return statuses + other

    try:
        statuses = asyncio.run(hold_the_permit_then(hold_the_permit_then))
    finally:
        asyncio.run(middleware.dispose())
    assert statuses == [200, 503, 200, 503]


# -- pool saturation warnings -----------------------------------------------------------------


class Clock:
    """The time the saturation warning sees; tests move it on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(
        fastapi_async_sqlalchemy._pool, "time", SimpleNamespace(monotonic=clock.monotonic)
    )
    return clock


def saturation_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno == logging.WARNING
    ]


async def check_out(db: DBSessionMeta, count: int) -> None:
    """Hold ``count`` connections at once, through nested blocks, then give them back."""
    async with AsyncExitStack() as stack:
        for _ in range(count):
            await stack.enter_async_context(db())
            await db.session.execute(text("SELECT 1"))


SMALL_POOL = {"pool_size": 2, "max_overflow": 0}


@asynccontextmanager
async def half_pool_watched(database: Database, interval: float) -> AsyncIterator[DBSessionMeta]:
    """A proxy on a pool of two that warns when half of it is checked out, at most once per
    ``interval`` seconds."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        FastAPI(),
        db_url=database.url,
        engine_args=SMALL_POOL,
        pool_warn_threshold=0.5,
        pool_warn_interval=interval,
    )
    try:
        yield db
    finally:
        await middleware.dispose()


async def test_saturated_pool_logs_one_warning_per_interval(
    database: Database, caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    """Crossing the threshold logs a WARNING, then nothing more until the interval has passed."""
    async with half_pool_watched(database, interval=10) as db:
        await check_out(db, 1)
        first = saturation_warnings(caplog)
        clock.advance(9.5)
        await check_out(db, 2)
        await check_out(db, 1)
        within_interval = saturation_warnings(caplog)
        clock.advance(1)
        await check_out(db, 1)
        after_interval = saturation_warnings(caplog)

    assert len(first) == 1
    assert "saturated" in first[0]
    assert "1 of 2" in first[0]
    assert within_interval == first
    assert len(after_interval) == 2


async def test_zero_warn_interval_warns_at_every_crossing(
    database: Database, caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    """pool_warn_interval=0 is accepted (as 0.8.1 accepts it) and warns at every checkout that
    leaves the pool above the threshold, with no time passing in between."""
    async with half_pool_watched(database, interval=0) as db:
        for _ in range(3):
            await check_out(db, 1)

    assert len(saturation_warnings(caplog)) == 3


async def test_pool_below_the_threshold_logs_nothing(
    database: Database, caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    """Half the pool in use stays quiet under a 0.75 threshold; the whole pool warns."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        FastAPI(), db_url=database.url, engine_args=SMALL_POOL, pool_warn_threshold=0.75
    )
    try:
        await check_out(db, 1)
        await check_out(db, 1)
        below = saturation_warnings(caplog)
        await check_out(db, 2)
        at_full = saturation_warnings(caplog)
    finally:
        await middleware.dispose()

    assert below == []
    assert len(at_full) == 1
    assert "2 of 2" in at_full[0]


@pytest.mark.parametrize("engine_source", ["db_url", "custom_engine"])
async def test_saturation_warning_stops_at_dispose_and_resumes_at_the_next_startup(
    database: Database, caplog: pytest.LogCaptureFixture, clock: Clock, engine_source: str
) -> None:
    """After dispose() or a lifespan end, checkouts log nothing; a new startup watches again."""
    Middleware, db = create_middleware_and_session_proxy()
    custom = create_async_engine(database.url, **SMALL_POOL)
    if engine_source == "db_url":
        source: dict[str, Any] = {"db_url": database.url, "engine_args": SMALL_POOL}
    else:
        source = {"custom_engine": custom}
    middleware = Middleware(FastAPI(), pool_warn_threshold=0.5, pool_warn_interval=10, **source)
    engine = middleware.engine
    counts = []

    async def check_out_directly() -> None:
        """A checkout on the engine itself, with the throttle long expired."""
        clock.advance(60)
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    try:
        await check_out(db, 1)
        counts.append(len(saturation_warnings(caplog)))
        await middleware.dispose()
        await check_out_directly()
        counts.append(len(saturation_warnings(caplog)))

        async with serve(middleware):
            clock.advance(60)
            await check_out(db, 1)
            counts.append(len(saturation_warnings(caplog)))
        await check_out_directly()
        counts.append(len(saturation_warnings(caplog)))
    finally:
        await middleware.dispose()
        await engine.dispose()
        await custom.dispose()

    assert counts == [1, 1, 2, 2]
