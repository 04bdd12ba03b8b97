"""The routing of one middleware's requests: which route a request reads by, and its token.

The middleware serves each HTTP request through :meth:`Router.http`, which makes the request's
:class:`Traffic` current: its route (when ``replica_reads`` sends its reads to a replica), the
writes it sent the primary, and its ``send``, which adds a read-your-writes token to a response
that follows a commit of such writes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from ._positions import Position
from ._replicas import ReplicaSet, logger, token_lifetime
from ._routing import Route, committed, read_only_begin
from ._scope import SessionFactory
from ._tokens import Tokens, token_secret
from ._types import ASGIScope, Message, Receive, Send

# How the middleware serves a request, given the session factory of the request's scope.
Serve = Callable[[ASGIScope, Receive, Send, SessionFactory], Awaitable[None]]


class Traffic:
    """One HTTP request's routing: its route (if its reads go to replicas) and its writes."""

    __slots__ = ("_position", "_send", "durable", "route", "router", "scope", "wrote")

    def __init__(self, router: Router, scope: ASGIScope, send: Send) -> None:
        self.router = router
        self.scope = scope
        self._send = send
        self.wrote = False  # sent the primary something that may write
        self.durable = False  # and a COMMIT after it: the response gets a token
        self._position: Position | bool | None = False  # False: not read yet
        reads = router.replicas.reads
        self.route: Route | None = (
            Route(router, router.factory, self, explicit=False)
            if reads is not None and reads(scope)
            else None
        )

    def wrote_on_primary(self) -> None:
        """A primary session of this request sent something that may write: the request's
        commit is worth a token, and the rest of a replica-routed request goes to the primary
        (``async with db(replica=False):`` is where writes go that cannot be told from
        reads). Once ``wrote`` is set, there is nothing more to learn: every write pins the
        request's route."""
        self.wrote = True
        if self.route is not None:
            self.route.pin()

    def position(self) -> Position | None:
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

    async def position_after_commit(self) -> Position | None:
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
        for name, listener in (("after_begin", read_only_begin), ("after_commit", committed)):
            if not event.contains(Session, name, listener):
                event.listen(Session, name, listener)
        self.replicas.attach()
        self.replicas.start()

    async def detach(self) -> None:
        self.replicas.detach()
        await self.replicas.stop()


def _no_factory() -> AsyncSession:
    raise AssertionError("the middleware sets its router's factory when it makes it")
