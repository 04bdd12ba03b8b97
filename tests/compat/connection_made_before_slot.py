"""A db.connection() context object made before its task holds a slot and entered inside that
task's ``async with db.connection():`` (max_concurrent=1) lends the task's own session (the
same object as the outer one) instead of waiting for a second slot forever."""

import asyncio

from _compat import kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def enter_early_made_connection() -> dict:
    made_early = db.connection()
    async with db.connection() as outer:
        await outer.execute(text("SELECT 1"))
        try:
            async with asyncio.timeout(2):
                async with made_early as inner:
                    await inner.execute(text("SELECT 1"))
                    return {"same_session": inner is outer}
        except TimeoutError:
            return {"hung": True}
        except Exception as exc:
            return {"raised": kinds(exc)}


async def main() -> dict:
    middleware = SQLAlchemyMiddleware(FastAPI(), db_url=url())
    result: dict = {}
    try:
        async with db(multi_sessions=True, max_concurrent=1):
            result["in_a_child_task"] = await asyncio.create_task(enter_early_made_connection())
            result["in_the_block_owner"] = await enter_early_made_connection()
        result["block"] = "ok"
    except Exception as exc:
        result["block"] = {"raised": kinds(exc)}
    await middleware.dispose()
    return result


run(main)
