"""The session proxy (``db``): the current scope's session, explicit scopes, pool status."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, NamedTuple

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from ._config import check_session_args, make_session_factory
from ._scope import Scope, SessionFactory, finalize
from .exceptions import MissingSessionError, ProxyBindingError, SessionNotInitialisedError

_proxy_numbers = itertools.count(1)

EXPLICIT_SCOPE_ENDED = (
    "This session belongs to an `async with db():` block that has already ended: open a new "
    "`async with db():` block where the session is needed."
)


class Binding(NamedTuple):
    """What a middleware hands its proxy: the engine, its session factory and the owner."""

    engine: AsyncEngine
    factory: async_sessionmaker[AsyncSession]
    owner: object


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
        self._name = "db" if number == 1 else f"db#{number}"

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
    ) -> ExplicitScope:
        """Open a session scope of its own: ``async with db(): ...``.

        The block's session is created on first use of ``db.session`` and, when the block ends,
        committed (with ``commit_on_exit`` and no exception) or rolled back, then closed.
        """
        return ExplicitScope(self, check_session_args(session_args), bool(commit_on_exit))

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

    def _unbind(self, owner: object) -> None:
        binding = self._binding
        if binding is not None and binding.owner is owner:
            self._binding = None

    def _factory(self, session_args: Mapping[str, Any]) -> SessionFactory:
        binding = self._require_binding()
        if not session_args:
            return binding.factory
        options = {"class_": binding.factory.class_, **binding.factory.kw, **session_args}
        options.pop("bind", None)
        return make_session_factory(binding.engine, options)


class ExplicitScope:
    """The async context manager returned by ``db(...)``.

    Entering it makes a new scope current; leaving it finalizes the scope's session and restores
    the scope that was current before. ``async with db() as x`` gives back the proxy, as 0.8 did.
    """

    __slots__ = ("_commit_on_exit", "_entered", "_proxy", "_session_args")

    def __init__(
        self, proxy: DBSessionMeta, session_args: dict[str, Any], commit_on_exit: bool
    ) -> None:
        self._proxy = proxy
        self._session_args = session_args
        self._commit_on_exit = commit_on_exit
        self._entered: list[tuple[Scope, Token[Scope | None]]] = []

    async def __aenter__(self) -> DBSessionMeta:
        scope = Scope(self._proxy._factory(self._session_args))
        self._entered.append((scope, self._proxy._var.set(scope)))
        return self._proxy

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        scope, token = self._entered.pop()
        try:
            session = scope.end(EXPLICIT_SCOPE_ENDED)
            if session is not None:
                await finalize(session, commit=self._commit_on_exit and exc_type is None)
        finally:
            restore(self._proxy._var, token, scope)


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
