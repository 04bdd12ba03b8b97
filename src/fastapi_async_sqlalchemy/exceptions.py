"""Errors raised by fastapi-async-sqlalchemy.

Every error the library raises itself derives from one base class::

    FastAPIAsyncSQLAlchemyError
    ├── MissingSessionError            no session scope is active here
    ├── SessionNotInitialisedError     no middleware has bound the proxy yet
    ├── InvalidConfigurationError      (also ValueError) a bad argument, refused up front
    ├── SessionFinalizedError          (also RuntimeError) a finished scope's session was used
    ├── ProxyBindingError              (also RuntimeError) a second engine for one proxy
    ├── ConcurrencyError               (also RuntimeError) misuse of multi-session mode
    ├── CoroutineRequiredError         (also TypeError) a task given to a throttled db.gather()
    ├── PoolTimeoutError               (also TimeoutError) no connection within the deadline
    ├── StatementTimeoutError          (also TimeoutError) a statement ran past statement_timeout
    ├── CommitCallbackError            an on_commit callback failed after its data was committed
    ├── TransactionStateError          (also RuntimeError) run_in_transaction() inside a transaction
    ├── NPlusOneError                  one statement ran too often in a request (n_plus_one="raise")
    └── ReplicaWriteError              a write where reads go to a read replica

Each message is one sentence that says what to do about it. Errors of SQLAlchemy and of the
database driver (``IntegrityError``, ``OperationalError``, ...) are never wrapped: they reach the
caller as they are.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CommitCallbackError",
    "ConcurrencyError",
    "CoroutineRequiredError",
    "FastAPIAsyncSQLAlchemyError",
    "InvalidConfigurationError",
    "MissingSessionError",
    "NPlusOneError",
    "PoolTimeoutError",
    "ProxyBindingError",
    "ReplicaWriteError",
    "SessionFinalizedError",
    "SessionNotInitialisedError",
    "StatementTimeoutError",
    "TransactionStateError",
]


class FastAPIAsyncSQLAlchemyError(Exception):
    """Base class of every error raised by fastapi-async-sqlalchemy itself."""


class MissingSessionError(FastAPIAsyncSQLAlchemyError):
    """Raised when ``db.session`` is used where no session scope is active.

    A scope is opened by the middleware for each request, or explicitly by ``async with db():``.
    """

    def __init__(
        self,
        message: str = (
            "No session scope is active here: code outside a request (startup hooks, scripts, "
            "workers, tests) must open one with `async with db():`."
        ),
    ) -> None:
        super().__init__(message)


class SessionNotInitialisedError(FastAPIAsyncSQLAlchemyError):
    """Raised when the proxy is used before any middleware has bound it to an engine."""

    def __init__(
        self,
        message: str = (
            "The session proxy is not bound to an engine yet: add SQLAlchemyMiddleware to the "
            "app and start it (or construct the middleware) before using the database."
        ),
    ) -> None:
        super().__init__(message)


class InvalidConfigurationError(FastAPIAsyncSQLAlchemyError, ValueError):
    """Raised at construction time for an argument that cannot work; the message names it."""


class SessionFinalizedError(FastAPIAsyncSQLAlchemyError, RuntimeError):
    """Raised when the session of a scope that has already ended is used.

    The request's session is finalized before the response is sent, so background tasks and
    streaming bodies must open their own scope with ``async with db():``.
    """


class ProxyBindingError(FastAPIAsyncSQLAlchemyError, RuntimeError):
    """Raised when a proxy that is bound to a live engine is asked to bind another one."""


class ConcurrencyError(FastAPIAsyncSQLAlchemyError, RuntimeError):
    """Raised when multi-session work is used in a way that cannot be made safe."""


class CoroutineRequiredError(FastAPIAsyncSQLAlchemyError, TypeError):
    """Raised when a throttled ``db.gather()`` is given something other than coroutines.

    A task or future may already be running outside any slot; a coroutine can be started inside
    one.
    """


class PoolTimeoutError(FastAPIAsyncSQLAlchemyError, TimeoutError):
    """Raised when no database connection could be had within the configured deadline.

    ``timeout`` is the deadline in seconds, ``retry_after`` a hint in seconds for clients, and
    ``pool_status`` the pool snapshot taken when the deadline passed (see ``db.pool_status()``).
    """

    def __init__(
        self,
        timeout: float | None = None,
        retry_after: int = 1,
        pool_status: dict[str, Any] | None = None,
    ) -> None:
        self.timeout = timeout
        self.retry_after = retry_after
        self.pool_status = pool_status
        within = f"within {timeout:g}s" if timeout is not None else "within the deadline"
        usage = ""
        if pool_status and pool_status.get("capacity") is not None:
            usage = (
                f" ({pool_status['checked_out']}/{pool_status['capacity']} connections checked out)"
            )
        super().__init__(
            f"No database connection could be checked out {within}{usage}: raise the pool "
            "size or the deadline, or hold connections for less time."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.timeout, self.retry_after, self.pool_status))


class CommitCallbackError(FastAPIAsyncSQLAlchemyError):
    """Raised by ``async with db():`` when an ``on_commit`` callback failed.

    The data **was** committed: only the side effect failed. ``errors`` holds what the failed
    callbacks raised, in order (more than one only with ``robust=True``); the first is also the
    ``__cause__``.
    """

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(
            f"The data was committed, but an on_commit callback failed with "
            f"{type(first).__name__}: {first}{more}. Handle the error in the callback, or "
            "register it with robust=True so the callbacks after it still run."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))


class TransactionStateError(FastAPIAsyncSQLAlchemyError, RuntimeError):
    """Raised when ``run_in_transaction()`` is called where the proxy's session already has an
    open transaction: a retry could not undo the part of it that came before."""


class StatementTimeoutError(FastAPIAsyncSQLAlchemyError, TimeoutError):
    """Raised when the database stopped a statement that ran past ``statement_timeout``.

    ``timeout`` is that limit in seconds. A request that fails with it before its response
    started is answered 503 with ``Retry-After``.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            f"A statement ran past statement_timeout={timeout:g}s and the database stopped it: "
            "make the statement faster, or raise statement_timeout for this work."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.timeout,))


class NPlusOneError(FastAPIAsyncSQLAlchemyError):
    """Raised, with ``n_plus_one="raise"``, by the statement that runs one statement shape more
    than ``n_plus_one_threshold`` times in one request: the message names the route, the line
    that sent it and the statement."""


class ReplicaWriteError(FastAPIAsyncSQLAlchemyError):
    """Raised for a write where reads go to a read replica: in ``async with db(replica=True):``,
    or a statement refused by a replica's read-only transaction. Writes belong on the primary:
    ``async with db():``."""
