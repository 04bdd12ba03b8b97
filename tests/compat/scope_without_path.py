"""A hand-built HTTP scope without a "path" key, passed to the middleware while exclude_paths is
set, gets a request session and a response like any other request."""

from _compat import Exchange, kinds, run, url
from sqlalchemy import text

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db


async def main() -> dict:
    seen: dict = {}

    async def app(scope, receive, send) -> None:
        try:
            seen["value"] = (await db.session.execute(text("SELECT 1"))).scalar_one()
        except Exception as exc:
            seen["db.session"] = {"raised": kinds(exc)}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = SQLAlchemyMiddleware(app, db_url=url(), exclude_paths=["/health"])
    exchange = Exchange(middleware, path=None)
    result = {"response": await exchange.response(), **await exchange.finish(), "route": seen}
    await middleware.dispose()
    return result


run(main)
