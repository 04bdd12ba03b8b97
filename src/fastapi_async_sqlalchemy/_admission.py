"""Admission control: at most N requests at once per event loop; the rest wait, then get 503."""

from __future__ import annotations

import asyncio
import json
import weakref

from ._types import Send

_BODY = json.dumps({"detail": "The service is at its database capacity: retry shortly."}).encode()


class Admission:
    """Permits for requests, one semaphore per event loop (a semaphore is bound to its loop)."""

    __slots__ = ("_by_loop", "limit", "retry_after", "timeout")

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.retry_after = max(1, round(timeout))
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def permits(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        permits = self._by_loop.get(loop)
        if permits is None:
            permits = self._by_loop[loop] = asyncio.Semaphore(self.limit)
        return permits

    async def admit(self, permits: asyncio.Semaphore) -> bool:
        """Take a permit, waiting at most ``timeout`` seconds; False when none came in time."""
        if not permits.locked():
            await permits.acquire()  # free: returns at once
            return True
        try:
            async with asyncio.timeout(self.timeout):
                await permits.acquire()
        except TimeoutError:
            return False
        return True

    async def refuse(self, send: Send) -> None:
        """Answer 503 with ``Retry-After``, without calling the app."""
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_BODY)).encode()),
                    (b"retry-after", str(self.retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _BODY})
