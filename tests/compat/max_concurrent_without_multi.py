"""db(max_concurrent=2) without multi_sessions is accepted and has no effect: the block works
like a plain db() block, child tasks included."""

import asyncio

from _compat import committed_rows, create_table, drop_table, items, kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def main() -> dict:
    await create_table()
    middleware = SQLAlchemyMiddleware(FastAPI(), db_url=url())
    result: dict = {}
    try:
        async with db(max_concurrent=2, commit_on_exit=True):
            result["select"] = (await db.session.execute(text("SELECT 1"))).scalar_one()
            await db.session.execute(items.insert().values(id=1, name="row 1"))

            async def child() -> bool:
                return db.session is not None

            result["child_sees_a_session"] = await asyncio.create_task(child())
        result["block"] = "ok"
    except Exception as exc:
        result["block"] = {"raised": kinds(exc)}
    result["rows_committed"] = await committed_rows()
    await middleware.dispose()
    await drop_table()
    return result


run(main)
