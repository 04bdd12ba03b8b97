"""`statement_timeout`: the database stops a statement that runs too long; nothing lingers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import Database, bound, make_app, new_item, only_on, serve
from sqlalchemy import event, text

import fastapi_async_sqlalchemy._deadlines
from fastapi_async_sqlalchemy import (
    DBSessionMeta,
    InvalidConfigurationError,
    StatementTimeoutError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio

# A statement that runs for one to two seconds on each database.
LONG = {
    "postgresql": "SELECT pg_sleep(2)",
    "mariadb": "SELECT SLEEP(2)",
    "sqlite": (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5000000) "
        "SELECT count(*) FROM c"
    ),
}
# What the connection's own limit reads when nothing of ours is left on it.
LIMIT_LEFT = {
    "postgresql": "SHOW statement_timeout",
    "mariadb": "SELECT @@max_statement_time",
}


@pytest.fixture
async def db(database: Database) -> AsyncIterator[DBSessionMeta]:
    """A proxy whose pool holds one connection, so every block reuses the same one."""
    async with bound(database.url, pool_size=1, max_overflow=0) as proxy:
        yield proxy


async def test_long_statement_is_stopped_and_the_connection_comes_back_clean(
    database: Database, db: DBSessionMeta
) -> None:
    """A statement past the block's statement_timeout raises StatementTimeoutError (a
    TimeoutError) soon after the limit; the pooled connection serves the next block, which has
    no limit left over."""
    started = time.monotonic()
    with pytest.raises(StatementTimeoutError) as raised:
        async with db(statement_timeout=0.3):
            await db.session.execute(text(LONG[database.name]))
    took = time.monotonic() - started
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.timeout == 0.3
    assert took < 1.5
    async with db():
        if database.name in LIMIT_LEFT:
            left = (await db.session.execute(text(LIMIT_LEFT[database.name]))).scalar()
            assert str(left) in ("0", "0.0")
        started = time.monotonic()
        await db.session.execute(text(LONG[database.name]))  # runs to its end: no deadline
        assert time.monotonic() - started > 0.5
    assert db.pool_status()["checked_out"] in (0, None)


async def test_statements_within_the_limit_run_as_usual(
    database: Database, db: DBSessionMeta
) -> None:
    """Short statements under a statement_timeout run and commit normally."""
    async with db(statement_timeout=5, commit_on_exit=True):
        await db.session.execute(new_item("quick"))
        assert (await db.session.execute(text("SELECT 1"))).scalar() == 1
    assert await database.names() == ["quick"]


@only_on("mariadb")
async def test_mariadb_transaction_survives_a_stopped_statement(
    database: Database, db: DBSessionMeta
) -> None:
    """On MariaDB only the statement is stopped: the transaction goes on and commits."""
    async with db(statement_timeout=0.3, commit_on_exit=True):
        await db.session.execute(new_item("before"))
        with pytest.raises(StatementTimeoutError):
            await db.session.execute(text(LONG["mariadb"]))
        await db.session.execute(new_item("after"))
    assert await database.names() == ["after", "before"]


@only_on("postgresql")
async def test_postgresql_pays_one_set_local_per_transaction(db: DBSessionMeta) -> None:
    """PostgreSQL gets one transaction-local SET per transaction, and nothing at session level;
    a block without a limit sends none."""
    sent: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    for _ in range(3):
        async with db(statement_timeout=2):
            await db.session.execute(text("SELECT 1"))
            await db.session.execute(text("SELECT 2"))
    async with db():
        await db.session.execute(text("SELECT 3"))
    limits = [statement for statement in sent if "statement_timeout" in statement]
    assert limits == ["SET LOCAL statement_timeout = 2000"] * 3
    assert not any(statement.upper().startswith("SET SESSION") for statement in sent)


# -- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["route", "gathered child"])
async def test_request_stopped_by_the_limit_is_answered_503(database: Database, where: str) -> None:
    """A request whose statement the middleware's statement_timeout stopped gets a 503 with
    Retry-After instead of a bare 500, and commits nothing; multi-session children inherit the
    request's limit."""
    app, db = make_app(database, commit_on_exit=True, statement_timeout=0.3)

    async def slow() -> None:
        await db.session.execute(new_item("lost"))
        await db.session.execute(text(LONG[database.name]))

    @app.post("/slow")
    async def route() -> dict[str, str]:
        if where == "route":
            await slow()
        else:
            async with db(multi_sessions=True, commit_on_exit=True):
                await db.gather(slow())
        return {"done": "yes"}

    async with serve(app) as client:
        started = time.monotonic()
        response = await client.post("/slow")
        took = time.monotonic() - started
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "took too long" in response.json()["detail"]
    assert took < 1.5
    assert await database.names() == []


# -- cost and arguments ------------------------------------------------------------------------


async def test_no_listener_on_an_engine_without_a_limit(database: Database) -> None:
    """A middleware without statement_timeout installs nothing on its engine; one with it
    installs its listeners once."""
    handle_error = fastapi_async_sqlalchemy._deadlines._handle_error
    Without, _ = create_middleware_and_session_proxy()
    With, _ = create_middleware_and_session_proxy()
    without = Without(None, db_url=database.url)
    with_limit = With(None, db_url=database.url, statement_timeout=1)
    try:
        assert not event.contains(without.engine.sync_engine, "handle_error", handle_error)
        assert event.contains(with_limit.engine.sync_engine, "handle_error", handle_error)
    finally:
        await without.dispose()
        await with_limit.dispose()


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "1", True])
async def test_bad_statement_timeout_is_refused(database: Database, value: Any) -> None:
    """statement_timeout must be a finite number of seconds above zero, on the middleware and
    on db(...)."""
    Middleware, db = create_middleware_and_session_proxy()
    with pytest.raises(InvalidConfigurationError, match="statement_timeout"):
        Middleware(None, db_url=database.url, statement_timeout=value)
    with pytest.raises(InvalidConfigurationError, match="statement_timeout"):
        db(statement_timeout=value)
