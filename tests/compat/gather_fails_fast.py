"""A throttled db.gather (max_concurrent=2, commit_on_exit=True) where one coroutine raises
quickly: the ValueError propagates at once, and nothing its siblings wrote (before or after the
error, started or still waiting for a slot) is committed once the block is left, whether the
error leaves the block or is handled inside it."""

import asyncio
import contextlib

from _compat import Clock, committed_rows, create_table, drop_table, items, kinds, run, url
from fastapi import FastAPI

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def insert_then_wait(n: int) -> None:
    await db.session.execute(items.insert().values(id=n, name=f"row {n}"))
    await asyncio.sleep(1.0)


async def wait_then_insert(n: int) -> None:
    await asyncio.sleep(0.2)
    await db.session.execute(items.insert().values(id=n, name=f"row {n}"))


async def fail_soon() -> None:
    await asyncio.sleep(0.05)
    raise ValueError("one coroutine failed")


async def gather(first_id: int, result: dict) -> None:
    clock = Clock()
    try:
        await db.gather(
            insert_then_wait(first_id),
            fail_soon(),
            wait_then_insert(first_id + 1),
            wait_then_insert(first_id + 2),
        )
        result["gather"] = "returned"
    except Exception as exc:
        result["gather"] = {"raised": kinds(exc)}
        result["gather_time"] = clock.bucket(0.7)
        raise


async def main() -> dict:
    await create_table()
    middleware = SQLAlchemyMiddleware(FastAPI(), db_url=url())
    propagated: dict = {}
    try:
        async with db(multi_sessions=True, max_concurrent=2, commit_on_exit=True):
            await gather(1, propagated)
    except Exception as exc:
        propagated["block"] = {"raised": kinds(exc)}
    await asyncio.sleep(0.4)  # a sibling that survived would write and commit meanwhile
    propagated["rows_committed"] = await committed_rows()

    handled: dict = {}
    try:
        async with db(multi_sessions=True, max_concurrent=2, commit_on_exit=True):
            with contextlib.suppress(ValueError):
                await gather(11, handled)
        handled["block"] = "ok"
    except Exception as exc:
        handled["block"] = {"raised": kinds(exc)}
    await asyncio.sleep(0.4)
    handled["rows_committed"] = await committed_rows()

    await middleware.dispose()
    await drop_table()
    return {"error_leaves_the_block": propagated, "error_handled_in_the_block": handled}


run(main)
