"""Retrying a unit of work: `is_retryable()` and `db.run_in_transaction()`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import DATABASES, Database, bound, items, new_item, only_on
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from fastapi_async_sqlalchemy import (
    DBSessionMeta,
    InvalidConfigurationError,
    TransactionStateError,
    is_retryable,
)

pytestmark = pytest.mark.anyio


class SerializationFailure(Exception):
    """An error carrying PostgreSQL's serialization_failure code, as drivers report it."""

    sqlstate = "40001"


@pytest.fixture
async def db(database: Database) -> AsyncIterator[DBSessionMeta]:
    async with bound(database.url) as proxy:
        yield proxy


@pytest.fixture(params=["asyncpg", "psycopg"])
def postgresql_url(request: pytest.FixtureRequest, database: Database) -> str:
    """The test PostgreSQL through each of its async drivers."""
    return database.url.replace("+asyncpg", f"+{request.param}")


async def add_two_rows(database: Database) -> None:
    async with database.check.begin() as connection:
        await connection.execute(items.insert().values(id=1, name="a"))
        await connection.execute(items.insert().values(id=2, name="b"))


# -- real serialization failures and deadlocks, retried --------------------------------------------


@only_on("postgresql")
async def test_write_skew_under_serializable_is_retried_until_it_succeeds(
    database: Database, postgresql_url: str
) -> None:
    """Two SERIALIZABLE transactions that each read what the other writes: PostgreSQL fails one
    with 40001 (asyncpg and psycopg alike), and run_in_transaction runs it again."""
    both_read = asyncio.Barrier(2)
    attempts: list[str] = []

    async with bound(postgresql_url, isolation_level="SERIALIZABLE") as db:

        async def add_if_few(name: str) -> None:
            attempts.append(name)
            seen = (await db.session.execute(select(func.count()).select_from(items))).scalar()
            if len(attempts) <= 2:
                await both_read.wait()  # both have read before either writes
            await db.session.execute(new_item(f"{name}-after-{seen}"))

        async with asyncio.timeout(20):
            await asyncio.gather(
                db.run_in_transaction(add_if_few, "first"),
                db.run_in_transaction(add_if_few, "second"),
            )
    names = await database.names()
    assert len(attempts) == 3  # one of the two ran again
    assert sorted(name.split("-")[0] for name in names) == ["first", "second"]
    assert any(name.endswith("-after-1") for name in names)  # the retry saw the other's row


@pytest.mark.parametrize(
    ("database_url", "driver"),
    [
        (name, driver)
        for name, driver in [("postgresql", "asyncpg"), ("postgresql", "psycopg"), ("mariadb", "")]
        if name in DATABASES
    ],
    indirect=["database_url"],
)
async def test_deadlock_is_retried_until_both_succeed(database: Database, driver: str) -> None:
    """Two transactions updating two rows in opposite order deadlock (PostgreSQL 40P01 with
    asyncpg and psycopg, MariaDB 1213); the one the database rolled back is run again and both
    end committed. (SQLite has one writer at a time: no deadlock.)"""
    url = database.url.replace("+asyncpg", f"+{driver}") if driver else database.url
    await add_two_rows(database)
    holds_first = asyncio.Barrier(2)
    attempts: list[str] = []

    async with bound(url) as db:

        async def update(first: int, second: int, name: str) -> None:
            attempts.append(name)
            for row in (first, second):
                await db.session.execute(
                    items.update().where(items.c.id == row).values(name=f"{name}{row}")
                )
                if row == first and len(attempts) <= 2:
                    await holds_first.wait()  # each holds its first row before the second

        async with asyncio.timeout(30):
            await asyncio.gather(
                db.run_in_transaction(update, 1, 2, "x"),
                db.run_in_transaction(update, 2, 1, "y"),
            )
    assert len(attempts) == 3
    names = await database.names()
    assert names in (["x1", "x2"], ["y1", "y2"])  # the one that ran last wrote both rows


@only_on("sqlite")
async def test_sqlite_writer_kept_out_by_another_is_retried(database: Database) -> None:
    """On SQLite, "database is locked" (another connection holds the write lock) is retried."""
    release = asyncio.Event()
    attempts: list[int] = []

    async def hold_the_write_lock() -> None:
        async with database.check.connect() as connection:
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
            holding.set()
            await release.wait()
            await connection.exec_driver_sql("ROLLBACK")

    holding = asyncio.Event()
    async with bound(database.url, connect_args={"timeout": 0.05}) as db:

        async def write() -> None:
            attempts.append(len(attempts) + 1)
            if len(attempts) == 2:
                release.set()
                await holder
            await db.session.execute(new_item("written"))

        holder = asyncio.create_task(hold_the_write_lock())
        await holding.wait()
        async with asyncio.timeout(20):
            await db.run_in_transaction(write, backoff=0.01)
    assert attempts == [1, 2]
    assert await database.names() == ["written"]


async def test_real_errors_are_told_apart_by_code(database: Database, db: DBSessionMeta) -> None:
    """A unique violation is not retryable on any database; neither is a plain Python error."""
    await database.insert("taken")
    with pytest.raises(IntegrityError) as duplicate:
        async with db(commit_on_exit=True):
            await db.session.execute(items.insert().values(id=10**8, name="taken"))
    assert not is_retryable(duplicate.value)
    assert not is_retryable(ValueError("no"))
    assert is_retryable(SerializationFailure())


# -- the rules of run_in_transaction -------------------------------------------------------------


async def test_attempts_run_out_with_the_last_error_and_a_note(
    database: Database, db: DBSessionMeta
) -> None:
    """After `attempts` retryable failures the last error propagates, with a note saying how
    many attempts were made; nothing any attempt wrote is committed, no callback ran."""
    calls: list[int] = []
    ran: list[str] = []

    async def always_conflicts() -> None:
        calls.append(len(calls))
        db.on_commit(lambda: ran.append("callback"))
        await db.session.execute(new_item(f"attempt-{len(calls)}"))
        raise SerializationFailure(f"attempt {len(calls)}")

    with pytest.raises(SerializationFailure, match="attempt 3") as raised:
        await db.run_in_transaction(always_conflicts, attempts=3, backoff=0.001)
    assert len(calls) == 3
    assert any("3 attempt(s)" in note for note in raised.value.__notes__)
    assert await database.names() == []
    assert ran == []


async def test_deadline_bounds_the_total_time(db: DBSessionMeta) -> None:
    """No wait reaches past `deadline` seconds from the call, so the run ends about then (the
    last attempt, begun before the deadline, runs to its end)."""
    calls: list[float] = []

    async def always_conflicts() -> None:
        calls.append(time.monotonic())
        raise SerializationFailure

    started = time.monotonic()
    with pytest.raises(SerializationFailure) as raised:
        await db.run_in_transaction(
            always_conflicts, attempts=1000, backoff=0.05, max_backoff=0.1, deadline=0.4
        )
    assert time.monotonic() - started < 0.4 + 0.2
    assert 1 < len(calls) < 1000
    assert any("deadline" in note for note in raised.value.__notes__)


async def test_only_the_successful_attempts_callbacks_run_once(
    database: Database, db: DBSessionMeta
) -> None:
    """on_commit callbacks of failed attempts never run; the successful one's run once, and the
    work's result and keyword arguments come through."""
    ran: list[int] = []

    async def work(name: str, *, fail_times: int) -> str:
        attempt = len(ran_attempts) + 1
        ran_attempts.append(attempt)
        db.on_commit(lambda: ran.append(attempt))
        await db.session.execute(new_item(f"{name}-{attempt}"))
        if attempt <= fail_times:
            raise SerializationFailure
        return name

    ran_attempts: list[int] = []
    result = await db.run_in_transaction(work, "row", fail_times=2, backoff=0.001)
    assert result == "row"
    assert ran == [3]
    assert await database.names() == ["row-3"]


async def test_refused_inside_an_open_transaction(db: DBSessionMeta) -> None:
    """Where this proxy's session already has an open transaction, run_in_transaction raises
    TransactionStateError (a RuntimeError) before running anything; other errors are not
    retried."""
    calls: list[str] = []

    async def work() -> None:
        calls.append("ran")

    async with db():
        await db.session.execute(text("SELECT 1"))
        with pytest.raises(TransactionStateError, match="open transaction") as refused:
            await db.run_in_transaction(work)
    assert isinstance(refused.value, RuntimeError)
    assert calls == []

    async def not_retryable() -> None:
        calls.append("once")
        raise ValueError("a bug, not a conflict")

    with pytest.raises(ValueError, match="a bug"):
        await db.run_in_transaction(not_retryable)
    assert calls == ["once"]


@pytest.mark.parametrize(
    "arguments",
    [
        {"attempts": 0},
        {"attempts": None},
        {"attempts": 1.5},
        {"backoff": -1},
        {"max_backoff": float("nan")},
        {"deadline": 0},
    ],
)
async def test_bad_retry_arguments_are_refused(
    db: DBSessionMeta, arguments: dict[str, Any]
) -> None:
    """Bad attempts, backoff, max_backoff or deadline values are refused, naming the argument."""

    async def work() -> None:
        raise AssertionError("must not run")

    [name] = arguments
    with pytest.raises(InvalidConfigurationError, match=name):
        await db.run_in_transaction(work, **arguments)


async def test_error_raised_while_handling_a_conflict_is_not_retried(db: DBSessionMeta) -> None:
    """An error the work raises while handling a conflict (say an HTTP error) is not itself a
    conflict: it propagates at once, not after every attempt."""
    calls: list[int] = []

    async def work() -> None:
        calls.append(1)
        try:
            raise SerializationFailure
        except SerializationFailure:
            raise PermissionError("answer 409") from None

    with pytest.raises(PermissionError):
        await db.run_in_transaction(work)
    assert calls == [1]

    async def chained() -> None:
        try:
            raise SerializationFailure
        except SerializationFailure:
            raise LookupError("conflict") from SerializationFailure()

    assert not is_retryable(PermissionError("plain"))
    with pytest.raises(LookupError) as raised:
        await chained()
    assert is_retryable(raised.value)  # an explicit cause is followed


async def test_run_in_transaction_works_in_a_block_with_a_pool_timeout(
    database: Database, db: DBSessionMeta
) -> None:
    """A pool_timeout block (or throttled child) holds a connection in an empty transaction:
    that is not an open transaction run_in_transaction must refuse."""

    async def add(name: str) -> str:
        await db.session.execute(new_item(name))
        return name

    async with db(pool_timeout=5):
        assert await db.run_in_transaction(add, "in a plain block") == "in a plain block"
    async with db(multi_sessions=True, pool_timeout=5):
        results = await db.gather(db.run_in_transaction(add, "child"))
    assert results == ["child"]
    assert await database.names() == ["child", "in a plain block"]
