"""db(multi_sessions=1) (a truthy value that is not a bool) is taken for its truth: each task
gets a session of its own, as with multi_sessions=True; multi_sessions=0 is a plain block."""

import asyncio

from _compat import kinds, run, url
from fastapi import FastAPI

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def sessions_seen(multi_sessions: object) -> object:
    async def seen() -> int:
        return id(db.session)

    try:
        async with db(multi_sessions=multi_sessions):  # type: ignore[arg-type]
            owner = id(db.session)
            children = await asyncio.gather(
                asyncio.create_task(seen()), asyncio.create_task(seen())
            )
        return {"children_share_the_owners_session": children == [owner, owner]}
    except Exception as exc:
        return {"raised": kinds(exc)}


async def main() -> dict:
    middleware = SQLAlchemyMiddleware(FastAPI(), db_url=url())
    try:
        return {str(value): await sessions_seen(value) for value in (1, 0, "yes", None)}
    finally:
        await middleware.dispose()


run(main)
