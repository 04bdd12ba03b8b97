"""The module the 0.8 releases kept their middleware in; its public names still import from here."""

from ._config import default_session_class
from ._factory import SQLAlchemyMiddleware, create_middleware_and_session_proxy, db
from ._proxy import DBSessionMeta
from ._scope import logger
from .exceptions import MissingSessionError, PoolTimeoutError, SessionNotInitialisedError

DefaultAsyncSession = default_session_class()

__all__ = [
    "DBSessionMeta",
    "DefaultAsyncSession",
    "MissingSessionError",
    "PoolTimeoutError",
    "SQLAlchemyMiddleware",
    "SessionNotInitialisedError",
    "create_middleware_and_session_proxy",
    "db",
    "logger",
]
