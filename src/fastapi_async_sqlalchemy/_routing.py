"""Routing reads to replicas: per scope, per request, and across requests (read-your-writes).

A scope that reads from replicas gets a :class:`Route` as its session factory. The route picks
one replica the first time a statement needs a connection (so two reads in one scope never see
two points in time) and its sessions, of a :func:`routed_class`, ask it for their bind:

- a write (an ORM flush, insert/update/delete, a ``text()`` that is no SELECT, ``FOR UPDATE``)
  moves a request routed by ``replica_reads`` to the primary for the rest of the request, and is
  refused with ``ReplicaWriteError`` in ``async with db(replica=True):``;
- when the first statement finds the replica gone, the replica is marked down and the statement
  runs again elsewhere (another replica, or the primary).

Across requests, a request that committed on the primary gets a signed token (cookie or header)
holding the primary's WAL position read after its COMMIT; a later request carrying it reads from
a replica only once that replica has replayed that far (waiting ``replica_wait`` at most), and
from the primary otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import Select, TextualSelect
from sqlalchemy.util.concurrency import in_greenlet

from ._config import InvalidTypeError
from ._greenlet import await_
from ._replicas import Replica, ReplicaSet, logger, read_only_begun, token_lifetime
from ._scope import SessionFactory
from ._types import ASGIScope, Message, Receive, Send
from .exceptions import FastAPIAsyncSQLAlchemyError, InvalidConfigurationError, ReplicaWriteError

# How the middleware serves a request, given the session factory of the request's scope.
Serve = Callable[[ASGIScope, Receive, Send, SessionFactory], Awaitable[None]]

# The key of a session's ``info`` holding the router of its middleware.
ROUTER = "fastapi_async_sqlalchemy.router"

# A token position no replica reaches: the primary serves until the token expires (databases
# without comparable positions, or a position that could not be read).
UNREACHABLE = 1 << 64

# What a statement's text does, by its first word (after comments and parentheses).
_TEXT_START = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*(\w+)", re.DOTALL)
_READING_WORDS = frozenset({"SELECT", "SHOW", "EXPLAIN", "VALUES", "TABLE", "PRAGMA", "SET"})
_WRITING_WORDS = frozenset(
    {
        "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "UPSERT", "CREATE", "DROP", "ALTER",
        "TRUNCATE", "GRANT", "REVOKE", "CALL", "DO", "COPY", "LOCK", "VACUUM", "REINDEX",
        "CLUSTER", "COMMENT", "RENAME", "LOAD", "IMPORT", "REFRESH", "NOTIFY",
    }
)  # fmt: skip

WRITE_IN_REPLICA_BLOCK = (
    "`async with db(replica=True):` reads from a read replica, where nothing can be written: "
    "open `async with db():` (the primary) for the write."
)


class Route:
    """Where one scope's sessions read: a replica chosen once, or the primary."""

    __slots__ = (
        "bind",
        "choosing",
        "explicit",
        "factory",
        "parent",
        "pinned",
        "replica",
        "router",
        "traffic",
    )

    def __init__(
        self,
        router: Router,
        factory: SessionFactory,
        traffic: Traffic | None,
        *,
        explicit: bool,
        parent: Route | None = None,
    ) -> None:
        self.router = router
        self.factory = factory
        self.traffic = traffic
        self.explicit = explicit  # db(replica=True): writes are refused, not moved
        self.parent = parent  # the request's route, whose replica this one shares
        self.pinned = False  # a write was seen: the primary from now on
        self.bind: Engine | None = None
        self.replica: Replica | None = None
        # While a choice waits for a replica to catch up, the other sessions of the scope
        # (db.gather() children) wait for that choice instead of making their own.
        self.choosing: asyncio.Future[None] | None = None

    def __call__(self) -> AsyncSession:
        """A session of this route (a route is its scope's session factory)."""
        session = self.factory()
        session.sync_session._route = self  # type: ignore[attr-defined]
        return session

    def bind_for(self, session: Session, clause: Any) -> Engine:
        if self.pinned:
            return self.router.primary
        if self.parent is not None and self.parent.pinned and not self.explicit:
            self.pinned = True
            return self.router.primary
        # What cannot be told (a WITH, a connection handed out) is sent: the replica's
        # read-only transaction refuses a write, as ReplicaWriteError.
        if session._flushing or _writes(clause):
            if self.explicit:
                raise ReplicaWriteError(WRITE_IN_REPLICA_BLOCK)
            self.pin()
            return self.router.primary
        bind = self.bind
        if bind is None:
            bind = self._choose()
        return bind

    def pin(self) -> None:
        """The rest of the request goes to the primary."""
        self.pinned = True
        if self.parent is not None:
            self.parent.pinned = True
        if self.traffic is not None:
            self.traffic.wrote = True

    def _choose(self) -> Engine:
        """Choose once for the scope; concurrent callers get the same choice."""
        parent = self.parent
        if parent is not None and not parent.pinned:
            bind = parent.bind if parent.bind is not None else parent._choose()
            self.bind, self.replica = bind, parent.replica
            return bind
        while self.choosing is not None and in_greenlet():
            await_(asyncio.shield(self.choosing))  # another session of the scope is choosing
            if self.bind is not None:
                return self.bind
        replicas = self.router.replicas
        replicas.start()
        position = self.traffic.position() if self.traffic is not None else None
        replica = replicas.pick(position)
        if replica is None and position is not None and position < UNREACHABLE and in_greenlet():
            self.choosing = asyncio.get_running_loop().create_future()
            try:
                replica = await_(replicas.catch_up(position))
            finally:
                self.choosing.set_result(None)
                self.choosing = None
        self.replica = replica
        bind = self.bind = replica.reader if replica is not None else replicas.primary_reader
        return bind

    def lost_while_reading(self, error: DBAPIError, session: Session) -> bool:
        """Whether ``error`` is a replica going away under a session that only read there
        (every connection of its transaction is a replica's); if so, the replica is down."""
        if self.pinned or not error.connection_invalidated or self.router.replicas.paused:
            return False
        transaction = session.get_transaction()
        engines = list(getattr(transaction, "_connections", ()) if transaction else ())
        found = [self.router.replicas.replica_of(engine) for engine in engines]
        if not found or None in found:
            return False
        for replica in found:
            self.router.replicas.mark_down(replica, error)  # type: ignore[arg-type]
        return True

    def unreachable(self, error: BaseException, tried: Engine | None) -> bool:
        """Whether a transaction's first statement failed because the replica it tried (the
        route's choice when the statement started, or the one it made) cannot be reached; if
        so, that replica is marked down and the retry chooses again. Sessions sharing the
        route (``db.gather()`` children) that tried the same replica retry too."""
        replicas = self.router.replicas
        tried = tried or self.bind
        replica = replicas.replica_of(tried) if tried is not None else None
        if replica is None or replicas.paused:
            return False  # the primary standing in, or the testing kit's connection
        if isinstance(error, DBAPIError):
            # Refused while connecting (no statement was sent), or a connection that died; an
            # error of the statement itself is the caller's.
            if error.statement is not None and not error.connection_invalidated:
                return False
        elif not isinstance(error, OSError) or isinstance(error, FastAPIAsyncSQLAlchemyError):
            return False  # StatementTimeoutError and PoolTimeoutError are TimeoutErrors
        replicas.mark_down(replica, error)
        for route in (self, self.parent):
            if route is not None and route.bind is tried:
                route.bind = route.replica = None
        return True


def _writes(clause: Any) -> bool | None:
    """Whether a statement writes: True, False, or None when its text cannot tell."""
    if clause is None:
        return None  # a connection handed out: anything may be run on it
    if isinstance(clause, UpdateBase):
        return True
    if isinstance(clause, Select):
        return clause._for_update_arg is not None
    if isinstance(clause, TextualSelect | FromStatement):
        return _writes(clause.element)
    if isinstance(clause, TextClause):
        match = _TEXT_START.match(clause.text)
        word = match.group(1).upper() if match else ""
        if word in _READING_WORDS:
            return False
        return True if word in _WRITING_WORDS else None
    return False


_routed_classes: dict[type[Session], type[Session]] = {}


def routed_class(base: type[Session]) -> type[Session]:
    """``base`` whose sessions ask their route (if any) which engine to use."""
    routed = _routed_classes.get(base)
    if routed is not None:
        return routed

    def get_bind(self: Session, mapper: Any = None, *, clause: Any = None, **kw: Any) -> Any:
        route: Route | None = self._route  # type: ignore[attr-defined]
        if kw.get("bind") is None:
            if route is not None:
                kw["bind"] = route.bind_for(self, clause)
            else:
                router: Router | None = self.info.get(ROUTER)
                if router is not None:
                    traffic = router.replicas.traffic.get()
                    if traffic is not None:
                        traffic.saw(self._flushing or _writes(clause) is not False)
        return base.get_bind(self, mapper, clause=clause, **kw)

    def _execute_internal(self: Session, *args: Any, **kw: Any) -> Any:
        route: Route | None = self._route  # type: ignore[attr-defined]
        transaction = self.get_transaction()
        if route is None or route.pinned or (transaction is not None and transaction._connections):
            return base._execute_internal(self, *args, **kw)
        # The transaction's first statement: if the replica turns out to be gone, another
        # replica or the primary runs it, and the request never sees the failure.
        for _ in range(len(route.router.replicas.replicas)):
            tried = route.bind
            try:
                return base._execute_internal(self, *args, **kw)
            except (DBAPIError, OSError) as error:
                transaction = self.get_transaction()
                if transaction is None or transaction.origin is not _AUTOBEGIN:
                    raise
                if not route.unreachable(error, tried):
                    raise
                self.rollback()
        return base._execute_internal(self, *args, **kw)  # every replica tried: the primary

    def forgiving(method: Callable[[Session], None]) -> Callable[[Session], None]:
        def run(self: Session) -> None:
            route: Route | None = self._route  # type: ignore[attr-defined]
            try:
                method(self)
            except DBAPIError as error:
                # A COMMIT or ROLLBACK (closing rolls back) of a transaction that only read from
                # a replica, failing because the replica went away, loses nothing: SQLAlchemy
                # invalidated the connection (its pool slot is free again), what was read
                # stands, and the session is closed.
                if route is None or not route.lost_while_reading(error, self):
                    raise
                base.close(self)

        return run

    routed = _routed_classes[base] = type(
        base.__name__,
        (base,),
        {
            "_route": None,
            "get_bind": get_bind,
            "_execute_internal": _execute_internal,
            "close": forgiving(base.close),
            "commit": forgiving(base.commit),
            "__module__": base.__module__,
        },
    )
    return routed


_AUTOBEGIN = SessionTransactionOrigin.AUTOBEGIN


def routed(
    session_args: dict[str, Any], default_class: type[AsyncSession], router: Router
) -> dict[str, Any]:
    """``session_args`` whose sessions can be routed by ``router`` (in their ``info``)."""
    class_ = session_args.get("class_") or default_class
    base = session_args.get("sync_session_class") or class_.sync_session_class
    info = {**(session_args.get("info") or {}), ROUTER: router}
    return {**session_args, "sync_session_class": routed_class(base), "info": info}


def _read_only_begin(session: Session, transaction: SessionTransaction, conn: Connection) -> None:
    read_only_begun(conn)


def _committed(session: Session) -> None:
    """A session committed: what the current request wrote on the primary is durable."""
    router: Router | None = session.info.get(ROUTER)
    if router is not None:
        traffic = router.replicas.traffic.get()
        if traffic is not None and traffic.wrote:
            traffic.durable = True


# -- read-your-writes tokens -------------------------------------------------------------------


class Tokens:
    """Signed, short-lived tokens holding the primary's position after a request's commit."""

    __slots__ = ("_key", "cookie", "header", "lifetime", "name")

    def __init__(self, secret: bytes, mode: str, name: str, lifetime: float) -> None:
        self._key = secret
        self.cookie = mode == "cookie"
        self.name = name
        self.header = name.lower().encode("latin-1")
        self.lifetime = lifetime

    def issue(self, position: int | None, secure: bool) -> tuple[bytes, bytes]:
        """The response header carrying a token for ``position`` (None: primary until expiry)."""
        expires = int(time.time() + self.lifetime)
        value = f"{'-' if position is None else format(position, 'x')}.{expires}"
        token = f"{value}.{self._sign(value)}"
        if not self.cookie:
            return self.header, token.encode("latin-1")
        attributes = f"; Max-Age={int(self.lifetime)}; Path=/; HttpOnly; SameSite=Lax"
        if secure:
            attributes += "; Secure"
        return b"set-cookie", f"{self.name}={token}{attributes}".encode("latin-1")

    def read(self, scope: Mapping[str, Any]) -> int | None:
        """The position a request's token asks for; None without a valid, unexpired one."""
        token = self._find(scope)
        if token is None:
            return None
        value, _, signature = token.rpartition(".")
        position, _, expires = value.partition(".")
        if not hmac.compare_digest(signature.encode("latin-1"), self._sign(value).encode()):
            return None  # forged, damaged, or made with another secret (another database)
        try:
            if int(expires) < time.time():
                return None
            return UNREACHABLE if position == "-" else int(position, 16)
        except ValueError:
            return None

    def _find(self, scope: Mapping[str, Any]) -> str | None:
        for name, value in scope.get("headers", ()):
            if self.cookie:
                if name == b"cookie":
                    for part in value.decode("latin-1").split(";"):
                        key, _, found = part.strip().partition("=")
                        if key == self.name:
                            return str(found)
            elif name == self.header:
                return str(value.decode("latin-1"))
        return None

    def _sign(self, value: str) -> str:
        digest = hmac.new(self._key, value.encode("latin-1"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode("ascii")


class Traffic:
    """One HTTP request's routing: its route (if its reads go to replicas) and its writes."""

    __slots__ = ("_position", "_send", "durable", "route", "router", "scope", "wrote")

    def __init__(self, router: Router, scope: ASGIScope, send: Send) -> None:
        self.router = router
        self.scope = scope
        self._send = send
        self.wrote = False  # sent the primary something that may write
        self.durable = False  # and a COMMIT after it: the response gets a token
        self._position: int | bool | None = False  # False: not read yet
        reads = router.replicas.reads
        self.route: Route | None = (
            Route(router, router.factory, self, explicit=False)
            if reads is not None and reads(scope)
            else None
        )

    def saw(self, writes: bool) -> None:
        """A primary session of this request sent a statement: one that may write makes the
        request's commit worth a token, and moves the rest of a replica-routed request to the
        primary (``async with db(replica=False):`` is where writes go that cannot be told
        from reads)."""
        if writes:
            self.wrote = True
            route = self.route
            if route is not None and not route.pinned:
                route.pin()

    def position(self) -> int | None:
        """The position this request's token asks for (read once, when a route chooses)."""
        position = self._position
        if position is False:
            tokens = self.router.tokens
            position = self._position = tokens.read(self.scope) if tokens is not None else None
        return position

    async def forward(self, message: Message) -> None:
        """The request's ``send``: a response start after a commit gets the token."""
        if message["type"] == "http.response.start" and self.durable:
            tokens = self.router.tokens
            if tokens is not None:
                position = await self.router.position_after_commit()
                secure = self.scope.get("scheme") == "https"
                headers = [*message.get("headers", ()), tokens.issue(position, secure)]
                message = {**message, "headers": headers}
        await self._send(message)


class Router:
    """Routing for one middleware: its replicas, its factory and its tokens."""

    def __init__(
        self,
        replicas: ReplicaSet,
        proxy_name: str,
        read_your_writes: str | None,
        secret: str | bytes | None,
    ) -> None:
        self.replicas = replicas
        self.factory: SessionFactory = _no_factory  # the middleware's, once it is made
        self.primary = replicas.primary.sync_engine
        self.tokens: Tokens | None = None
        if read_your_writes is not None:
            name = proxy_name.replace("#", "_") + "_position"
            if read_your_writes == "header":
                name = "x-" + name.replace("_", "-")
            url = replicas.primary.url.render_as_string(hide_password=False)
            key = token_secret(secret, url, proxy_name)
            self.tokens = Tokens(key, read_your_writes, name, token_lifetime(replicas))

    async def http(self, serve: Serve, scope: ASGIScope, receive: Receive, send: Send) -> None:
        """Serve one request with its routing current (``serve`` gets the request's factory)."""
        traffic = Traffic(self, scope, send)
        var = self.replicas.traffic
        token = var.set(traffic)
        try:
            await serve(scope, receive, traffic.forward, traffic.route or self.factory)
        finally:
            var.reset(token)

    def block(self, factory: SessionFactory, replica: bool | None) -> SessionFactory:
        """The session factory of an ``async with db(replica=...):`` block."""
        if replica is False:
            return factory
        traffic = self.replicas.traffic.get()
        request_route = traffic.route if traffic is not None else None
        if replica is None:
            if request_route is None:
                return factory
            return Route(self, factory, traffic, explicit=False, parent=request_route)
        return Route(self, factory, traffic, explicit=True, parent=request_route)

    def engines(self) -> list[AsyncEngine]:
        """The replicas' engines."""
        return [replica.engine for replica in self.replicas.replicas]

    def readers(self) -> list[Engine]:
        """The engines this router's sessions read through (the testing kit mirrors them)."""
        return [replica.reader for replica in self.replicas.replicas] + [
            self.replicas.primary_reader
        ]

    async def position_after_commit(self) -> int | None:
        if self.replicas.paused:
            return None  # the testing kit's block: its replicas mirror the primary
        try:
            return await self.replicas.primary_position()
        except Exception:  # no position: the primary serves until expiry
            logger.warning(
                "Reading the primary's position after a commit failed: the client's next "
                "requests read from the primary until its read-your-writes token expires.",
                exc_info=True,
            )
            return None

    def attach(self) -> None:
        # Session events (once a process): nothing on the primary's engine.
        for name, listener in (("after_begin", _read_only_begin), ("after_commit", _committed)):
            if not event.contains(Session, name, listener):
                event.listen(Session, name, listener)
        self.replicas.attach()
        self.replicas.start()

    async def detach(self) -> None:
        self.replicas.detach()
        await self.replicas.stop()


def _no_factory() -> AsyncSession:
    raise AssertionError("the middleware sets its router's factory when it makes it")


def check_read_your_writes(mode: object, secret: object) -> None:
    """``read_your_writes`` and ``read_your_writes_secret``, checked at construction."""
    if mode not in (None, "cookie", "header"):
        raise InvalidConfigurationError(
            'read_your_writes must be "cookie", "header" or None (no read-your-writes tokens), '
            f"not {mode!r}."
        )
    if secret is not None and (not isinstance(secret, str | bytes) or len(secret) < 16):
        raise InvalidTypeError(
            "read_your_writes_secret must be a string or bytes of at least 16 characters (a "
            "random secret shared by every worker), or None to derive one from the primary's "
            "URL."
        )


def token_secret(secret: str | bytes | None, primary_url: str, proxy_name: str) -> bytes:
    """The key tokens are signed with: ``read_your_writes_secret``, else one derived from the
    primary's URL (password included) and the proxy, the same in every worker process. The
    proxy's name is in it either way, so one database's tokens mean nothing to another's."""
    if secret is None:
        secret = primary_url
    if isinstance(secret, str):
        secret = secret.encode()
    return hashlib.sha256(
        b"fastapi-async-sqlalchemy|" + proxy_name.encode() + b"|" + secret
    ).digest()
