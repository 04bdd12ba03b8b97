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
    proxy = DBSessionMeta()

    class SQLAlchemyMiddleware(BaseSQLAlchemyMiddleware):
        __doc__ = BaseSQLAlchemyMiddleware.__doc__

    SQLAlchemyMiddleware.proxy = proxy
    return SQLAlchemyMiddleware, proxy


SQLAlchemyMiddleware, db = create_middleware_and_session_proxy()
