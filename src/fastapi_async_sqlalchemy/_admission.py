"""Admission control: at most N requests at once per event loop; the rest wait, then get 503."""

from __future__ import annotations

import asyncio
import weakref

from ._responses import unavailable
from ._types import Message, Send

# The answer 0.8 gave, to the byte: clients may look for it.
_BODY = b'{"detail":"Database request capacity exhausted"}'


class Admission:
    """Permits for requests, one semaphore per event loop (a semaphore is bound to its loop)."""

    __slots__ = ("_by_loop", "limit", "timeout")

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    async def admit(self) -> Permit | None:
        """A permit, waiting at most ``timeout`` seconds for one; ``None`` when none came."""
        loop = asyncio.get_running_loop()
        permits = self._by_loop.get(loop)
        if permits is None:
            permits = self._by_loop[loop] = asyncio.Semaphore(self.limit)
        if permits.locked():
            try:
                async with asyncio.timeout(self.timeout):
                    await permits.acquire()
            except TimeoutError:
                return None
        else:
            await permits.acquire()  # free: returns at once
        return Permit(permits)

    async def refuse(self, send: Send) -> None:
        """Answer 503 with ``Retry-After``, without calling the app."""
        await unavailable(send, _BODY)


# The messages that end a response: with them the request no longer needs its permit.
_LAST = frozenset({"http.response.body", "http.response.zerocopysend"})


class Permit:
    """One admitted request's permit: given back once, when the response is complete."""

    __slots__ = ("_permits", "_send")

    def __init__(self, permits: asyncio.Semaphore) -> None:
        self._permits: asyncio.Semaphore | None = permits
        self._send: Send | None = None

    def send_through(self, send: Send) -> Send:
        """``send``, giving the permit back once the last body message has gone out."""
        self._send = send
        return self._forward

    async def _forward(self, message: Message) -> None:
        await self._send(message)  # type: ignore[misc]
        kind = message["type"]
        if kind == "http.response.pathsend" or (
            kind in _LAST and not message.get("more_body", False)
        ):
            self.release()

    def release(self) -> None:
        permits, self._permits = self._permits, None
        if permits is not None:
            permits.release()
