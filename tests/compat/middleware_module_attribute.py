"""After a bare ``import fastapi_async_sqlalchemy``, the submodules are attributes of the
package: ``fastapi_async_sqlalchemy.middleware.SQLAlchemyMiddleware`` (the same class as the
top-level name) and ``fastapi_async_sqlalchemy.exceptions.PoolTimeoutError`` work."""

from _compat import attempt, run

import fastapi_async_sqlalchemy


async def main() -> dict:
    package = fastapi_async_sqlalchemy
    return {
        "middleware.SQLAlchemyMiddleware": attempt(lambda: package.middleware.SQLAlchemyMiddleware),
        "same_class": getattr(getattr(package, "middleware", None), "SQLAlchemyMiddleware", None)
        is package.SQLAlchemyMiddleware,
        "middleware.db is db": getattr(getattr(package, "middleware", None), "db", None)
        is package.db,
        "exceptions.PoolTimeoutError": attempt(lambda: package.exceptions.PoolTimeoutError),
        "middleware.create_middleware_and_session_proxy": attempt(
            lambda: package.middleware.create_middleware_and_session_proxy
        ),
    }


run(main)
