"""Concurrency inside one scope: a session per task, slots, connection deadlines, block exit."""

from __future__ import annotations

import asyncio
import gc
import inspect
import math
import weakref
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from conftest import (
    Database,
    Row,
    bound,
    items,
    new_item,
    serve,
    while_the_pool_is_held,
)
from fastapi import FastAPI
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.pool import NullPool, QueuePool

from fastapi_async_sqlalchemy import (
    ConcurrencyError,
    CoroutineRequiredError,
    DBSessionMeta,
    InvalidConfigurationError,
    PoolTimeoutError,
    create_middleware_and_session_proxy,
)

pytestmark = pytest.mark.anyio

POOL_STATUS_KEYS = {
    "pool_class",
    "size",
    "max_overflow",
    "capacity",
    "checked_in",
    "checked_out",
    "available",
    "saturation",
}


class Boom(Exception):
    """The error a child or a block raises on purpose."""


@pytest.fixture
async def db(database: Database) -> AsyncIterator[DBSessionMeta]:
    """A proxy bound to the test database with the engine's default pool."""
    async with bound(database.url) as proxy:
        yield proxy


@pytest.fixture
async def memory_db() -> AsyncIterator[DBSessionMeta]:
    """A proxy bound to an in-memory SQLite database, for behaviour that needs no rows."""
    async with bound("sqlite+aiosqlite://") as proxy:
        yield proxy


def checked_out(db: DBSessionMeta) -> int:
    """How many connections of the proxy's pool are checked out right now."""
    return db.engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]


async def count_visible(db: DBSessionMeta) -> int:
    """The number of rows of ``items`` the current task's session can see."""
    return (await db.session.execute(select(func.count()).select_from(items))).scalar_one()


def assert_closed_for_good(*coroutines: Coroutine[Any, Any, Any]) -> None:
    """Each coroutine was closed: none can ever emit a "never awaited" RuntimeWarning.

    ``gc.collect()`` finalizes any dropped coroutine now, inside this test, where a warning is an
    error; a coroutine that was closed (or ran to its end) is ``CORO_CLOSED``.
    """
    gc.collect()
    for coroutine in coroutines:
        assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED


async def noop() -> None:
    """A coroutine that does nothing, to wrap in tasks."""


# -- one session per task ------------------------------------------------------------------


async def test_plain_scope_shares_one_session_across_its_tasks(db: DBSessionMeta) -> None:
    """Every task spawned inside a plain `async with db():` block sees the block's one session."""

    async def session_seen() -> Any:
        return db.session

    async with db():
        first, second = await asyncio.gather(
            asyncio.create_task(session_seen()), asyncio.create_task(session_seen())
        )
        assert first is second
        assert first is db.session


async def test_multi_sessions_gives_each_task_its_own_session(db: DBSessionMeta) -> None:
    """With multi_sessions=True each task touching db.session gets a session of its own."""

    async def session_seen() -> Any:
        session = db.session
        assert db.session is session  # stable within the task
        return session

    async with db(multi_sessions=True):
        owner = db.session
        first, second = await asyncio.gather(
            asyncio.create_task(session_seen()), asyncio.create_task(session_seen())
        )
        assert first is not second
        assert owner is not first
        assert owner is not second
        assert db.session is owner
    assert checked_out(db) == 0


async def test_block_keeps_no_task_or_session_alive_once_it_ends(db: DBSessionMeta) -> None:
    """After the block, nothing of its tasks or sessions stays referenced: no growth per block."""
    seen: list[weakref.ref[Any]] = []

    async def child() -> None:
        seen.append(weakref.ref(asyncio.current_task()))
        seen.append(weakref.ref(db.session))
        await count_visible(db)

    async with db(multi_sessions=True, max_concurrent=2):
        await db.gather(child(), child())
    async with db(multi_sessions=True):
        await asyncio.gather(asyncio.create_task(child()), asyncio.create_task(child()))
    gc.collect()
    assert len(seen) == 8
    assert [ref for ref in seen if ref() is not None] == []
    assert checked_out(db) == 0


async def test_tasks_query_concurrently_in_multi_mode(db: DBSessionMeta) -> None:
    """Tasks that each run a query at the same time all succeed, each on its own connection."""
    both_queried = asyncio.Barrier(2)
    held_together: list[int] = []

    async def query() -> int:
        visible = await count_visible(db)
        await both_queried.wait()  # both sessions now hold a connection at once
        held_together.append(db.pool_status()["checked_out"])
        return visible

    async with asyncio.timeout(10), db(multi_sessions=True):
        visible = await asyncio.gather(query(), query())
    assert list(visible) == [0, 0]
    assert held_together == [2, 2]
    assert checked_out(db) == 0


# -- awaited work is committed ---------------------------------------------------------------


@pytest.mark.parametrize("commit_on_exit", [True, False])
async def test_gathered_work_is_committed_when_gather_returns(
    database: Database, db: DBSessionMeta, commit_on_exit: bool
) -> None:
    """Once db.gather returns, its children's writes are committed (or rolled back) and visible."""

    async def write(name: str) -> str:
        await db.session.execute(new_item(name))
        return name

    async with db(multi_sessions=True, commit_on_exit=commit_on_exit):
        assert await db.gather(write("first"), write("second")) == ["first", "second"]
        expected = ["first", "second"] if commit_on_exit else []
        assert await database.names() == expected  # from another connection
        assert await count_visible(db) == len(expected)  # the block's next statement
        assert checked_out(db) == 1  # only the block's own session holds a connection
    assert await database.names() == expected
    assert checked_out(db) == 0


@pytest.mark.parametrize("commit_on_exit", [True, False])
async def test_work_in_a_connection_block_is_committed_when_it_ends(
    database: Database, db: DBSessionMeta, commit_on_exit: bool
) -> None:
    """Leaving `async with db.connection()` in a multi block commits (or rolls back) its work."""
    async with db(multi_sessions=True, commit_on_exit=commit_on_exit):
        async with db.connection() as session:
            await session.execute(new_item("in-connection"))
        assert await database.names() == (["in-connection"] if commit_on_exit else [])
        assert checked_out(db) == 0
    assert await database.names() == (["in-connection"] if commit_on_exit else [])


# -- failing children ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("return_exceptions", "max_concurrent"),
    # With a single slot the sibling is finished and committed before the failing child starts,
    # so gather raising early leaves nothing running.
    [(True, None), (True, 1), (False, 1)],
)
async def test_failing_child_rolls_back_only_its_own_session(
    database: Database,
    db: DBSessionMeta,
    return_exceptions: bool,
    max_concurrent: int | None,
) -> None:
    """A child that raises loses its writes, its siblings keep theirs, and gather reports it."""
    sibling_wrote = asyncio.Event()

    async def succeed() -> str:
        await db.session.execute(new_item("kept"))
        sibling_wrote.set()
        return "kept"

    async def fail() -> str:
        await sibling_wrote.wait()
        await db.session.execute(new_item("dropped"))
        raise Boom("child failed")

    async with (
        asyncio.timeout(10),
        db(multi_sessions=True, commit_on_exit=True, max_concurrent=max_concurrent),
    ):
        if return_exceptions:
            kept, error = await db.gather(succeed(), fail(), return_exceptions=True)
            assert kept == "kept"
            assert isinstance(error, Boom)
        else:
            with pytest.raises(Boom, match="child failed"):
                await db.gather(succeed(), fail())
        assert await database.names() == ["kept"]
    assert await database.names() == ["kept"]
    assert checked_out(db) == 0


async def test_sibling_finishing_when_gather_raises_is_finalized_before_block_exit(
    database: Database, db: DBSessionMeta
) -> None:
    """When gather raises early, a sibling still finalizing is done before the block is left."""
    sibling_wrote = asyncio.Event()
    children: set[asyncio.Task[Any]] = set()

    async def succeed() -> None:
        children.add(asyncio.current_task())  # type: ignore[arg-type]
        await db.session.execute(new_item("sibling"))
        sibling_wrote.set()
        # Returns now: its session is committed and closed in its task, after gather raised.

    async def fail() -> None:
        await sibling_wrote.wait()
        raise Boom("child failed")

    async def block() -> None:
        async with db(multi_sessions=True, commit_on_exit=True):
            await db.gather(succeed(), fail())

    async with asyncio.timeout(10):
        with pytest.raises(Boom):
            await block()
        left_checked_out = db.pool_status()["checked_out"]
        left_running = [task for task in children if not task.done()]
        await asyncio.wait(children)  # so a failure here leaks nothing into later tests
    assert left_running == []
    assert left_checked_out == 0


async def test_sibling_left_running_when_gather_raises_is_cancelled_at_block_exit(
    database: Database, db: DBSessionMeta
) -> None:
    """A sibling still running when gather raised is cancelled and rolled back, with a note."""
    sibling_wrote = asyncio.Event()
    never = asyncio.Event()

    async def linger() -> None:
        await db.session.execute(new_item("cut-off"))
        sibling_wrote.set()
        await never.wait()

    async def fail() -> None:
        await sibling_wrote.wait()
        raise Boom("child failed")

    with pytest.raises(Boom) as caught:
        async with asyncio.timeout(10), db(multi_sessions=True, commit_on_exit=True):
            await db.gather(linger(), fail())
    assert any("cancelled" in note for note in getattr(caught.value, "__notes__", []))
    assert await database.names() == []
    assert checked_out(db) == 0


@pytest.mark.parametrize("task_raises", [False, True])
async def test_task_that_raised_is_not_committed_at_block_exit(
    database: Database, db: DBSessionMeta, task_raises: bool
) -> None:
    """A task that took db.session directly is committed at block exit only if it did not raise."""

    async def write() -> None:
        await db.session.execute(new_item("written"))
        if task_raises:
            raise Boom("task failed")

    async with db(multi_sessions=True, commit_on_exit=True):
        outcome = await asyncio.gather(asyncio.create_task(write()), return_exceptions=True)
        assert isinstance(outcome[0], Boom) == task_raises
    assert await database.names() == ([] if task_raises else ["written"])
    assert checked_out(db) == 0


# -- max_concurrent --------------------------------------------------------------------------


@pytest.mark.parametrize("max_concurrent", [1, 2, 3])
async def test_max_concurrent_caps_the_children_holding_connections(
    database: Database, max_concurrent: int
) -> None:
    """No more than max_concurrent gathered children hold a connection at the same time."""
    active = 0
    peak = 0
    full = asyncio.Event()
    release = asyncio.Event()

    async with bound(database.url, pool_size=5, max_overflow=0) as db:

        async def child(number: int) -> None:
            nonlocal active, peak
            await db.session.execute(text("SELECT 1"))  # the session holds its connection now
            active += 1
            peak = max(peak, active)
            assert db.pool_status()["checked_out"] <= max_concurrent
            if active == max_concurrent:
                full.set()
            await release.wait()
            await db.session.execute(new_item(f"child-{number}"))
            active -= 1

        async with (
            asyncio.timeout(10),
            db(multi_sessions=True, commit_on_exit=True, max_concurrent=max_concurrent),
        ):
            gathering = asyncio.create_task(db.gather(*(child(n) for n in range(8))))
            await full.wait()
            # The first wave holds every slot; the rest wait for one without a connection.
            assert active == max_concurrent
            assert db.pool_status()["checked_out"] == max_concurrent
            release.set()
            await gathering
        assert peak == max_concurrent
        assert len(await database.names()) == 8
        assert checked_out(db) == 0


async def test_many_children_share_a_small_pool_without_timing_out(database: Database) -> None:
    """Fifty children with max_concurrent=2 on a pool of two all finish and commit."""
    async with bound(database.url, pool_size=2, max_overflow=0, pool_timeout=2) as db:
        seen: list[int] = []

        async def child(number: int) -> int:
            await db.session.execute(new_item(f"child-{number:02}"))
            seen.append(db.pool_status()["checked_out"])
            return number

        async with (
            asyncio.timeout(30),
            db(multi_sessions=True, commit_on_exit=True, max_concurrent=2),
        ):
            assert await db.gather(*(child(n) for n in range(50))) == list(range(50))
        assert max(seen) <= 2
        assert await database.names() == [f"child-{n:02}" for n in range(50)]
        assert db.pool_status()["checked_out"] == 0


# -- throttled db.gather takes coroutines only -----------------------------------------------


@pytest.mark.parametrize("throttle", [{"max_concurrent": 2}, {"pool_timeout": 5}])
@pytest.mark.parametrize("kind", ["Task", "Future", "int"])
async def test_throttled_gather_refuses_non_coroutines_and_closes_the_rest(
    db: DBSessionMeta, throttle: dict[str, Any], kind: str
) -> None:
    """A Task, a Future or a plain value is refused (a TypeError); given coroutines are closed."""
    before = noop()
    after = noop()
    task = asyncio.create_task(noop())
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    refused: Any = {"Task": task, "Future": future, "int": 42}[kind]

    async with db(multi_sessions=True, **throttle):
        with pytest.raises(CoroutineRequiredError, match="coroutines") as caught:
            await db.gather(before, refused, after)
    assert isinstance(caught.value, TypeError)
    assert kind in str(caught.value)
    await task
    future.cancel()
    assert_closed_for_good(before, after)
    assert checked_out(db) == 0


async def test_gather_refuses_a_non_awaitable_before_any_child_starts(db: DBSessionMeta) -> None:
    """An argument that cannot be awaited is refused before anything runs; the rest is closed."""
    started: list[str] = []

    async def work() -> None:
        started.append("work")

    before, after = work(), work()
    async with db(multi_sessions=True):
        with pytest.raises(TypeError, match="takes awaitables, not int"):
            await db.gather(before, 42, after)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # a child started by mistake would run now
    assert started == []
    assert_closed_for_good(before, after)


@pytest.mark.parametrize("throttle", [{"max_concurrent": 2}, {"pool_timeout": 5}])
async def test_unslotted_task_is_refused_db_session_when_throttled(
    database: Database, db: DBSessionMeta, throttle: dict[str, Any]
) -> None:
    """A task outside db.connection()/db.gather() gets ConcurrencyError; so does the block's
    owner when a pool_timeout is set (a property cannot wait within a deadline)."""

    async def unslotted() -> None:
        db.session  # noqa: B018 - the read itself is what must fail

    async def slotted() -> None:
        async with db.connection() as session:
            await session.execute(new_item("slotted"))

    async with db(multi_sessions=True, commit_on_exit=True, **throttle):
        with pytest.raises(ConcurrencyError, match=r"db\.connection\(\)"):
            await asyncio.create_task(unslotted())
        await asyncio.create_task(slotted())
        if "pool_timeout" in throttle:
            with pytest.raises(ConcurrencyError, match=r"db\.connection\(\)") as refused:
                db.session  # noqa: B018
            assert isinstance(refused.value, RuntimeError)
            async with db.connection() as session:
                await session.execute(new_item("owner"))
        else:
            await db.session.execute(new_item("owner"))
    assert await database.names() == ["owner", "slotted"]
    assert checked_out(db) == 0


# -- held slots must not deadlock --------------------------------------------------------------


@pytest.mark.parametrize("held_by", ["connection block", "gathered child"])
async def test_gather_from_inside_a_held_slot_is_refused_without_deadlock(
    db: DBSessionMeta, held_by: str
) -> None:
    """db.gather while holding a max_concurrent slot raises ConcurrencyError and closes its work."""
    inner = noop()

    async def gather_inside() -> None:
        await db.gather(inner)

    async def hold_a_slot_and_gather() -> None:
        if held_by == "connection block":
            async with db.connection():
                await gather_inside()
        else:
            await db.gather(gather_inside())

    async with asyncio.timeout(5), db(multi_sessions=True, max_concurrent=1):
        with pytest.raises(ConcurrencyError, match="slot"):
            await hold_a_slot_and_gather()
    assert_closed_for_good(inner)
    assert checked_out(db) == 0


@pytest.mark.parametrize("held_by", ["connection block", "gathered child"])
async def test_nested_connection_in_a_held_slot_lends_the_same_session(
    database: Database, db: DBSessionMeta, held_by: str
) -> None:
    """db.connection() inside a held slot lends that slot's session and leaves it open."""
    lent: list[tuple[Any, Any]] = []

    async def nested() -> None:
        holder = db.session  # the session of the slot this task holds
        async with db.connection() as inner:
            lent.append((holder, inner))
            await inner.execute(new_item("inner"))
        await holder.execute(new_item("after-inner"))  # still open after the inner block

    async with (
        asyncio.timeout(5),
        db(multi_sessions=True, commit_on_exit=True, max_concurrent=1),
    ):
        if held_by == "connection block":
            async with db.connection() as outer:
                await nested()
            assert lent[0][0] is outer
        else:
            await db.gather(nested())
    [(holder, inner)] = lent
    assert inner is holder
    assert await database.names() == ["after-inner", "inner"]
    assert checked_out(db) == 0


# -- connection deadlines ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "block_options", "engine_args"),
    [
        ("slot", {"max_concurrent": 1}, {"pool_size": 3, "max_overflow": 0}),
        ("connection", {}, {"pool_size": 1, "max_overflow": 0}),
    ],
)
async def test_connection_timeout_raises_pool_timeout_error(
    database: Database,
    held: str,
    block_options: dict[str, Any],
    engine_args: dict[str, Any],
) -> None:
    """db.connection(timeout=...) raises PoolTimeoutError while the only slot/connection is held."""
    holding = asyncio.Event()
    release = asyncio.Event()

    async with bound(database.url, **engine_args) as db:

        async def hold() -> None:
            if held == "slot":
                async with db.connection() as session:
                    await session.execute(text("SELECT 1"))
                    holding.set()
                    await release.wait()
            else:
                async with db.engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
                    holding.set()
                    await release.wait()

        async with asyncio.timeout(10), db(multi_sessions=True, **block_options):
            holder = asyncio.create_task(hold())
            await holding.wait()
            with pytest.raises(PoolTimeoutError) as caught:
                async with db.connection(timeout=0.2):
                    pytest.fail("the block must not run without a connection")
            release.set()
            await holder
        error = caught.value
        assert isinstance(error, TimeoutError)
        assert error.timeout == 0.2
        assert isinstance(error.pool_status, dict)
        assert set(error.pool_status) == POOL_STATUS_KEYS
        assert error.pool_status["checked_out"] == 1
        assert db.pool_status()["checked_out"] == 0


async def test_block_pool_timeout_bounds_each_gathered_child(database: Database) -> None:
    """A multi block's pool_timeout makes a child that cannot get a connection raise, unstarted."""
    async with bound(database.url, pool_size=1, max_overflow=0) as db:
        work = noop()
        async with asyncio.timeout(10), db.engine.connect() as outside:
            await outside.execute(text("SELECT 1"))
            async with db(multi_sessions=True, pool_timeout=0.2):
                with pytest.raises(PoolTimeoutError) as caught:
                    await db.gather(work)
        assert caught.value.timeout == 0.2
        assert_closed_for_good(work)
        assert db.pool_status()["checked_out"] == 0


async def test_plain_block_with_pool_timeout_checks_out_on_entry(database: Database) -> None:
    """`db(pool_timeout=...)` gets its connection on entry and raises when the pool is exhausted."""
    async with bound(database.url, pool_size=1, max_overflow=0) as db:
        entered = False
        async with asyncio.timeout(10), db.engine.connect() as outside:
            await outside.execute(text("SELECT 1"))
            with pytest.raises(PoolTimeoutError) as caught:
                async with db(pool_timeout=0.2):
                    entered = True
        assert not entered
        assert caught.value.timeout == 0.2
        assert caught.value.pool_status is not None
        assert caught.value.pool_status["checked_out"] == 1
        assert db.pool_status()["checked_out"] == 0

        async with db(pool_timeout=0.2, commit_on_exit=True):
            assert db.pool_status()["checked_out"] == 1  # checked out before first use
            await db.session.execute(new_item("in-time"))
        assert await database.names() == ["in-time"]
        assert db.pool_status()["checked_out"] == 0


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_concurrent", [0, -1, True, 1.5, "2"])
async def test_max_concurrent_must_be_a_positive_int(
    memory_db: DBSessionMeta, max_concurrent: Any
) -> None:
    """A max_concurrent that is not a whole number of at least one is refused up front."""
    with pytest.raises(InvalidConfigurationError, match="max_concurrent") as caught:
        memory_db(multi_sessions=True, max_concurrent=max_concurrent)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("multi_sessions", [True, False])
@pytest.mark.parametrize("pool_timeout", [0, -1, math.inf, math.nan, True])
async def test_pool_timeout_must_be_a_positive_finite_number(
    memory_db: DBSessionMeta, pool_timeout: Any, multi_sessions: bool
) -> None:
    """A pool_timeout that is not a finite number of seconds above zero is refused up front."""
    with pytest.raises(InvalidConfigurationError, match="pool_timeout") as caught:
        memory_db(multi_sessions=multi_sessions, pool_timeout=pool_timeout)
    assert isinstance(caught.value, ValueError)


async def test_max_concurrent_without_multi_sessions_has_no_effect(
    memory_db: DBSessionMeta,
) -> None:
    """max_concurrent without multi_sessions=True is accepted and ignored, as in 0.8.1."""

    async def session_seen() -> Any:
        return memory_db.session

    async with memory_db(max_concurrent=2):
        own = memory_db.session
        seen = await asyncio.gather(*(session_seen() for _ in range(3)))
        assert (await own.execute(text("SELECT 1"))).scalar_one() == 1
    assert seen == [own, own, own]


@pytest.mark.parametrize("multi_sessions", [True, False])
async def test_connection_timeout_must_be_positive(
    memory_db: DBSessionMeta, multi_sessions: bool
) -> None:
    """db.connection(timeout=0) is refused with InvalidConfigurationError."""
    async with memory_db(multi_sessions=multi_sessions):
        with pytest.raises(InvalidConfigurationError, match="timeout"):
            memory_db.connection(timeout=0)


# -- leaving the block -----------------------------------------------------------------------


@pytest.mark.parametrize("block_raises", [False, True])
async def test_task_still_running_at_block_exit_is_cancelled_and_reported(
    database: Database, db: DBSessionMeta, block_raises: bool
) -> None:
    """A task still using its session at block exit is cancelled, rolled back, and reported."""
    wrote = asyncio.Event()
    never = asyncio.Event()

    async def linger() -> None:
        await db.session.execute(new_item("cut-off"))
        wrote.set()
        await never.wait()

    async def block() -> None:
        async with db(multi_sessions=True, commit_on_exit=True):
            spawned.append(asyncio.create_task(linger()))
            await wrote.wait()
            if block_raises:
                raise Boom("block failed")
        raise AssertionError("the block must raise")

    spawned: list[asyncio.Task[None]] = []
    expected = Boom if block_raises else ConcurrencyError
    with pytest.raises(expected) as caught:
        await asyncio.wait_for(block(), 10)
    [lingering] = spawned
    if block_raises:
        assert any("cancelled" in note for note in caught.value.__notes__)
    else:
        assert "cancelled" in str(caught.value)
    assert lingering.cancelled()
    assert await database.names() == []
    assert checked_out(db) == 0


async def test_cut_off_task_leaves_the_work_of_finished_tasks_committed(
    database: Database, db: DBSessionMeta
) -> None:
    """A task that finished was committed when it finished; a task cut off at block exit is
    rolled back and reported."""
    queried = asyncio.Event()
    never = asyncio.Event()

    async def finish() -> None:
        await db.session.execute(new_item("finished"))

    async def linger() -> None:
        await count_visible(db)  # reads only: SQLite allows one open writing transaction
        queried.set()
        await never.wait()

    async def block() -> None:
        async with db(multi_sessions=True, commit_on_exit=True):
            await asyncio.create_task(finish())
            spawned.append(asyncio.create_task(linger()))
            await queried.wait()

    spawned: list[asyncio.Task[None]] = []
    with pytest.raises(ConcurrencyError, match="cancelled"):
        await asyncio.wait_for(block(), 10)
    [lingering] = spawned
    assert lingering.cancelled()
    assert await database.names() == ["finished"]
    assert checked_out(db) == 0


@pytest.mark.parametrize("children", ["db.gather", "tasks awaited", "tasks left running"])
async def test_cancelled_block_leaves_nothing_checked_out_or_committed(
    database: Database, db: DBSessionMeta, children: str
) -> None:
    """Cancelling a multi block while its children hold connections leaks and commits nothing."""
    holding: list[str] = []
    users: set[asyncio.Task[Any]] = set()  # the children that used the database
    all_holding = asyncio.Event()
    never = asyncio.Event()

    async def child(work: str) -> None:
        if work == "write":
            await db.session.execute(new_item("cancelled"))
        elif work == "read":
            await count_visible(db)  # SQLite allows one open writing transaction
        if work != "nothing":
            users.add(asyncio.current_task())  # type: ignore[arg-type]
        # The child without a session ends at once when cancelled, while the others roll back.
        holding.append(work)
        if len(holding) == 3:
            all_holding.set()
        await never.wait()

    async def block() -> None:
        options: dict[str, Any] = {"max_concurrent": 3} if children == "db.gather" else {}
        async with db(multi_sessions=True, commit_on_exit=True, **options):
            work = [child("write"), child("read"), child("nothing")]
            if children == "db.gather":
                await db.gather(*work)
            else:
                spawned = [asyncio.create_task(coroutine) for coroutine in work]
                if children == "tasks awaited":
                    await asyncio.gather(*spawned)
                else:
                    await never.wait()

    async with asyncio.timeout(10):
        running = asyncio.create_task(block())
        await all_holding.wait()
        assert checked_out(db) == 2
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        left_checked_out = checked_out(db)
        left_running = [task for task in users if not task.done()]
        never.set()  # ends a task that never used the database, which the block leaves alone
        await asyncio.wait(users)  # so a failure here leaks nothing into later tests
    assert left_running == []
    assert left_checked_out == 0
    assert await database.names() == []


@pytest.mark.parametrize("ending", ["commit", "rollback"])
async def test_cancel_during_a_gathered_childs_finalize_waits_for_it(
    database: Database, db: DBSessionMeta, ending: str
) -> None:
    """A cancellation that lands while a child commits or rolls back is delivered afterwards.

    The child's commit (or rollback) and the return of its connection finish first, even if a
    second cancellation lands meanwhile; then the block is cancelled all the same.
    """
    invalidated: list[object] = []
    block: asyncio.Task[None] | None = None
    cancels: list[str] = []
    read = asyncio.Event()

    def cancel_block(connection: object) -> None:
        if block is not None and not cancels:
            cancels.append("as it began")
            block.cancel()
            # A second cancellation, as from a server shutting down, while it runs.
            asyncio.get_running_loop().call_soon(lambda: cancels.append("again") or block.cancel())

    event.listen(db.engine.sync_engine, ending, cancel_block)
    event.listen(db.engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))

    async def finishing() -> None:
        await db.session.execute(new_item("finishing"))
        await read.wait()
        if ending == "rollback":
            raise Boom

    async def reading() -> None:
        await count_visible(db)  # SQLite allows one open writing transaction
        read.set()
        await asyncio.Event().wait()

    async def run() -> None:
        async with db(multi_sessions=True, commit_on_exit=True, max_concurrent=2):
            await db.gather(finishing(), reading())

    async with asyncio.timeout(10):
        block = asyncio.create_task(run())
        with pytest.raises(asyncio.CancelledError):
            await block

    assert cancels == ["as it began", "again"]
    assert invalidated == []
    assert checked_out(db) == 0
    assert await database.names() == (["finishing"] if ending == "commit" else [])


async def test_cancel_requested_before_a_childs_commit_waits_for_it(
    database: Database, db: DBSessionMeta
) -> None:
    """A child that cancels its caller on its way out ("got my answer") still commits whole.

    The cancellation is requested while the child runs, so it is pending when the commit starts;
    it must be delivered after the commit, not at the commit's first wait on the database.
    """
    invalidated: list[object] = []
    event.listen(db.engine.sync_engine, "invalidate", lambda *args: invalidated.append(args))

    async def winner() -> None:
        await db.session.execute(new_item("winner"))
        block.cancel()

    async def run() -> None:
        async with db(multi_sessions=True, commit_on_exit=True):
            await db.gather(winner())

    async with asyncio.timeout(10):
        block = asyncio.create_task(run())
        with pytest.raises(asyncio.CancelledError):
            await block

    assert invalidated == []
    assert checked_out(db) == 0
    assert await database.names() == ["winner"]


@pytest.mark.parametrize("return_exceptions", [True, False])
async def test_connection_wait_in_a_childs_commit_keeps_its_deadline(
    database: Database, return_exceptions: bool
) -> None:
    """A child whose commit must wait for a connection gets the pool's TimeoutError in time.

    The commit flushes a row added with ``session.add()``, so it checks out a connection while
    another holds the only one: without the pool's deadline it would wait as long as that one is
    held, and the deadline must not be mistaken for a cancellation of the child.
    """

    async def add_row() -> None:
        db.session.add(Row(1, "never"))

    async def block() -> list[Any]:
        async with db(multi_sessions=True, commit_on_exit=True):
            try:
                return await db.gather(add_row(), return_exceptions=return_exceptions)
            except SQLAlchemyTimeoutError as exc:
                return [exc]

    async with bound(database.url, pool_size=1, max_overflow=0, pool_timeout=0.2) as db:
        results = await while_the_pool_is_held(db.engine, block())
        assert [type(result) for result in results] == [SQLAlchemyTimeoutError]
        assert checked_out(db) == 0
    assert await database.names() == []


@pytest.mark.parametrize(("multi_commits", "nested_commits"), [(False, True), (True, False)])
async def test_nested_plain_block_in_a_child_owns_its_session(
    database: Database, db: DBSessionMeta, multi_commits: bool, nested_commits: bool
) -> None:
    """`async with db():` inside a multi block's child has its own session and commit_on_exit."""
    identities: list[bool] = []

    async def child() -> None:
        own = db.session
        async with db(commit_on_exit=nested_commits):
            identities.append(db.session is not own)
            await db.session.execute(new_item("nested"))
        identities.append(db.session is own)
        # Written after the nested block ended: SQLite allows one open writing transaction.
        await own.execute(new_item("outer"))

    async with asyncio.timeout(10), db(multi_sessions=True, commit_on_exit=multi_commits):
        await db.gather(child())
    assert identities == [True, True]
    expected = (["nested"] if nested_commits else []) + (["outer"] if multi_commits else [])
    assert await database.names() == sorted(expected)
    assert checked_out(db) == 0


# -- pool status -----------------------------------------------------------------------------


async def test_pool_status_reports_queue_pool_use(database: Database) -> None:
    """pool_status() gives the sizes and use of a QueuePool: capacity is size plus overflow."""
    async with bound(database.url, pool_size=3, max_overflow=1) as db:
        assert isinstance(db.engine.pool, QueuePool)
        status = db.pool_status()
        assert set(status) == POOL_STATUS_KEYS
        assert status == {
            "pool_class": type(db.engine.pool).__name__,
            "size": 3,
            "max_overflow": 1,
            "capacity": 4,
            "checked_in": 0,
            "checked_out": 0,
            "available": 4,
            "saturation": 0.0,
        }
        async with db(multi_sessions=True), db.connection() as session:
            await session.execute(text("SELECT 1"))
            status = db.pool_status()
            assert status["checked_out"] == 1
            assert status["available"] == 3
            assert status["saturation"] == 0.25
        status = db.pool_status()
        assert (status["checked_in"], status["checked_out"], status["available"]) == (1, 0, 4)


async def test_pool_status_has_no_numbers_for_null_pool(database: Database) -> None:
    """pool_status() of a NullPool names the class and leaves every number None."""
    async with bound(database.url, poolclass=NullPool) as db:
        status = db.pool_status()
        assert status == dict.fromkeys(POOL_STATUS_KEYS) | {"pool_class": "NullPool"}


# -- db.gather outside multi mode ------------------------------------------------------------


@pytest.mark.parametrize("scope", ["no scope", "plain scope"])
async def test_gather_outside_multi_mode_is_asyncio_gather(
    memory_db: DBSessionMeta, scope: str
) -> None:
    """Outside a multi block db.gather returns results in order and accepts tasks, like asyncio."""
    second_done = asyncio.Event()

    async def first() -> str:
        await second_done.wait()  # finishes last, yet comes first in the results
        return "first"

    async def second() -> str:
        second_done.set()
        return "second"

    async def fail() -> str:
        raise Boom("failed")

    async def run() -> None:
        task = asyncio.create_task(second())
        assert await memory_db.gather(first(), task) == ["first", "second"]
        results = await memory_db.gather(noop(), fail(), return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[1], Boom)

    async with asyncio.timeout(5):
        if scope == "plain scope":
            async with memory_db():
                await run()
        else:
            await run()


# -- through a real app ----------------------------------------------------------------------


async def test_route_fans_out_with_throttled_gather(database: Database) -> None:
    """A route's multi block with max_concurrent commits every child before it responds."""
    Middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(
        Middleware,
        db_url=database.url,
        engine_args={"pool_size": 2, "max_overflow": 0, "pool_timeout": 2},
    )

    @app.post("/fan-out")
    async def fan_out() -> dict[str, int]:
        async def write(number: int) -> int:
            await db.session.execute(new_item(f"row-{number}"))
            return int(db.pool_status()["checked_out"])

        async with db(multi_sessions=True, max_concurrent=2, commit_on_exit=True):
            seen = await db.gather(*(write(number) for number in range(6)))
            committed = len(await database.names())
        return {"most_checked_out": max(seen), "committed": committed}

    async with asyncio.timeout(20), serve(app) as client:
        response = await client.post("/fan-out")
        assert db.pool_status()["checked_out"] == 0

    assert response.status_code == 200
    assert response.json()["committed"] == 6
    assert 1 <= response.json()["most_checked_out"] <= 2
    assert await database.names() == [f"row-{number}" for number in range(6)]
