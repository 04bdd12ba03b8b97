"""A minimal in-process ASGI driver: no sockets, no HTTP parsing, no test-client machinery.

It calls the app directly with an HTTP scope, hands it an empty request body, and collects the
response. Whatever it costs is the same for every contender, and it adds as little as possible
on top of the app, so differences between contenders stand out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

Message = MutableMapping[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]

_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


class Exchange:
    """One request/response exchange."""

    __slots__ = ("_done", "_requested", "body", "status")

    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self._requested = False
        self._done: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        if not self._requested:
            self._requested = True
            return dict(_REQUEST)
        # Asked again (a disconnect listener): wait until the response is complete.
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        await self._done
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body":
            self.body += message.get("body", b"")
            if not message.get("more_body", False) and self._done is not None:
                self._done.set_result(None)


def http_scope(method: str, path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-length", b"0")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


async def request(app: ASGIApp, scope: dict[str, Any]) -> Exchange:
    """Send one request through ``app``; ``scope`` is copied (apps write into it)."""
    exchange = Exchange()
    request_scope = scope.copy()
    request_scope["state"] = {}
    await app(request_scope, exchange.receive, exchange.send)
    return exchange


async def serve(app: ASGIApp, scope: dict[str, Any], count: int, concurrency: int = 1) -> None:
    """Send ``count`` requests through ``app``, ``concurrency`` at a time; any status but 200
    raises."""

    async def serial(n: int) -> None:
        for _ in range(n):
            exchange = await request(app, scope)
            if exchange.status != 200:
                raise RuntimeError(
                    f"{scope['path']}: HTTP {exchange.status} {exchange.body[:300]!r}"
                )

    if concurrency == 1:  # no task per batch: the serial timings stay as they are
        await serial(count)
    else:
        per_task, extra = divmod(count, concurrency)
        await asyncio.gather(*(serial(per_task + (i < extra)) for i in range(concurrency)))


@asynccontextmanager
async def lifespan(app: ASGIApp):  # type: ignore[no-untyped-def]
    """Run the app's ASGI lifespan: startup on entry, shutdown on exit."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    message = await from_app.get()
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup failed: {message}")
    try:
        yield scope["state"]
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        message = await from_app.get()
        await task
        if message["type"] != "lifespan.shutdown.complete":
            raise RuntimeError(f"lifespan shutdown failed: {message}")
