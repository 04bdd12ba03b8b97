"""How a request's scope is opened, and how its session is finalized before the response.

The request's session is created lazily (a request that never reads ``db.session`` gets none).
If one was created, ``http.response.start`` is held back until the final body chunk (or
``http.response.pathsend``) arrives; the session is finalized then and only then is the response
forwarded, so a failed commit can never reach the client as a success.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ._responses import unavailable
from ._scope import Scope, SessionFactory, finalize, finalize_after, owner_holds_transaction
from ._types import Message, Send
from .exceptions import StatementTimeoutError

REQUEST_SCOPE_ENDED = (
    "The request's session was finalized before its response was sent: background tasks, "
    "streaming bodies and dependency teardowns that need the database must open their own "
    "session with `async with db():`."
)

# Messages that carry (the start of) the body: the response cannot wait past the first of them.
_BODY_MESSAGES = frozenset(
    {"http.response.body", "http.response.pathsend", "http.response.zerocopysend"}
)

WEBSOCKET_SCOPE_ENDED = (
    "The websocket connection's session was finalized when the connection ended: open a new "
    "session with `async with db():` where it is needed."
)


# The answer to a request whose statement ran past statement_timeout, instead of a bare 500.
_TIMED_OUT_BODY = b'{"detail":"A database statement took too long: retry shortly."}'


async def _discard(message: Message) -> None:
    """Where the app's own messages go once another answer was sent instead."""


class RequestScope(Scope):
    """The scope of one HTTP request; its :meth:`send` wraps the server's ``send``."""

    __slots__ = ("_commit_on_exit", "_forwarding", "_held", "_send", "_should_commit")

    def __init__(
        self,
        factory: SessionFactory,
        send: Send,
        commit_on_exit: bool,
        should_commit: Callable[[int], bool],
    ) -> None:
        super().__init__(factory)
        self._send = send
        self._held: Message | None = None  # http.response.start, while the session is open
        self._forwarding = False  # the response is on its way: pass every message through
        self._commit_on_exit = commit_on_exit
        self._should_commit = should_commit

    async def send(self, message: Message) -> None:
        if self._forwarding:
            await self._send(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            if self.session is None:
                # Nothing to finalize: end the scope and let the response through untouched.
                self.end(REQUEST_SCOPE_ENDED)
                self._forwarding = True
                await self._send(message)
            else:
                self._held = message
            return
        if kind in _BODY_MESSAGES:
            await self._respond()
        await self._send(message)

    async def _respond(self) -> None:
        """The body starts: finalize the session, then release the held response start."""
        held, self._held = self._held, None
        self._forwarding = True
        session = self.session
        if session is not None and owner_holds_transaction(session):
            # Left to the code that began it; app_returned() makes sure it was ended.
            pass
        else:
            self.end(REQUEST_SCOPE_ENDED)
            if session is not None:
                commit = self._commit_on_exit and held is not None
                if commit:
                    commit = self._should_commit(held["status"])  # type: ignore[index]
                await finalize(session, commit=commit)
        if held is None:
            return
        if held["status"] == 500 and isinstance(sys.exception(), StatementTimeoutError):
            # The error response of a statement stopped by statement_timeout (say from
            # Starlette's ServerErrorMiddleware, which sends it while handling the error).
            await self._answer_timed_out()
        else:
            await self._send(held)

    async def _answer_timed_out(self) -> None:
        """Answer 503 with ``Retry-After``; whatever the app sends after that is dropped."""
        send, self._send = self._send, _discard
        self._forwarding = True
        await unavailable(send, _TIMED_OUT_BODY)

    async def app_raised(self, error: BaseException) -> None:
        """The app raised ``error``: roll back and close; a held response start is dropped.

        ``error`` stays the one that propagates: a failing rollback is only reported. When it
        is a ``StatementTimeoutError`` and no response has started, the client gets a 503.
        """
        self._held = None
        session = self.end(REQUEST_SCOPE_ENDED)
        if session is not None:
            await finalize_after(session, error)
        if isinstance(error, StatementTimeoutError) and not self._forwarding:
            await self._answer_timed_out()

    async def app_returned(self) -> None:
        """The app returned: anything still open (no response sent, or a transaction its owner
        never ended) is rolled back, since no response can report it any more."""
        session = self.end(REQUEST_SCOPE_ENDED)
        if session is not None:
            await finalize(session, commit=False)
        held, self._held = self._held, None
        if held is not None:
            await self._send(held)
