"""SQLAlchemyMiddleware(app, db_url=..., pool_warn_interval=0) is accepted, and with a
pool_warn_threshold it then logs a pool warning at every checkout past the threshold."""

from _compat import attempt, library_log, run, url
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, create_middleware_and_session_proxy


async def main() -> dict:
    result = {
        "accepted": attempt(
            lambda: SQLAlchemyMiddleware(FastAPI(), db_url=url(), pool_warn_interval=0)
        )
    }
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        FastAPI(),
        db_url=url(),
        engine_args={"pool_size": 1, "max_overflow": 0},
        pool_warn_threshold=0.5,
        pool_warn_interval=0,
    )
    with library_log() as records:
        for _ in range(3):
            async with db():
                await db.session.execute(text("SELECT 1"))
    result["pool_warnings_for_3_checkouts"] = sum(r.levelname == "WARNING" for r in records)
    await middleware.dispose()
    return result


run(main)
