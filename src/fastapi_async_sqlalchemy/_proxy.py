"""The session proxy (``db``): the current scope's session, explicit scopes, pool status."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from ._config import (
    check_attempts,
    check_optional_seconds,
    check_positive_int,
    check_seconds,
    check_session_args,
    make_session_factory,
)
from ._deadlines import KEY as DEADLINE
from ._deadlines import install as install_deadlines
from ._deadlines import with_deadline
from ._hooks import Registered, check_callback, register, running
from ._multi import (
    MULTI_SCOPE_ENDED,
    Child,
    MultiScope,
    borrow_within,
    gather_children,
    holds_work,
    open_within,
)
from ._pool import pool_status
from ._retry import run_in_transaction
from ._router import Router
from ._scope import Scope, SessionFactory, finalize, finalize_after
from ._stats import DatabaseStats, Observer
from .exceptions import (
    InvalidConfigurationError,
    MissingSessionError,
    ProxyBindingError,
    SessionNotInitialisedError,
)

T = TypeVar("T")

_proxy_numbers = itertools.count(1)

# Every proxy, and callables told of each binding a proxy gets: what the testing kit
# (fastapi_async_sqlalchemy.testing) watches. Nothing else uses them.
proxies: weakref.WeakSet[DBSessionMeta] = weakref.WeakSet()
bind_watchers: list[Callable[[Binding], None]] = []

EXPLICIT_SCOPE_ENDED = (
    "This session belongs to an `async with db():` block that has already ended: open a new "
    "`async with db():` block where the session is needed."
)


class Binding(NamedTuple):
    """What a middleware hands its proxy: the engine, its session factory and the owner, and
    the owner's observability (``None``: none asked for)."""

    engine: AsyncEngine
    factory: async_sessionmaker[AsyncSession]
    owner: object
    observer: Observer | None = None
    router: Router | None = None  # the owner's replicas (None: none)


class DBSessionMeta:
    """A session proxy: ``db.session`` is the session of the scope the caller runs in.

    One proxy serves one database. ``fastapi_async_sqlalchemy.db`` is the default proxy; more come
    from ``create_middleware_and_session_proxy()``. The name is kept from the 0.8 releases, where
    the proxy was a class built by a metaclass; it is an ordinary object now, and
    ``isinstance(db, DBSessionMeta)`` holds.
    """

    def __init__(self) -> None:
        number = next(_proxy_numbers)
        self._var: ContextVar[Scope | None] = ContextVar(
            f"fastapi_async_sqlalchemy.scope#{number}", default=None
        )
        self._binding: Binding | None = None
        # The figures of the current request or block, when its middleware observes (_stats).
        self._stats: ContextVar[DatabaseStats | None] = ContextVar(
            f"fastapi_async_sqlalchemy.stats#{number}", default=None
        )
        self._name = "db" if number == 1 else f"db#{number}"
        proxies.add(self)

    def __repr__(self) -> str:
        state = "bound" if self._binding is not None else "unbound"
        return f"<DBSessionMeta {self._name} ({state})>"

    # -- the session of the current scope ------------------------------------------------------

    @property
    def session(self) -> AsyncSession:
        """The session of the current scope, created on first use.

        Raises ``SessionNotInitialisedError`` before any middleware bound this proxy,
        ``MissingSessionError`` outside any scope, and ``SessionFinalizedError`` after the scope
        ended (for example in a background task of the request).
        """
        scope = self._var.get()
        if scope is None:
            raise self._no_scope_error()
        session = scope.session
        if session is None:
            return scope.open()
        return session

    def _no_scope_error(self) -> Exception:
        if self._binding is None:
            return SessionNotInitialisedError()
        return MissingSessionError()

    @property
    def stats(self) -> DatabaseStats:
        """What the current request (children, ``db.gather()`` and background tasks included)
        or ``async with db():`` block did in the database so far: ``statements``,
        ``statement_time``, ``pool_wait``, ``commits``, ``commit_time`` (seconds).

        Collected when the middleware has ``stats=True`` (or ``server_timing``,
        ``slow_request_threshold``, ``n_plus_one_threshold`` or ``opentelemetry``), and until it
        is disposed; otherwise, and outside any scope, reading it raises an error that says so.
        """
        stats = self._stats.get()
        if stats is not None and not stats.ended:
            return stats
        binding = self._binding
        if binding is not None and (binding.observer is None or not binding.observer.active):
            raise InvalidConfigurationError(
                f"{self._name}.stats needs statistics collected: pass stats=True (or "
                "server_timing=True, slow_request_threshold, n_plus_one_threshold or "
                "opentelemetry=True) to the middleware, and read it before the middleware is "
                "disposed."
            )
        raise self._no_scope_error()

    @property
    def engine(self) -> AsyncEngine:
        """The engine this proxy is bound to."""
        return self._require_binding().engine

    # -- explicit scopes ---------------------------------------------------------------------

    def __call__(
        self,
        session_args: Mapping[str, Any] | None = None,
        commit_on_exit: bool = False,
        multi_sessions: bool = False,
        max_concurrent: int | None = None,
        pool_timeout: float | None = None,
        statement_timeout: float | None = None,
        replica: bool | None = None,
    ) -> ExplicitScope:
        """Open a session scope of its own: ``async with db(): ...``.

        The block's session is created on first use of ``db.session`` and, when the block ends,
        committed (with ``commit_on_exit`` and no exception) or rolled back, then closed.

        ``multi_sessions=True`` gives each task its own session (see ``db.gather()`` and
        ``db.connection()``); ``max_concurrent`` caps how many run at once; ``pool_timeout`` is
        a deadline in seconds for getting a connection (and a slot). ``statement_timeout`` has
        the database stop any statement of the block's sessions that runs longer (seconds;
        ``StatementTimeoutError``), overriding the middleware's.

        ``replica=True`` reads from one read replica of the middleware's ``replica_urls`` (or
        the primary, while none is healthy), in read-only transactions: a write raises
        ``ReplicaWriteError``. ``replica=False`` uses the primary. The default follows the
        request: a block inside a request that ``replica_reads`` sends to a replica reads from
        that same replica; elsewhere it uses the primary. Without replicas, every block uses
        the primary.
        """
        # Without multi_sessions it has no effect, as in 0.8 (there is one session anyway).
        limit = check_positive_int("max_concurrent", max_concurrent)
        args = check_session_args(session_args)
        deadline = check_optional_seconds("statement_timeout", statement_timeout)
        if deadline is not None:
            args = with_deadline(args, deadline)
        return ExplicitScope(
            self,
            args,
            bool(commit_on_exit),
            bool(multi_sessions),
            limit,
            check_optional_seconds("pool_timeout", pool_timeout),
            None if replica is None else bool(replica),
        )

    def connection(self, timeout: float | None = None) -> AbstractAsyncContextManager[AsyncSession]:
        """``async with db.connection() as session:`` a session for that block.

        In a multi-session block, a task that has no session yet gets a fresh one that takes a
        ``max_concurrent`` slot and is committed (with ``commit_on_exit``) or rolled back and
        closed when the block ends; a task that has one (inside another ``db.connection()``
        block, or taken from ``db.session``) is lent it. Elsewhere it lends the current session
        and leaves it open. Which of the two is decided when the block is entered. ``timeout``
        (default: the block's ``pool_timeout``) bounds the wait for the slot and the connection.
        """
        return Connection(self, check_optional_seconds("timeout", timeout))

    def on_commit(self, callback: Callable[[], Any], *, robust: bool = False) -> None:
        """Run ``callback`` (no arguments; sync or async) once the current data is committed.

        It binds to the innermost transaction of the session ``db.session`` gives here (a
        savepoint moves it to its parent when released, and drops it when rolled back) or, if
        that session has none yet, to its next one; it never runs if that transaction is rolled
        back. It runs right after the COMMIT, with no session of this proxy current (open
        ``async with db():`` in it to use the database). A failing callback never turns the
        commit into a failure: a request logs the error, ``async with db():`` raises
        ``CommitCallbackError`` after the commit; the callbacks after it are skipped unless it
        was registered with ``robust=True``.
        """
        check_callback(callback)
        scope = self._var.get()
        if scope is None:
            joined = running.get()
            if joined is None:
                raise self._no_scope_error()
            joined.append(Registered(callback, bool(robust), self._var))  # runs after this one
            return
        register(self.session, callback, bool(robust), self._var)

    async def run_in_transaction(
        self,
        work: Callable[..., Awaitable[T]],
        *args: Any,
        attempts: int = 3,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> T:
        """``await work(*args, **kwargs)`` in a fresh scope of this proxy, then commit; again
        after a serialization failure or a deadlock (see ``is_retryable``).

        Between attempts it waits a random time up to ``backoff * 2**(attempt - 1)`` seconds
        (at most ``max_backoff``), and starts no attempt whose wait would end past ``deadline``
        seconds from the call. When attempts or time run out, the last error propagates with a
        note saying how many attempts were made. ``on_commit`` callbacks of failed attempts
        never run. Refused (``TransactionStateError``) where this proxy's session already has
        an open transaction.
        """
        return await run_in_transaction(
            self,
            work,
            args,
            kwargs,
            attempts=check_attempts(attempts),
            backoff=check_seconds("backoff", backoff, allow_zero=True),
            max_backoff=check_seconds("max_backoff", max_backoff, allow_zero=True),
            deadline=check_optional_seconds("deadline", deadline),
        )

    def _in_transaction(self) -> bool:
        """Whether the session the current task uses here has an open transaction."""
        scope = self._var.get()
        if scope is None:
            return False
        session = (
            scope.session_of_current_task() if isinstance(scope, MultiScope) else scope.session
        )
        return session is not None and holds_work(session)

    async def gather(self, *aws: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
        """Like ``asyncio.gather()``; in a multi-session block each coroutine gets its session.

        There, each coroutine's session is finalized as soon as it finishes, so once this
        returns every one of them is committed (with ``commit_on_exit``) or rolled back. With
        ``max_concurrent`` or ``pool_timeout`` each also takes a slot, and only coroutines are
        accepted.
        """
        scope = self._var.get()
        if isinstance(scope, MultiScope):
            return await gather_children(scope, aws, return_exceptions)
        return list(await asyncio.gather(*aws, return_exceptions=return_exceptions))

    def replica_status(self) -> list[dict[str, Any]]:
        """What the last background check found of each replica (an empty list without
        replicas): ``name`` (host:port/database), ``state`` (``"healthy"``, ``"lagging"``,
        ``"down"``, ``"promoted"``, or ``"unknown"`` before the first check), ``lag_seconds``,
        ``lag_bytes`` (PostgreSQL), ``checked_at`` (a ``time.time()``) and ``error``. Reads go
        to healthy replicas only."""
        router = self._require_binding().router
        return [] if router is None else router.replicas.status()

    def pool_status(self) -> dict[str, Any]:
        """A snapshot of the pool: ``pool_class``, ``size``, ``max_overflow``, ``capacity``,
        ``checked_in``, ``checked_out``, ``available`` and ``saturation``."""
        return pool_status(self._require_binding().engine)

    # -- binding, done by the middleware -------------------------------------------------------

    def _require_binding(self) -> Binding:
        binding = self._binding
        if binding is None:
            raise SessionNotInitialisedError()
        return binding

    def _check_bindable(self, engine: AsyncEngine | None) -> None:
        """Refuse to bind ``engine`` (``None``: one yet to be created) next to a live one."""
        current = self._binding
        if current is not None and current.engine is not engine:
            raise ProxyBindingError(
                f"{self._name} is already bound to another live engine: give each database its "
                "own pair from create_middleware_and_session_proxy(), or dispose the first "
                "middleware (end its lifespan or `await middleware.dispose()`) before binding "
                "again."
            )

    def _bind(self, binding: Binding) -> None:
        self._check_bindable(binding.engine)
        self._binding = binding
        for watcher in bind_watchers:
            watcher(binding)

    def _unbind(self, owner: object) -> None:
        binding = self._binding
        if binding is not None and binding.owner is owner:
            self._binding = None

    def _factory(self, session_args: Mapping[str, Any]) -> SessionFactory:
        binding = self._require_binding()
        if not session_args:
            return binding.factory
        # The factory's own keywords hold its bind (the engine); session_args may override it.
        options = {"class_": binding.factory.class_, **binding.factory.kw, **session_args}
        if binding.router is not None and "info" in session_args:
            # The block's info goes over the middleware's, which tells its router.
            options["info"] = {**binding.factory.kw.get("info", {}), **session_args["info"]}
        return make_session_factory(options.pop("bind", binding.engine), options)


class ExplicitScope:
    """The async context manager returned by ``db(...)``.

    Entering it makes a new scope current; leaving it finalizes the scope's session and restores
    the scope that was current before. ``async with db() as x`` gives back the proxy, as 0.8 did.
    """

    __slots__ = (
        "_commit_on_exit",
        "_entered",
        "_max_concurrent",
        "_multi",
        "_pool_timeout",
        "_proxy",
        "_replica",
        "_session_args",
    )

    def __init__(
        self,
        proxy: DBSessionMeta,
        session_args: dict[str, Any],
        commit_on_exit: bool,
        multi: bool,
        max_concurrent: int | None,
        pool_timeout: float | None,
        replica: bool | None,
    ) -> None:
        self._proxy = proxy
        self._replica = replica
        self._session_args = session_args
        self._commit_on_exit = commit_on_exit
        self._multi = multi
        self._max_concurrent = max_concurrent
        self._pool_timeout = pool_timeout
        self._entered: list[
            tuple[Scope, Token[Scope | None], Token[DatabaseStats | None] | None]
        ] = []

    async def __aenter__(self) -> DBSessionMeta:
        proxy = self._proxy
        binding = proxy._require_binding()
        if DEADLINE in self._session_args.get("info", ()):
            replicas = binding.router.engines() if binding.router is not None else []
            install_deadlines(binding.engine, *replicas)
        factory = proxy._factory(self._session_args)
        if binding.router is not None:
            factory = binding.router.block(factory, self._replica)
        scope: Scope
        if self._multi:
            scope = MultiScope(
                factory,
                binding.engine,
                self._commit_on_exit,
                self._max_concurrent,
                self._pool_timeout,
            )
        else:
            scope = Scope(factory)
            if self._pool_timeout is not None:
                # The deadline is for getting a connection, so get it now.
                scope.session = await open_within(factory, binding.engine, self._pool_timeout)
        counted = None
        observer = binding.observer
        if observer is not None and observer.active and observer.current() is None:
            # A block of its own: outside a request, or in a task that outlived its request.
            counted = proxy._stats.set(DatabaseStats(None, observer))
        self._entered.append((scope, proxy._var.set(scope), counted))
        return proxy

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        scope, token, counted = self._entered.pop()
        try:
            if isinstance(scope, MultiScope):
                await scope.finish(exc, MULTI_SCOPE_ENDED)
            else:
                session = scope.end(EXPLICIT_SCOPE_ENDED)
                if session is not None:
                    if exc is None:
                        await finalize(
                            session, commit=self._commit_on_exit, raise_callback_errors=True
                        )
                    else:
                        await finalize_after(session, exc)  # the first error wins
        finally:
            restore(self._proxy._var, token, scope)
            if counted is not None:
                stats = self._proxy._stats.get()
                if stats is not None:
                    stats.ended = True
                with contextlib.suppress(ValueError):  # exited in another context
                    self._proxy._stats.reset(counted)


def restore(var: ContextVar[Scope | None], token: Token[Scope | None], scope: Scope) -> None:
    """Make the previous scope current again, even from another context than the one entered.

    An async generator closed by another task, for instance, exits its ``async with db():``
    block in that task's context, where the token is foreign.
    """
    try:
        var.reset(token)
    except ValueError:
        if var.get() is scope:
            previous = token.old_value
            var.set(None if previous is Token.MISSING else previous)


class Connection:
    """The async context manager returned by ``db.connection()``.

    On entry it looks at the scope current then: in a multi-session block, a task without a
    session of its own takes a slot and a fresh session (finalized on exit); otherwise the
    task's session is lent and left open. A context made before its task held a slot and
    entered inside one therefore never waits for its own slot.
    """

    __slots__ = ("_child", "_previous", "_proxy", "_scope", "_timeout")

    def __init__(self, proxy: DBSessionMeta, timeout: float | None) -> None:
        self._proxy = proxy
        self._timeout = timeout
        self._scope: MultiScope | None = None  # set while a slot is held
        self._child: Child | None = None
        self._previous: Child | None = None

    async def __aenter__(self) -> AsyncSession:
        proxy = self._proxy
        scope = proxy._var.get()
        if scope is None:
            raise proxy._no_scope_error()
        timeout = self._timeout
        if isinstance(scope, MultiScope):
            if timeout is None:
                timeout = scope.pool_timeout
            if not scope.lends_to_current_task():
                child, previous = await scope.enter_slot(timeout)
                self._scope, self._child, self._previous = scope, child, previous
                return scope.open()  # the new child's session (it may already hold one)
        session = proxy.session
        if timeout is not None:
            await borrow_within(session, timeout)
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        scope, child = self._scope, self._child
        if scope is None or child is None:
            return  # a lent session stays open
        self._scope = self._child = None
        await scope.leave_slot(child, self._previous, exc)
