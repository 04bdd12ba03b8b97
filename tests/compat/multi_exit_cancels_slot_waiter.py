"""Leaving db(multi_sessions=True, max_concurrent=...) while one task holds a connection inside
db.connection() and another waits there (for the slot, or with a slot for the pool's only
connection): both are cancelled, and no work of the waiting task runs afterwards.

Both packages cancel such tasks. This project also tells the user about them (a deliberate
difference, SPEC section 12: it raises a RuntimeError at the block's exit where 0.8.1 exits
quietly), so how the block exits and what it warns are not compared here.
"""

import asyncio
import contextlib

from _compat import run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def leave_with_a_waiter(**block_args: object) -> dict:
    waiter_ran: list[str] = []
    holding = asyncio.Event()
    never = asyncio.Event()

    async def holder() -> None:
        async with db.connection() as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await never.wait()

    async def waiter() -> None:
        async with db.connection() as session:
            waiter_ran.append("body")
            await session.execute(text("SELECT 1"))
            waiter_ran.append("query")

    with contextlib.suppress(RuntimeError):  # this project's report of the cut-off tasks
        async with db(multi_sessions=True, **block_args):
            holding_task = asyncio.create_task(holder())
            await holding.wait()
            waiting_task = asyncio.create_task(waiter())
            await asyncio.sleep(0.1)  # the waiter is parked
    await asyncio.sleep(0.3)  # time for anything that survived the block to run
    result = {
        "waiter_ran": waiter_ran,
        "holder": "cancelled" if holding_task.cancelled() else "not cancelled",
        "waiter": "cancelled" if waiting_task.cancelled() else "not cancelled",
    }
    for task in (holding_task, waiting_task):
        if not task.done():
            task.cancel()
    await asyncio.gather(holding_task, waiting_task, return_exceptions=True)
    return result


async def main() -> dict:
    middleware = SQLAlchemyMiddleware(
        FastAPI(),
        db_url=url(),
        engine_args={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5},
    )
    result = {
        "waiting_for_the_slot": await leave_with_a_waiter(max_concurrent=1),
        "waiting_for_the_pool": await leave_with_a_waiter(max_concurrent=2, pool_timeout=3),
    }
    await middleware.dispose()
    return result


run(main, record_warnings=False)
