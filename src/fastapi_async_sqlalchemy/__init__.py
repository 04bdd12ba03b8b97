"""SQLAlchemy 2.x async sessions for FastAPI and Starlette, one per request, via ``db.session``."""

# 0.8 code reaches `fastapi_async_sqlalchemy.middleware.X` after `import fastapi_async_sqlalchemy`.
from . import middleware as middleware
from ._factory import SQLAlchemyMiddleware, create_middleware_and_session_proxy, db
from ._pgbouncer import pgbouncer_engine_args
from ._proxy import DBSessionMeta
from ._retry import is_retryable
from ._stats import DatabaseStats
from .exceptions import (
    CommitCallbackError,
    ConcurrencyError,
    CoroutineRequiredError,
    FastAPIAsyncSQLAlchemyError,
    InvalidConfigurationError,
    MissingSessionError,
    NPlusOneError,
    PoolTimeoutError,
    ProxyBindingError,
    ReplicaWriteError,
    SessionFinalizedError,
    SessionNotInitialisedError,
    StatementTimeoutError,
    TransactionStateError,
)

DBSessionType = DBSessionMeta  # the name used by 0.7 and 0.8.0a1

__version__ = "0.9.0"

__all__ = [
    "CommitCallbackError",
    "ConcurrencyError",
    "CoroutineRequiredError",
    "DBSessionMeta",
    "DBSessionType",
    "DatabaseStats",
    "FastAPIAsyncSQLAlchemyError",
    "InvalidConfigurationError",
    "MissingSessionError",
    "NPlusOneError",
    "PoolTimeoutError",
    "ProxyBindingError",
    "ReplicaWriteError",
    "SQLAlchemyMiddleware",
    "SessionFinalizedError",
    "SessionNotInitialisedError",
    "StatementTimeoutError",
    "TransactionStateError",
    "__version__",
    "create_middleware_and_session_proxy",
    "db",
    "is_retryable",
    "pgbouncer_engine_args",
]
