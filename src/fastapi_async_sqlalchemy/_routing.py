"""Routing a scope's reads to one replica, and its writes to the primary.

A scope that reads from replicas gets a :class:`Route` as its session factory. The route picks
one replica the first time a statement needs a connection (so two reads in one scope never see
two points in time; a request carrying a read-your-writes token picks one that replayed its
position) and its sessions, of a :func:`routed_class`, ask it for their bind:

- a write (an ORM flush, insert/update/delete, a ``text()`` that starts like a write, ``FOR
  UPDATE``) moves a request routed by ``replica_reads`` to the primary for the rest of the
  request, and is refused with ``ReplicaWriteError`` in ``async with db(replica=True):``;
- when a transaction's first statement finds its replica gone, the replica is marked down and
  the statement runs again elsewhere (another replica, or the primary); a replica lost before
  its read-only transaction ended loses nothing and fails nothing.

Sessions of a replicated app that use the primary tell the request's :class:`~._router.Traffic`
when they may write, for its token.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import Select, TextualSelect
from sqlalchemy.util.concurrency import in_greenlet

from ._greenlet import await_
from ._read_only import read_only_begun
from ._scope import SessionFactory
from ._tokens import UNREACHABLE
from .exceptions import FastAPIAsyncSQLAlchemyError, ReplicaWriteError

if TYPE_CHECKING:
    from ._router import Router, Traffic

# The key of a session's ``info`` holding the router of its middleware.
ROUTER = "fastapi_async_sqlalchemy.router"

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
        self.bind: Engine | None = None  # the chosen replica's reader, or the primary's
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
            self.bind = bind
            return bind
        while self.choosing is not None and in_greenlet():
            await_(asyncio.shield(self.choosing))  # another session of the scope is choosing
            if self.bind is not None:
                return self.bind
        replicas = self.router.replicas
        replicas.start()
        position = self.traffic.position() if self.traffic is not None else None
        replica = replicas.pick(position)
        if replica is None and position is not None and position != UNREACHABLE and in_greenlet():
            self.choosing = asyncio.get_running_loop().create_future()
            try:
                replica = await_(replicas.catch_up(position))
            finally:
                self.choosing.set_result(None)
                self.choosing = None
        bind = self.bind = replica.reader if replica is not None else replicas.primary_reader
        return bind

    def lost_while_reading(self, error: DBAPIError, engines: list[Any]) -> bool:
        """Whether ``error`` is a replica going away under a session that only read there
        (``engines``, those its transaction had connections of, are all replicas'); if so, the
        replica is down."""
        if self.pinned or not error.connection_invalidated or self.router.replicas.paused:
            return False
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
                route.bind = None
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
                    # Anything that may write (a connection handed out included), once.
                    if (
                        traffic is not None
                        and not traffic.wrote
                        and (self._flushing or _writes(clause) is not False)
                    ):
                        traffic.wrote_on_primary()
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
            # Which engines the transaction holds connections of (closing detaches it first).
            transaction = self.get_transaction() if route is not None else None
            engines = [e for e in getattr(transaction, "_connections", ()) if isinstance(e, Engine)]
            try:
                method(self)
            except DBAPIError as error:
                # A COMMIT or ROLLBACK (closing rolls back) of a transaction that only read from
                # a replica, failing because the replica went away, loses nothing: SQLAlchemy
                # invalidated the connection (its pool slot is free again), what was read
                # stands, and the session is closed.
                if route is None or not route.lost_while_reading(error, engines):
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


def read_only_begin(session: Session, transaction: SessionTransaction, conn: Connection) -> None:
    read_only_begun(conn)


def committed(session: Session) -> None:
    """A session committed: what the current request wrote on the primary is durable."""
    router: Router | None = session.info.get(ROUTER)
    if router is not None:
        traffic = router.replicas.traffic.get()
        if traffic is not None and traffic.wrote:
            traffic.durable = True
