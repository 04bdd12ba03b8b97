"""In db(multi_sessions=True, pool_timeout=1) the block owner's own db.session is refused at
once with a RuntimeError (a synchronous property cannot honour the deadline), while
db.connection() in the same block works."""

from _compat import Clock, attempt, kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def main() -> dict:
    middleware = SQLAlchemyMiddleware(FastAPI(), db_url=url())
    result: dict = {}
    clock = Clock()
    try:
        async with db(multi_sessions=True, pool_timeout=1):
            result["owner_db_session"] = attempt(lambda: db.session)
            result["owner_db_session_time"] = clock.bucket(0.5)
            async with db.connection() as session:
                result["connection"] = (await session.execute(text("SELECT 1"))).scalar_one()
        result["block"] = "ok"
    except Exception as exc:
        result["block"] = {"raised": kinds(exc)}
    await middleware.dispose()
    return result


run(main)
