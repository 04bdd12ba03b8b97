"""PoolTimeoutError means the pool had no connection in time, and reports the deadline that
fired: the engine's pool_timeout (0.3 s) firing before the block's (5 s) gives a PoolTimeoutError
whose timeout is 0.3; on PostgreSQL, a server that accepts the TCP connection and never answers
(asyncpg's own connect timeout, 0.3 s) gives a TimeoutError that is not a PoolTimeoutError under
db(pool_timeout=5).

asyncmy's connect_timeout covers the TCP connect only, not the server's greeting, so on MariaDB
the silent server is only ever stopped by the block's own deadline: a PoolTimeoutError from
db(pool_timeout=1) (1 s rather than 5, to keep the run short) in both packages.
"""

import asyncio
import socket

from _compat import Clock, kinds, run, url
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url

from fastapi_async_sqlalchemy import PoolTimeoutError, create_middleware_and_session_proxy


async def select_within(db, pool_timeout: float, bucket: float) -> dict:
    """SELECT 1 in db(pool_timeout=...): what was raised, the deadline reported, how long."""
    clock = Clock()
    try:
        async with db(pool_timeout=pool_timeout):
            await db.session.execute(text("SELECT 1"))
        result: dict = {"block": "ok"}
    except Exception as exc:
        result = {"raised": kinds(exc)}
        if isinstance(exc, PoolTimeoutError):
            result["timeout"] = str(exc.timeout)  # as a message or a log shows it
    result["time"] = clock.bucket(bucket)
    return result


async def silent_server() -> dict:
    """The driver's own connect timeout against a server that never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel completes the handshakes; nobody ever reads or writes
    port = listener.getsockname()[1]
    silent_url = make_url(url()).set(host="127.0.0.1", port=port)
    if silent_url.get_backend_name() == "postgresql":
        connect_args, pool_timeout = {"timeout": 0.3}, 5
    else:
        connect_args, pool_timeout = {"connect_timeout": 0.3}, 1
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        FastAPI(), db_url=silent_url, engine_args={"connect_args": connect_args}
    )
    result = await select_within(db, pool_timeout, bucket=3)
    await middleware.dispose()
    listener.close()
    return result


async def engine_deadline_first() -> dict:
    """The engine's pool_timeout (0.3 s) fires before the block's pool_timeout (5 s)."""
    Middleware, db = create_middleware_and_session_proxy()
    middleware = Middleware(
        FastAPI(),
        db_url=url(),
        engine_args={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3},
    )
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold_the_only_connection() -> None:
        async with db():
            await db.session.execute(text("SELECT 1"))
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold_the_only_connection())
    await holding.wait()
    result = await select_within(db, 5, bucket=2)
    release.set()
    await holder
    await middleware.dispose()
    return result


async def main() -> dict:
    result = {"engine_deadline_first": await engine_deadline_first()}
    if not url().startswith("sqlite"):
        result["silent_server"] = await silent_server()
    return result


run(main)
