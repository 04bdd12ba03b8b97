"""Plain asyncio.gather children in db(multi_sessions=True) each get a session that is finalized
when the child is done: twenty SELECTs on a pool of three all finish quickly (server databases);
three SQLite writers do not lock each other out and all three rows are committed."""

import asyncio

from _compat import Clock, committed_rows, create_table, drop_table, items, kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def main() -> dict:
    await create_table()
    middleware = SQLAlchemyMiddleware(
        FastAPI(),
        db_url=url(),
        engine_args={"pool_size": 3, "max_overflow": 0, "pool_timeout": 5},
    )
    result: dict = {}

    if not url().startswith("sqlite"):

        async def select_one() -> int:
            return (await db.session.execute(text("SELECT 1"))).scalar_one()

        clock = Clock()
        try:
            async with db(multi_sessions=True, commit_on_exit=True):
                values = await asyncio.gather(*(select_one() for _ in range(20)))
            result["selects"] = {"ok": values == [1] * 20}
        except Exception as exc:
            result["selects"] = {"raised": kinds(exc)}
        result["selects_time"] = clock.bucket(3)

    async def insert(n: int) -> None:
        await db.session.execute(items.insert().values(id=n, name=f"row {n}"))

    clock = Clock()
    try:
        async with db(multi_sessions=True, commit_on_exit=True):
            await asyncio.gather(insert(1), insert(2), insert(3))
        result["inserts"] = "ok"
    except Exception as exc:
        result["inserts"] = {"raised": kinds(exc)}
    result["inserts_time"] = clock.bucket(3)
    result["rows_committed"] = await committed_rows()
    await middleware.dispose()
    await drop_table()
    return result


run(main)
