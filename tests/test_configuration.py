"""Configuration: bad arguments refused up front, engine ownership, proxies, session classes."""

from __future__ import annotations

import math
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Database, items, metadata, new_item, serve, unused_app
from fastapi import FastAPI
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool
from sqlmodel import Field, SQLModel
from sqlmodel import select as sqlmodel_select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession

import fastapi_async_sqlalchemy._engine
import fastapi_async_sqlalchemy._middleware
from fastapi_async_sqlalchemy import (
    InvalidConfigurationError,
    MissingSessionError,
    ProxyBindingError,
    SessionNotInitialisedError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio

PASSWORD = "s3cr3t-pw"
SECRET_URL = f"postgresql+asyncpg://user:{PASSWORD}@127.0.0.1:1/x"


@pytest.fixture
def engines_created(monkeypatch: pytest.MonkeyPatch) -> list[AsyncEngine]:
    """Every engine the middleware creates from a db_url during the test."""
    created: list[AsyncEngine] = []

    def spy(*args: Any, **kwargs: Any) -> AsyncEngine:
        engine = create_async_engine(*args, **kwargs)
        created.append(engine)
        return engine

    monkeypatch.setattr(fastapi_async_sqlalchemy._engine, "create_async_engine", spy)
    return created


def assert_never_shows_the_password(exc: BaseException) -> None:
    """Neither the message, the repr nor the printed traceback (causes included) holds it."""
    assert PASSWORD not in str(exc)
    assert PASSWORD not in repr(exc)
    assert PASSWORD not in "".join(traceback.format_exception(exc))


# Placeholders for engines, made inside the test (parametrize ids are computed at import time).
ASYNC_ENGINE = "<an AsyncEngine>"
SYNC_ENGINE = "<a synchronous Engine>"


def _values(argument: str, *values: object) -> list[Any]:
    return [
        pytest.param({argument: value}, (argument,), id=f"{argument}={value!r}") for value in values
    ]


INVALID_ARGUMENTS = [
    pytest.param({"db_url": None}, ("db_url", "custom_engine"), id="neither-db_url-nor-engine"),
    pytest.param(
        {"custom_engine": ASYNC_ENGINE}, ("db_url", "custom_engine"), id="db_url-and-engine"
    ),
    pytest.param(
        {"db_url": None, "custom_engine": SYNC_ENGINE},
        ("custom_engine",),
        id="custom_engine-not-async",
    ),
    *_values("pool_warn_threshold", 0, -0.1, 1.5, True, "0.5", math.nan),
    *_values("max_concurrent_requests", 0, -1, True, 1.5, "3"),
    *_values("request_queue_timeout", 0, -1, math.inf, math.nan, True, "1"),
    *_values("pool_warn_interval", -1, -0.001, math.inf, math.nan, True, "1"),
    pytest.param(
        {"session_args": {"expire_on_comit": False}},
        ("session_args", "expire_on_comit"),
        id="session_args-unknown-key",
    ),
    pytest.param(
        {"session_args": [("autoflush", False)]}, ("session_args",), id="session_args-not-a-dict"
    ),
    pytest.param(
        {"session_args": {"class_": dict}}, ("session_args", "class_"), id="session_args-class_"
    ),
    pytest.param({"exclude_paths": 5}, ("exclude_paths",), id="exclude_paths-not-iterable"),
    pytest.param({"db_url": "not a url"}, ("db_url",), id="db_url-unparseable"),
    pytest.param(
        {"db_url": f"://user:{PASSWORD}@127.0.0.1/x"},
        ("db_url",),
        id="db_url-unparseable-with-password",
    ),
    pytest.param(
        {"db_url": f"postgresql+asyncpg://user:{PASSWORD}@127.0.0.1:port/x"},
        ("db_url",),
        id="db_url-unparseable-port",
    ),
    pytest.param(
        {"db_url": f"postgresql+nosuchdriver://user:{PASSWORD}@127.0.0.1/x"},
        ("db_url",),
        id="db_url-unknown-driver",
    ),
    pytest.param({"db_url": 5432}, ("db_url",), id="db_url-not-a-string"),
    pytest.param(
        {"engine_args": {"pool_sise": 5}}, ("engine_args", "pool_sise"), id="engine_args-typo"
    ),
    pytest.param({"engine_args": ["echo"]}, ("engine_args",), id="engine_args-not-a-dict"),
]


@pytest.mark.parametrize(
    ("arguments", "also"),
    [
        pytest.param({"db_url": "not a url"}, ArgumentError, id="unparseable-url"),
        pytest.param({"db_url": "postgresql+nosuch://u@h/x"}, ArgumentError, id="unknown-driver"),
        pytest.param({"db_url": 5432}, ArgumentError, id="url-not-a-string"),
        pytest.param({"db_url": "mssql+aioodbc://u@h/x"}, ImportError, id="driver-missing"),
        pytest.param({"db_url": "sqlite://"}, InvalidRequestError, id="driver-synchronous"),
        pytest.param({"engine_args": {"pool_sise": 5}}, TypeError, id="engine_args-unknown"),
        pytest.param({"engine_args": ["echo"]}, TypeError, id="engine_args-not-a-dict"),
        pytest.param({"exclude_paths": 5}, TypeError, id="exclude_paths-not-iterable"),
        pytest.param({"pool_warn_threshold": "x"}, TypeError, id="threshold-not-a-number"),
        pytest.param({"request_queue_timeout": "x"}, TypeError, id="timeout-not-a-number"),
    ],
)
def test_refusal_is_also_the_error_type_0_8_raised(
    arguments: dict[str, Any], also: type[Exception]
) -> None:
    """A refused argument is an InvalidConfigurationError (a ValueError) and also the type 0.8.1
    raised for it, so `except TypeError:` or `except ArgumentError:` written for 0.8.1 still
    catches it."""
    Middleware, _ = create_middleware_and_session_proxy()
    with pytest.raises(InvalidConfigurationError) as refused:
        Middleware(unused_app, **{"db_url": "sqlite+aiosqlite://", **arguments})
    assert isinstance(refused.value, ValueError)
    assert isinstance(refused.value, also)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("arguments", "named"), INVALID_ARGUMENTS)
async def test_bad_argument_is_refused_before_anything_is_allocated(
    engines_created: list[AsyncEngine], arguments: dict[str, Any], named: tuple[str, ...]
) -> None:
    """A bad argument raises a one-line ValueError naming it; no engine, proxy left unbound."""
    Middleware, db = create_middleware_and_session_proxy()
    custom_engine = create_async_engine("sqlite+aiosqlite://")
    placeholders = {ASYNC_ENGINE: custom_engine, SYNC_ENGINE: create_engine("sqlite://")}
    options = {"db_url": SECRET_URL, **arguments}
    options = {
        name: placeholders.get(value, value) if isinstance(value, str) else value
        for name, value in options.items()
    }
    try:
        with pytest.raises(InvalidConfigurationError) as raised:
            Middleware(app=unused_app, **options)
    finally:
        await custom_engine.dispose()

    exc = raised.value
    assert isinstance(exc, ValueError)
    message = str(exc)
    assert "\n" not in message.strip()
    for name in named:
        assert name in message
    assert_never_shows_the_password(exc)
    assert engines_created == []
    with pytest.raises(SessionNotInitialisedError):
        db.session  # noqa: B018


async def test_boundary_values_are_accepted(engines_created: list[AsyncEngine]) -> None:
    """The smallest and largest accepted values, any iterable of paths and a URL object work."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        app=unused_app,
        db_url=make_url("sqlite+aiosqlite://"),
        engine_args={"echo": False},
        session_args={"class_": AsyncSession, "autoflush": False},
        exclude_paths=(path for path in ["/health"]),
        pool_warn_threshold=1,
        pool_warn_interval=0.001,
        max_concurrent_requests=1,
        request_queue_timeout=1,
    )
    try:
        assert engines_created == [middleware.engine]
        async with db():
            assert type(db.session) is AsyncSession
            assert (await db.session.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await middleware.dispose()


async def test_bad_session_args_of_a_block_are_refused(engines_created: list[AsyncEngine]) -> None:
    """`db(session_args=...)` with an unknown keyword raises InvalidConfigurationError."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(app=unused_app, db_url="sqlite+aiosqlite://")
    try:
        with pytest.raises(InvalidConfigurationError, match="session_args"):
            db(session_args={"expire_on_comit": False})
    finally:
        await middleware.dispose()


async def test_proxy_used_before_any_middleware_says_it_is_not_initialised() -> None:
    """db.session, db.engine and `async with db():` raise SessionNotInitialisedError unbound."""
    _, db = create_middleware_and_session_proxy()
    with pytest.raises(SessionNotInitialisedError, match="SQLAlchemyMiddleware"):
        db.session  # noqa: B018
    with pytest.raises(SessionNotInitialisedError):
        db.engine  # noqa: B018
    with pytest.raises(SessionNotInitialisedError):
        async with db():
            pass


@pytest.mark.parametrize("second_source", ["db_url", "custom_engine"])
async def test_second_engine_on_a_bound_proxy_is_refused(
    engines_created: list[AsyncEngine], second_source: str
) -> None:
    """Binding a live proxy to another engine raises ProxyBindingError and changes nothing."""
    Middleware, db = create_middleware_and_session_proxy()
    first = Middleware(app=unused_app, db_url="sqlite+aiosqlite://")
    other_engine = create_async_engine("sqlite+aiosqlite://")
    second: dict[str, Any] = (
        {"db_url": SECRET_URL} if second_source == "db_url" else {"custom_engine": other_engine}
    )
    try:
        with pytest.raises(ProxyBindingError) as raised:
            Middleware(app=unused_app, **second)
        assert db.engine is first.engine
        assert engines_created == [first.engine]
    finally:
        await first.dispose()
        await other_engine.dispose()

    exc = raised.value
    assert isinstance(exc, RuntimeError)
    assert "create_middleware_and_session_proxy" in str(exc)
    assert "\n" not in str(exc)
    assert_never_shows_the_password(exc)


async def test_refused_construction_leaves_an_existing_binding_alone() -> None:
    """A second middleware refused for a bad argument does not unbind or rebind the proxy."""
    Middleware, db = create_middleware_and_session_proxy()
    first = Middleware(app=unused_app, db_url="sqlite+aiosqlite://")
    try:
        with pytest.raises(InvalidConfigurationError):
            Middleware(app=unused_app, db_url="sqlite+aiosqlite://", pool_warn_threshold=2)
        assert db.engine is first.engine
        async with db():
            assert (await db.session.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await first.dispose()


async def test_same_custom_engine_may_bind_a_proxy_twice(database: Database) -> None:
    """Two middlewares sharing one custom_engine on one proxy is not a conflict."""
    engine = create_async_engine(database.url)
    Middleware, db = create_middleware_and_session_proxy()
    try:
        first = Middleware(app=unused_app, custom_engine=engine)
        second = Middleware(app=unused_app, custom_engine=engine, commit_on_exit=True)
        assert db.engine is engine
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("shared"))
        await first.dispose()
        await second.dispose()
        assert engine.pool.checkedout() == 0
    finally:
        await engine.dispose()
    assert await database.names() == ["shared"]


async def test_proxy_can_be_bound_again_after_dispose(database: Database) -> None:
    """After `await first.dispose()` another middleware may bind the proxy and keeps it bound."""
    Middleware, db = create_middleware_and_session_proxy()
    first = Middleware(app=unused_app, db_url=database.url)
    await first.dispose()
    second = Middleware(app=unused_app, db_url=database.url, commit_on_exit=True)
    try:
        assert db.engine is second.engine
        await first.dispose()  # idempotent, and must not unbind the new binding
        assert db.engine is second.engine
        async with db(commit_on_exit=True):
            await db.session.execute(new_item("rebound"))
    finally:
        await second.dispose()
    assert await database.names() == ["rebound"]


async def test_dispose_releases_the_owned_engine_and_is_idempotent(database: Database) -> None:
    """dispose() closes the owned engine's pooled connections, unbinds, and may be repeated."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(app=unused_app, db_url=database.url)
    async with db():
        await db.session.execute(text("SELECT 1"))
    pool = middleware.engine.pool
    assert pool.checkedin() == 1

    await middleware.dispose()
    await middleware.dispose()

    assert pool.checkedin() == 0
    with pytest.raises(SessionNotInitialisedError):
        async with db():
            pass


@pytest.mark.parametrize("ended_by", ["dispose", "lifespan"])
async def test_custom_engine_is_never_disposed(database: Database, ended_by: str) -> None:
    """Neither dispose() nor the end of the lifespan touches a custom_engine or its pool."""
    engine = create_async_engine(database.url)
    Middleware, _ = create_middleware_and_session_proxy()
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        pool = engine.pool
        assert pool.checkedin() == 1

        if ended_by == "dispose":
            middleware = Middleware(app=unused_app, custom_engine=engine)
            await middleware.dispose()
        else:
            app = FastAPI()
            app.add_middleware(Middleware, custom_engine=engine)
            async with serve(app):
                pass

        assert engine.pool is pool
        assert pool.checkedin() == 1
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


# -- several databases: one pair per database -------------------------------------------------


@pytest.fixture
async def second_database(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A second SQLite file with its own ``items`` table, seen through a NullPool engine."""
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'second.sqlite3'}", poolclass=NullPool
    )
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


async def names_in(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return list(
            (await connection.execute(select(items.c.name).order_by(items.c.name))).scalars()
        )


async def test_two_proxies_on_one_app_write_to_their_own_databases(
    database: Database, second_database: AsyncEngine
) -> None:
    """Each route writes through its own proxy into its own database, alone or together."""
    PrimaryMiddleware, primary = create_middleware_and_session_proxy()
    SecondaryMiddleware, secondary = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(PrimaryMiddleware, db_url=database.url, commit_on_exit=True)
    app.add_middleware(SecondaryMiddleware, db_url=str(second_database.url), commit_on_exit=True)

    @app.post("/primary")
    async def write_primary() -> dict[str, bool]:
        await primary.session.execute(new_item("primary"))
        return {"ok": True}

    @app.post("/secondary")
    async def write_secondary() -> dict[str, bool]:
        await secondary.session.execute(new_item("secondary"))
        return {"ok": True}

    @app.post("/both")
    async def write_both() -> dict[str, bool]:
        assert primary.session is not secondary.session
        await primary.session.execute(new_item("both-primary"))
        await secondary.session.execute(new_item("both-secondary"))
        return {"ok": True}

    async with serve(app) as client:
        for path in ("/primary", "/secondary", "/both"):
            assert (await client.post(path)).status_code == 200
        assert primary.engine is not secondary.engine
        assert primary.engine.pool.checkedout() == secondary.engine.pool.checkedout() == 0

    assert await database.names() == ["both-primary", "primary"]
    assert await names_in(second_database) == ["both-secondary", "secondary"]


async def test_pairs_share_neither_binding_nor_scope() -> None:
    """Binding or entering one proxy does not bind or open a scope for another."""
    FirstMiddleware, first = create_middleware_and_session_proxy()
    SecondMiddleware, second = create_middleware_and_session_proxy()
    first_middleware = FirstMiddleware(app=unused_app, db_url="sqlite+aiosqlite://")
    try:
        with pytest.raises(SessionNotInitialisedError):
            second.session  # noqa: B018
        async with first():
            with pytest.raises(SessionNotInitialisedError):
                second.session  # noqa: B018

        second_middleware = SecondMiddleware(app=unused_app, db_url="sqlite+aiosqlite://")
        try:
            async with first():
                with pytest.raises(MissingSessionError):
                    second.session  # noqa: B018
                async with second():
                    assert first.session.bind is first_middleware.engine
                    assert second.session.bind is second_middleware.engine
        finally:
            await second_middleware.dispose()
        assert first.engine is first_middleware.engine
    finally:
        await first_middleware.dispose()


# -- SQLModel ------------------------------------------------------------------------------------


class Gadget(SQLModel, table=True):
    """A tiny SQLModel table, named so it cannot clash with any other test table."""

    __tablename__ = "fastapi_async_sqlalchemy_test_gadgets"

    id: int | None = Field(default=None, primary_key=True)
    name: str


@pytest.fixture
async def gadgets(database: Database) -> AsyncIterator[None]:
    """The ``Gadget`` table, created on the test database and dropped afterwards."""
    table = SQLModel.metadata.tables[Gadget.__tablename__]
    async with database.check.begin() as connection:
        await connection.run_sync(table.drop, checkfirst=True)
        await connection.run_sync(table.create)
    yield
    async with database.check.begin() as connection:
        await connection.run_sync(table.drop)


async def test_sqlmodel_session_is_the_default_and_exec_works(
    database: Database, gadgets: None
) -> None:
    """With SQLModel installed, db.session is SQLModel's AsyncSession and `.exec()` works."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(Middleware, db_url=database.url, commit_on_exit=True)

    @app.post("/gadgets")
    async def add_gadget() -> dict[str, str]:
        db.session.add(Gadget(name="sprocket"))
        return {"session": type(db.session).__module__}

    @app.get("/gadgets")
    async def list_gadgets() -> list[str]:
        return list((await db.session.exec(sqlmodel_select(Gadget.name))).all())

    async with serve(app) as client:
        created = await client.post("/gadgets")
        listed = await client.get("/gadgets")
        assert db.engine.pool.checkedout() == 0

    assert created.json() == {"session": SQLModelAsyncSession.__module__}
    assert listed.json() == ["sprocket"]


@pytest.mark.parametrize("given_to", ["middleware", "block"])
async def test_session_class_overrides_the_sqlmodel_default(
    database: Database, given_to: str
) -> None:
    """`session_args={"class_": AsyncSession}` gives plain SQLAlchemy sessions instead."""
    override = {"class_": AsyncSession}
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        app=unused_app,
        db_url=database.url,
        session_args=override if given_to == "middleware" else None,
    )
    try:
        async with db(session_args=override if given_to == "block" else None, commit_on_exit=True):
            assert type(db.session) is AsyncSession
            assert not hasattr(db.session, "exec")
            await db.session.execute(new_item("plain"))
    finally:
        await middleware.dispose()
    assert await database.names() == ["plain"]
