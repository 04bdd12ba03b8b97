"""Observability: what a request did in the database (``db.stats``), the ``Server-Timing``
header, and the N+1 and slow-request warnings.

Nothing here exists for a middleware that asks for none of it. One that does gets an
:class:`Observer`, which installs, on its engine only:

- a dialect-level ``do_execute`` listener (and its ``executemany``/no-parameters siblings) that
  times each statement around the dialect's own method: about 1 µs, where a
  ``before/after_cursor_execute`` pair costs several even when empty. Statements SQLAlchemy runs
  to set up the engine's first connection (the server's version, ...) are not counted: they run
  on a connection of SQLAlchemy's own that may not autobegin;
- a pool ``checkout`` listener that ends the pool wait its sessions' ``get_bind()`` started;

and gives the middleware's session factory a ``Session`` subclass whose ``get_bind()`` marks
when a connection is asked for and whose ``commit()`` is timed. The figures go to the
:class:`DatabaseStats` current in the proxy's context variable: the middleware sets one per
request, ``async with db():`` one per block outside a request. Tasks started inside (multi-session
children, ``db.gather()``) inherit it, so they count in their request.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from ._config import default_session_class
from ._types import ASGIApp, ASGIScope, Message, Receive, Send
from ._where import caller
from .exceptions import NPlusOneError

if TYPE_CHECKING:
    from ._otel import Telemetry

logger = logging.getLogger("fastapi_async_sqlalchemy")

perf_counter = time.perf_counter

SPAN = "fastapi_async_sqlalchemy.span"  # the session.info key of a session's span (tracing)


class DatabaseStats:
    """What one scope (a request, with its children and background tasks, or an
    ``async with db():`` block) did in the database so far; times in seconds."""

    __slots__ = (
        "asgi_scope",
        "commit_time",
        "commits",
        "ended",
        "owner",
        "pool_wait",
        "shapes",
        "slowest",
        "slowest_location",
        "slowest_statement",
        "statement_time",
        "statements",
    )

    def __init__(self, asgi_scope: ASGIScope | None = None, owner: object = None) -> None:
        self.owner = owner  # the Observer that fills it in
        self.ended = False  # its request or block is over: a task outliving it starts afresh
        self.statements = 0
        self.statement_time = 0.0
        self.pool_wait = 0.0
        self.commits = 0
        self.commit_time = 0.0
        self.asgi_scope = asgi_scope
        self.shapes: dict[str, int] = {}  # statement shape -> times run (N+1 detection only)
        self.slowest = 0.0  # the slowest statement so far (slow-request warnings only)
        self.slowest_statement = ""
        self.slowest_location = ""

    def __repr__(self) -> str:
        return (
            f"<DatabaseStats statements={self.statements} "
            f"statement_time={self.statement_time * 1000:.2f}ms "
            f"pool_wait={self.pool_wait * 1000:.2f}ms commits={self.commits} "
            f"commit_time={self.commit_time * 1000:.2f}ms>"
        )

    def route(self) -> str:
        """``METHOD /route/{template}`` of the request, or its path; ``"outside a request"``."""
        scope = self.asgi_scope
        if scope is None:
            return "outside a request"
        route = getattr(scope.get("route"), "path", None) or scope.get("path", "?")
        return f"{scope.get('method', '')} {route}".strip()


# Placeholders and IN lists vary with the parameters of one statement: collapse them.
_PLACEHOLDER = r"(?:[?]|%s|\$\d+|:\w+|%\(\w+\)s)"
_IN_LIST = re.compile(rf"\bIN\s*\(\s*{_PLACEHOLDER}(?:\s*,\s*{_PLACEHOLDER})*\s*\)", re.I)
_NUMBERED = re.compile(r"\$\d+")
_SPACE = re.compile(r"\s+")
_shapes: dict[str, str] = {}


def shape(statement: str) -> str:
    """The statement with IN lists collapsed and whitespace normalized (cached)."""
    found = _shapes.get(statement)
    if found is None:
        found = _NUMBERED.sub("$n", _IN_LIST.sub("IN (...)", _SPACE.sub(" ", statement).strip()))
        if len(_shapes) < 2048:
            _shapes[statement] = found
    return found


class Observer:
    """One middleware's observability: its options, its listeners, and its request wrapper."""

    def __init__(
        self,
        var: ContextVar[DatabaseStats | None],
        *,
        server_timing: bool,
        slow_request_threshold: float | None,
        n_plus_one_threshold: int | None,
        n_plus_one: str,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.var = var
        self.telemetry = telemetry
        self.server_timing = server_timing
        self.slow_request_threshold = slow_request_threshold
        self.n_plus_one_threshold = n_plus_one_threshold
        self.raise_n_plus_one = n_plus_one == "raise"
        # When the current task's session asked for a connection (the pool wait's start), and
        # the session's span when tracing: (perf_counter(), time_ns(), span).
        self.asked: ContextVar[tuple[float, int, Any] | None] = ContextVar(
            "fastapi_async_sqlalchemy.connection_asked", default=None
        )
        self.engine: AsyncEngine | None = None
        self.engines: list[AsyncEngine] = []  # the primary and its replicas, while attached
        self.active = False  # its listeners are installed
        self._classes: dict[type[Session], type[Session]] = {}
        # The statement hooks by event name (each must find itself among the event's listeners).
        self._hooks: dict[str, Callable[..., bool]] = {
            "do_execute": self._do_execute,
            "do_executemany": self._do_executemany,
            "do_execute_no_params": self._do_execute_no_params,
        }
        self._listeners: list[tuple[str, Callable[..., Any]]] = [
            *self._hooks.items(),
            ("checkout", self._checkout),
            ("commit", self._committed),
        ]

    # -- the engine's listeners ---------------------------------------------------------------

    def attach(self, engine: AsyncEngine, *replicas: AsyncEngine) -> None:
        """Observe ``engine`` and its read ``replicas`` (their statements count too)."""
        self.engine = engine
        self.engines = [engine, *replicas]
        if self.telemetry is not None:
            self.telemetry.start()
        for observed_engine in self.engines:
            sync_engine = observed_engine.sync_engine
            if not event.contains(sync_engine, "do_execute", self._do_execute):
                for name, listener in self._listeners:
                    event.listen(sync_engine, name, listener)
        self.active = True

    def detach(self) -> None:
        self.active = False
        if self.telemetry is not None:
            self.telemetry.stop()
        for engine in self.engines:
            if event.contains(engine.sync_engine, "do_execute", self._do_execute):
                for name, listener in self._listeners:
                    event.remove(engine.sync_engine, name, listener)

    def _do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        return self._timed(
            "do_execute", statement, context, (cursor, statement, parameters, context)
        )

    def _do_executemany(self, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        return self._timed(
            "do_executemany", statement, context, (cursor, statement, parameters, context)
        )

    def _do_execute_no_params(self, cursor: Any, statement: str, context: Any) -> bool:
        return self._timed("do_execute_no_params", statement, context, (cursor, statement, context))

    def current(self) -> DatabaseStats | None:
        """The figures this observer fills in here, if any."""
        stats = self.var.get()
        if stats is None or stats.owner is not self or stats.ended:
            return None
        return stats

    def _timed(self, kind: str, statement: str, context: Any, args: tuple[Any, ...]) -> bool:
        """Run the statement as the dialect would (listeners after this one first), timed."""
        stats = self.current()
        if stats is None or not context.root_connection._allow_autobegin:
            return False  # not observed here; or the dialect's set-up of a new connection
        self._before(stats, statement)
        dialect = context.dialect
        mine = self._hooks[kind]
        start = perf_counter()
        try:
            listeners = getattr(dialect.dispatch, kind)
            handled = after_mine = False
            if len(listeners) > 1:
                # Saying "handled" skips the listeners added after this one: run them here.
                for listener in listeners:
                    if after_mine:
                        if listener(*args):
                            handled = True
                            break
                    elif listener == mine:
                        after_mine = True
            if not handled:
                getattr(dialect, kind)(*args)
        finally:
            self._after(stats, statement, perf_counter() - start)
        return True

    def _before(self, stats: DatabaseStats, statement: str) -> None:
        threshold = self.n_plus_one_threshold
        if threshold is None:
            return
        key = shape(statement)
        count = stats.shapes[key] = stats.shapes.get(key, 0) + 1
        if count == threshold + 1:
            self._n_plus_one(stats, key, count)

    def _after(self, stats: DatabaseStats, statement: str, elapsed: float) -> None:
        if self.asked.get() is not None:
            self.asked.set(None)  # a checkout from now on was not asked for by a session
        stats.statements += 1
        stats.statement_time += elapsed
        threshold = self.slow_request_threshold
        if threshold is not None and elapsed > stats.slowest:
            stats.slowest = elapsed
            stats.slowest_statement = statement
            # Finding the line costs a walk up the stack: only for a statement that matters.
            stats.slowest_location = caller() if elapsed >= threshold / 20 else "(not located)"

    def _n_plus_one(self, stats: DatabaseStats, statement: str, count: int) -> None:
        message = (
            f"N+1 queries in {stats.route()}: one statement ran more than "
            f"{self.n_plus_one_threshold} times (n_plus_one_threshold), last from {caller()}: "
            f"{_clip(statement)}. Load the rows in one query (selectinload(), joinedload(), "
            "or an IN list) instead of one per item."
        )
        if self.raise_n_plus_one:
            raise NPlusOneError(message)
        logger.warning(message, extra={"route": stats.route(), "statement": statement})

    def _committed(self, connection: Any) -> None:
        stats = self.current()
        if stats is not None:
            stats.commits += 1  # a COMMIT is sent (by a session, a begin() block, ...)

    def _checkout(self, *_: Any) -> None:
        asked = self.asked.get()
        if asked is not None:
            stats = self.current()
            if stats is not None:
                stats.pool_wait += perf_counter() - asked[0]
            telemetry = self.telemetry
            if telemetry is not None and asked[2] is not None:
                telemetry.child(asked[2], "connection wait", start_time=asked[1]).end()
            self.asked.set(None)

    # -- the sessions -------------------------------------------------------------------------

    def session_class(self, base: type[Session]) -> type[Session]:
        """``base`` with a timed ``commit()``, a ``get_bind()`` that starts the pool wait and,
        with OpenTelemetry, a span from ``__init__()`` to ``close()``."""
        observed = self._classes.get(base)
        if observed is None:
            observed = self._classes[base] = type(
                base.__name__,
                (base,),
                {**self._methods(base), "__module__": base.__module__},
            )
        return observed

    def _methods(self, base: type[Session]) -> dict[str, Any]:
        observer, asked, telemetry = self, self.asked, self.telemetry

        def get_bind(self: Session, *args: Any, **kw: Any) -> Any:
            bind = base.get_bind(self, *args, **kw)
            if observer.current() is not None and not _connected(self, bind):
                # A connection is about to be checked out: the pool wait starts now.
                span = self.info.get(SPAN) if telemetry is not None else None
                asked.set((perf_counter(), time.time_ns() if span is not None else 0, span))
            return bind

        def commit(self: Session) -> None:
            stats = observer.current()
            span = self.info.get(SPAN) if telemetry is not None else None
            if (stats is None and span is None) or not (
                _holds_connection(self) or self.new or self.deleted or self.dirty
            ):
                base.commit(self)  # nothing to time: no statement and no COMMIT will be sent
                return
            committing = telemetry.child(span, "COMMIT") if telemetry and span else None
            sent = stats.commits if stats is not None else 0
            start = perf_counter()
            try:
                base.commit(self)
            except BaseException as error:
                if committing is not None:
                    telemetry.failed(committing, error)  # type: ignore[union-attr]
                raise
            finally:
                if stats is not None and stats.commits != sent:
                    stats.commit_time += perf_counter() - start
                if committing is not None:
                    committing.end()

        methods: dict[str, Any] = {"get_bind": get_bind, "commit": commit}
        if telemetry is None:
            return methods

        def __init__(self: Session, *args: Any, **kw: Any) -> None:
            base.__init__(self, *args, **kw)
            self.info[SPAN] = telemetry.session_span()

        def close(self: Session) -> None:
            span = self.info.pop(SPAN, None)
            if span is None:
                base.close(self)
                return
            rolling_back = telemetry.child(span, "ROLLBACK") if _holds_connection(self) else None
            try:
                base.close(self)
            except BaseException as error:
                telemetry.failed(rolling_back or span, error)
                raise
            finally:
                if rolling_back is not None:
                    rolling_back.end()
                span.end()

        methods.update(__init__=__init__, close=close)
        return methods

    # -- requests -----------------------------------------------------------------------------

    async def http(
        self,
        serve: ASGIApp,
        scope: ASGIScope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Serve one request with figures of its own, then warn if it was slow."""
        stats = DatabaseStats(scope, self)
        timed = send
        if self.server_timing:

            async def timed(message: Message) -> None:
                if message["type"] == "http.response.start" and stats.statements:
                    message = _with_server_timing(message, stats)
                await send(message)

        try:
            await self.counting(stats, serve(scope, receive, timed))
        finally:
            self._warn_if_slow(stats)

    def _warn_if_slow(self, stats: DatabaseStats) -> None:
        threshold = self.slow_request_threshold
        if threshold is not None and stats.statement_time > threshold:
            logger.warning(
                "Slow database work in %s: %.3f s in %d statements "
                "(slow_request_threshold=%s), pool wait %.3f s, commit %.3f s; the slowest "
                "took %.3f s, from %s: %s",
                stats.route(),
                stats.statement_time,
                stats.statements,
                threshold,
                stats.pool_wait,
                stats.commit_time,
                stats.slowest,
                stats.slowest_location,
                _clip(shape(stats.slowest_statement)),
                extra={"route": stats.route(), "statement": stats.slowest_statement},
            )

    async def websocket(
        self,
        serve: ASGIApp,
        scope: ASGIScope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Serve one websocket connection with figures of its own."""
        await self.counting(DatabaseStats(scope, self), serve(scope, receive, send))

    async def counting(self, stats: DatabaseStats, work: Awaitable[None]) -> None:
        """Await ``work`` with ``stats`` current; they end with it."""
        token = self.var.set(stats)
        try:
            await work
        finally:
            stats.ended = True
            self.var.reset(token)


def _connected(session: Session, bind: Any) -> bool:
    """Whether the session's transaction already has its connection for ``bind``."""
    transaction = session.get_transaction()
    return transaction is not None and bind in getattr(transaction, "_connections", ())


def _holds_connection(session: Session) -> bool:
    """Whether the session's transaction has a connection (so a COMMIT or ROLLBACK is sent)."""
    transaction = session.get_transaction()
    return transaction is not None and bool(getattr(transaction, "_connections", True))


def observed(session_args: dict[str, Any], observer: Observer) -> dict[str, Any]:
    """``session_args`` with the observer's session class over the one they would use."""
    class_ = session_args.get("class_") or default_session_class()
    base = session_args.get("sync_session_class") or class_.sync_session_class
    return {**session_args, "sync_session_class": observer.session_class(base)}


def _with_server_timing(message: Message, stats: DatabaseStats) -> Message:
    entries = [
        f'db;dur={stats.statement_time * 1000:.2f};desc="{stats.statements} '
        f'quer{"y" if stats.statements == 1 else "ies"}"'
    ]
    if stats.pool_wait:
        entries.append(f"db-pool;dur={stats.pool_wait * 1000:.2f}")
    if stats.commits:
        entries.append(f"db-commit;dur={stats.commit_time * 1000:.2f}")
    headers = list(message.get("headers", ()))
    headers.append((b"server-timing", ", ".join(entries).encode("latin-1")))
    return {**message, "headers": headers}


def _clip(statement: str, limit: int = 300) -> str:
    statement = " ".join(statement.split())
    return statement if len(statement) <= limit else statement[: limit - 1] + "…"
