"""The answers the middleware gives itself, without calling (or instead of) the app."""

from __future__ import annotations

from ._types import Send


async def unavailable(send: Send, body: bytes) -> None:
    """Answer ``503 Service Unavailable`` with ``Retry-After: 1`` and a JSON ``body``."""
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
