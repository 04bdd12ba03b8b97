"""Plumbing shared by the compat scenarios (see tests/test_against_081.py).

It uses only the standard library, SQLAlchemy and the package's public names, so it runs under
both interpreters: the published 0.8.1 in ``.venv-0.8.1`` and this project's. A scenario is user
code; this module only runs it and turns what the user saw into one JSON object on stdout:
exception classes an ``except`` clause could catch (never messages or reprs), time buckets (never
raw times), warning categories, and errors the event loop logged (a task exception nobody
retrieved, a pending task destroyed).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

# SQLModel's AsyncSession (our default session class when SQLModel is installed) advises .exec()
# over .execute(): advice about SQLModel, not about either package.
SQLMODEL_ADVICE = r"(?s).*You probably want to use .session.exec\(\)"

# One table per process: both interpreters run at once against the same server database.
items = Table(
    f"compat_{os.getpid()}",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(50)),
)


def url() -> str:
    """The database URL the test passed as the first argument."""
    return sys.argv[1]


def kinds(exc: BaseException, *library: type[BaseException]) -> list[str]:
    """What an ``except`` clause can catch ``exc`` as.

    Its builtin classes (say ``RuntimeError``, ``TimeoutError``, ``OSError``), the package's
    public exceptions and the SQLAlchemy errors users catch (``sqlalchemy.exc.ArgumentError``
    and so on) it is an instance of, and those of ``library``.
    """
    import sqlalchemy.exc

    import fastapi_async_sqlalchemy as package

    ignored = (object, BaseException, Exception)
    names = {
        cls.__name__
        for cls in type(exc).__mro__
        if cls.__module__ == "builtins" and cls not in ignored
    }
    public = [
        package.MissingSessionError,
        package.SessionNotInitialisedError,
        package.PoolTimeoutError,
        *library,
    ]
    names.update(cls.__name__ for cls in public if isinstance(exc, cls))
    for name in (
        "SQLAlchemyError",
        "ArgumentError",
        "InvalidRequestError",
        "DBAPIError",
        "OperationalError",
        "IntegrityError",
        "TimeoutError",
    ):
        if isinstance(exc, getattr(sqlalchemy.exc, name)):
            names.add(f"sqlalchemy.exc.{name}")
    return sorted(names)


def attempt(call: Callable[[], Any], *library: type[BaseException]) -> dict[str, Any]:
    """``{"ok": True}`` or ``{"raised": kinds}`` for calling ``call``."""
    try:
        call()
    except BaseException as exc:
        return {"raised": kinds(exc, *library)}
    return {"ok": True}


@contextlib.contextmanager
def warning_categories() -> Iterator[list[str]]:
    """Record the warnings raised inside; the list holds their sorted category names after."""
    categories: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", SQLMODEL_ADVICE, DeprecationWarning)
        yield categories
    categories.extend(sorted({warning.category.__name__ for warning in seen}))


class Clock:
    """Elapsed time in buckets: "fast" under ``limit`` seconds, else "slow"."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def bucket(self, limit: float = 1.5) -> str:
        return "fast" if time.monotonic() - self.start < limit else "slow"

    def window(self, earliest: float, latest: float) -> str:
        """ "early", "on time" or "late" with respect to the window [earliest, latest)."""
        elapsed = time.monotonic() - self.start
        return "early" if elapsed < earliest else "on time" if elapsed < latest else "late"


@contextlib.contextmanager
def library_log() -> Iterator[list[logging.LogRecord]]:
    """Collect the log records of the package's loggers (``fastapi_async_sqlalchemy...``)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.DEBUG)
    logger = logging.getLogger("fastapi_async_sqlalchemy")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep stderr quiet; the records are what is compared
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def http_scope(path: str | None = "/", method: str = "GET") -> dict[str, Any]:
    """The scope a server gives an HTTP/1.1 request; ``path=None`` leaves ``path`` out."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    if path is not None:
        scope.update(path=path, raw_path=path.encode())
    return scope


class Exchange:
    """One HTTP request driven by hand, the way a server drives an ASGI app.

    Unlike ``httpx.ASGITransport``, which returns only once the whole app call (background
    tasks included) has returned, this tells when the response is complete: ``done`` is set at
    the final body chunk. ``call`` is the app call, as a task.
    """

    def __init__(self, app: Any, path: str | None = "/") -> None:
        self.messages: list[dict[str, Any]] = []
        self.done = asyncio.Event()
        self._request_sent = False
        self._disconnected = asyncio.Event()
        self.call = asyncio.ensure_future(app(http_scope(path), self.receive, self.send))

    async def receive(self) -> dict[str, Any]:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.done.set()
            self._disconnected.set()

    async def response(self, limit: float = 2.0) -> dict[str, Any]:
        """The status, or ``"no response"`` when none was complete within ``limit`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), limit)
        if not self.done.is_set():
            return {"status": "no response"}
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return {"status": start["status"]}

    def header(self, name: bytes) -> str | None:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        values = [value.decode() for key, value in start["headers"] if key.lower() == name]
        return values[0] if values else None

    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    async def finish(self, limit: float = 2.0) -> dict[str, Any]:
        """How the app call ended: returned, raised (its kinds) or still running."""
        done, _ = await asyncio.wait({self.call}, timeout=limit)
        if not done:
            self.call.cancel()
            return {"app": "still running"}
        if self.call.exception() is not None:
            return {"app": {"raised": kinds(self.call.exception())}}  # type: ignore[arg-type]
        return {"app": "returned"}


class Lifespan:
    """An ASGI lifespan driven by hand: ``await step("lifespan.startup")`` and so on."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[str] = []
        self.call: asyncio.Future[Any] | None = None
        self._replied = asyncio.Event()

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message["type"])
        self._replied.set()

    async def step(self, message_type: str, limit: float = 2.0) -> dict[str, Any]:
        """Send ``message_type``; what the app answered and whether its call is over."""
        if self.call is None:
            scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
            scope["state"] = {}
            self.call = asyncio.ensure_future(self.app(scope, self.inbox.get, self._send))
        seen = len(self.sent)
        self._replied.clear()
        await self.inbox.put({"type": message_type})
        replied = asyncio.ensure_future(self._replied.wait())
        await asyncio.wait({self.call, replied}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        replied.cancel()
        await asyncio.sleep(0.05)  # an app that answers and then raises: let it raise
        result: dict[str, Any] = {"replies": self.sent[seen:]}
        if not self.call.done():
            result["app"] = "running" if self.sent[seen:] else "hung"
        elif self.call.exception() is not None:
            result["app"] = {"raised": kinds(self.call.exception())}  # type: ignore[arg-type]
        else:
            result["app"] = "returned"
        return result

    def stop(self) -> None:
        if self.call is not None and not self.call.done():
            self.call.cancel()


async def create_table() -> None:
    engine = create_async_engine(url(), poolclass=NullPool)
    async with engine.begin() as connection:
        await connection.run_sync(items.metadata.drop_all)
        await connection.run_sync(items.metadata.create_all)
    await engine.dispose()


async def committed_rows() -> int:
    """How many rows of ``items`` are committed, seen from a connection of its own."""
    engine = create_async_engine(url(), poolclass=NullPool)
    async with engine.connect() as connection:
        count = (await connection.execute(select(func.count()).select_from(items))).scalar_one()
    await engine.dispose()
    return int(count)


async def drop_table() -> None:
    engine = create_async_engine(url(), poolclass=NullPool)
    async with engine.begin() as connection:
        await connection.run_sync(items.metadata.drop_all)
    await engine.dispose()


def run(
    main: Callable[[], Awaitable[dict[str, Any]]],
    *,
    limit: float = 20.0,
    record_warnings: bool = True,
) -> None:
    """Run ``main`` in a fresh event loop and print its result as one JSON object.

    A ``main`` that does not finish within ``limit`` seconds reports ``{"hung": true}``; one that
    raises reports the exception's kinds under ``"unhandled"``. ``"warnings"`` lists the
    categories of every warning not recorded by the scenario itself (unless
    ``record_warnings`` is false: a scenario where the two packages deliberately differ in what
    they warn about), ``"loop_errors"`` counts the errors the event loop logged.
    """
    loop_errors: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            loop_errors.append(record)

    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(Collect(logging.ERROR))
    asyncio_logger.propagate = False

    async def bounded() -> dict[str, Any]:
        task = asyncio.ensure_future(main())
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return {"hung": True}
        return task.result()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", SQLMODEL_ADVICE, DeprecationWarning)
        try:
            result = asyncio.run(bounded())
        except BaseException as exc:
            result = {"unhandled": kinds(exc)}
        gc.collect()
    if record_warnings:
        result["warnings"] = sorted({warning.category.__name__ for warning in seen})
    result["loop_errors"] = len(loop_errors)
    print(json.dumps(result, sort_keys=True))
