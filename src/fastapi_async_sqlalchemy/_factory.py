"""Pairs of a middleware class and the session proxy it binds."""

from __future__ import annotations

from ._middleware import BaseSQLAlchemyMiddleware
from ._proxy import DBSessionMeta


def create_middleware_and_session_proxy() -> tuple[type[BaseSQLAlchemyMiddleware], DBSessionMeta]:
    """Return a new ``(middleware class, proxy)`` pair that shares nothing with any other.

    Use one pair per database::

        PrimaryMiddleware, primary = create_middleware_and_session_proxy()
        AnalyticsMiddleware, analytics = create_middleware_and_session_proxy()
    """

    class SQLAlchemyMiddleware(BaseSQLAlchemyMiddleware):
        __doc__ = BaseSQLAlchemyMiddleware.__doc__
        proxy = DBSessionMeta()

    return SQLAlchemyMiddleware, SQLAlchemyMiddleware.proxy


db = DBSessionMeta()


class SQLAlchemyMiddleware(BaseSQLAlchemyMiddleware):
    """The middleware that binds ``db``: pure ASGI, one session scope per request.

    ``app.add_middleware(SQLAlchemyMiddleware, db_url=..., commit_on_exit=True)``; see
    :class:`BaseSQLAlchemyMiddleware` for the arguments.
    """

    proxy = db
