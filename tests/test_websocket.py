"""A websocket connection's session: lazy, kept for the connection, finalized when it ends."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import pytest
from conftest import Database, make_app, new_item, serve, websocket_scope
from fastapi import WebSocket, WebSocketDisconnect
from sqlalchemy import event

pytestmark = pytest.mark.anyio


async def exchange(app: Any, path: str, *texts: str) -> list[dict[str, Any]]:
    """Connect to ``path``, send ``texts``, disconnect; return what the app sent back."""
    incoming = [
        {"type": "websocket.connect"},
        *({"type": "websocket.receive", "text": text} for text in texts),
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(websocket_scope(path), receive, send)
    return sent


@pytest.mark.parametrize("commit_on_exit", [True, False])
@pytest.mark.parametrize("raises", [False, True])
async def test_websocket_writes_are_committed_only_when_the_handler_succeeds(
    database: Database, commit_on_exit: bool, raises: bool
) -> None:
    """A websocket handler's write commits with commit_on_exit and a normal return, never else."""
    app, db = make_app(database, commit_on_exit=commit_on_exit)

    @app.websocket("/ws")
    async def store(websocket: WebSocket) -> None:
        await websocket.accept()
        name = await websocket.receive_text()
        await db.session.execute(new_item(name))
        await websocket.send_text(f"stored {name}")
        if raises:
            raise RuntimeError("handler failed")
        with suppress(WebSocketDisconnect):
            await websocket.receive_text()

    async with serve(app):
        if raises:
            with pytest.raises(RuntimeError, match="handler failed"):
                await exchange(app, "/ws", "hello")
        else:
            sent = await exchange(app, "/ws", "hello")
            assert [message["type"] for message in sent] == ["websocket.accept", "websocket.send"]
            assert sent[1]["text"] == "stored hello"
        assert db.engine.pool.checkedout() == 0

    assert await database.names() == (["hello"] if commit_on_exit and not raises else [])


async def test_websocket_that_never_touches_the_database_checks_out_no_connection(
    database: Database,
) -> None:
    """No session and no connection for a websocket handler that does not read db.session."""
    app, db = make_app(database, commit_on_exit=True)
    connects: list[object] = []

    @app.websocket("/echo")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    async with serve(app):
        event.listen(db.engine.sync_engine, "checkout", lambda *args: connects.append(args))
        sent = await exchange(app, "/echo", "ping")

    assert [message.get("text") for message in sent] == [None, "ping", None]
    assert connects == []


async def test_websocket_session_lasts_for_the_whole_connection(database: Database) -> None:
    """Every message of one connection uses the same session, committed once at the end."""
    app, db = make_app(database, commit_on_exit=True)
    sessions: list[Any] = []
    committed_meanwhile: list[list[str]] = []

    @app.websocket("/ws")
    async def store(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                name = await websocket.receive_text()
                sessions.append(db.session)
                await db.session.execute(new_item(name))
                committed_meanwhile.append(await database.names())
        except WebSocketDisconnect:
            pass

    async with serve(app):
        await exchange(app, "/ws", "first", "second")
        assert db.engine.pool.checkedout() == 0

    assert len(sessions) == 2
    assert sessions[0] is sessions[1]
    assert committed_meanwhile == [[], []]
    assert await database.names() == ["first", "second"]
