"""The first error wins: when a route or a db() block raises ValueError and the session's
cleanup (rollback, close) then fails too, the ValueError still propagates (``except ValueError``
catches it) and the cleanup failure is reported beside it as a UserWarning."""

import httpx
from _compat import kinds, run, url, warning_categories
from fastapi import FastAPI
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


def break_cleanup(session: object) -> None:
    """Make the session's rollback and close fail (after doing their work, so nothing leaks)."""
    for name in ("rollback", "close"):
        real = getattr(session, name)

        async def failing(real=real) -> None:
            await real()
            raise RuntimeError("cleanup failed")

        setattr(session, name, failing)


async def main() -> dict:
    app = FastAPI()
    app.add_middleware(SQLAlchemyMiddleware, db_url=url())

    @app.get("/")
    async def index() -> dict:
        await db.session.execute(text("SELECT 1"))
        break_cleanup(db.session)
        raise ValueError("the route failed")

    result: dict = {}
    for raise_app_exceptions in (True, False):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        with warning_categories() as seen:
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    response = await client.get("/")
                outcome: dict = {"status": response.status_code}
            except Exception as exc:
                outcome = {"raised": kinds(exc)}
        outcome["warnings"] = seen
        result["request" if raise_app_exceptions else "request_as_500"] = outcome

    for label, block_args in (("block", {}), ("multi_sessions_block", {"multi_sessions": True})):
        with warning_categories() as seen:
            try:
                async with db(**block_args):
                    await db.session.execute(text("SELECT 1"))
                    break_cleanup(db.session)
                    raise ValueError("the block failed")
            except ValueError:
                outcome = {"caught": "ValueError"}
            except Exception as exc:
                outcome = {"raised": kinds(exc)}
        outcome["warnings"] = seen
        result[label] = outcome
    return result


run(main)
