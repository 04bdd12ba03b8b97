"""db.gather called from inside ``async with db.connection()`` runs its coroutines when slots
are free (max_concurrent=3) and is refused with a RuntimeError when it would wait for its own
slot (max_concurrent=1), without leaving a never-awaited coroutine behind."""

from _compat import kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def select(n: int) -> int:
    return (await db.session.execute(text(f"SELECT {n}"))).scalar_one()


async def gather_in_a_slot(max_concurrent: int) -> dict:
    try:
        async with (
            db(multi_sessions=True, max_concurrent=max_concurrent),
            db.connection() as session,
        ):
            await session.execute(text("SELECT 1"))
            try:
                return {"ok": await db.gather(select(1), select(2))}
            except Exception as exc:
                return {"raised": kinds(exc)}
    except Exception as exc:
        return {"block raised": kinds(exc)}


async def main() -> dict:
    middleware = SQLAlchemyMiddleware(FastAPI(), db_url=url())
    result = {
        "max_concurrent_3": await gather_in_a_slot(3),
        "max_concurrent_1": await gather_in_a_slot(1),
    }
    await middleware.dispose()
    return result


run(main)
