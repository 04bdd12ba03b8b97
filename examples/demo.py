"""A small notes service showing the main patterns; runs on SQLite with no server.

    make demo                 # or: python examples/demo.py
    curl -X POST 'http://127.0.0.1:8000/notes?text=hello'
    curl http://127.0.0.1:8000/notes
    curl http://127.0.0.1:8000/stats

DEMO_DATABASE_URL picks another database (e.g. postgresql+asyncpg://postgres@127.0.0.1/test).
DEMO_REPLICA_URLS (comma-separated) adds read replicas: GET and HEAD requests read from them,
and a client that wrote reads its writes back. `make demo-replicas` runs the demo on a local
PostgreSQL primary with two streaming replicas (scripts/replicas.sh makes them):

    curl -c jar -b jar -X POST 'http://127.0.0.1:8000/notes?text=hello'
    curl -c jar -b jar http://127.0.0.1:8000/notes    # the token in `jar` reads the write back
    curl http://127.0.0.1:8000/replicas
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import BackgroundTasks, FastAPI, HTTPException
from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db

DATABASE_URL = os.environ.get("DEMO_DATABASE_URL", "sqlite+aiosqlite:///demo.sqlite3")
REPLICA_URLS = [url for url in os.environ.get("DEMO_REPLICA_URLS", "").split(",") if url]


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "demo_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


class AuditEntry(Base):
    __tablename__ = "demo_audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    note_id: Mapped[int]
    action: Mapped[str] = mapped_column(String(20))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Outside a request there is no request session: open one explicitly.
    async with db(commit_on_exit=True):
        connection = await db.session.connection()
        await connection.run_sync(Base.metadata.create_all)
    yield


app = FastAPI(title="fastapi-async-sqlalchemy demo", lifespan=lifespan)
# Commit each request's work when it answers below 400; roll back otherwise.
# With replicas, GET and HEAD requests read from one of them (writes move to the primary).
replicas: dict[str, Any] = (
    {"replica_urls": REPLICA_URLS, "replica_reads": ["GET", "HEAD"]} if REPLICA_URLS else {}
)
app.add_middleware(SQLAlchemyMiddleware, db_url=DATABASE_URL, commit_on_exit=True, **replicas)


async def audit(note_id: int, action: str) -> None:
    # Background tasks run after the response: they open their own session.
    async with db(commit_on_exit=True):
        db.session.add(AuditEntry(note_id=note_id, action=action))


@app.post("/notes", status_code=201)
async def create_note(text: str, background: BackgroundTasks) -> dict[str, Any]:
    if not text.strip():
        raise HTTPException(status_code=422, detail="text must not be blank")
    note = Note(text=text)
    db.session.add(note)
    await db.session.flush()  # assigns note.id; the commit comes before the response
    background.add_task(audit, note.id, "created")
    return {"id": note.id, "text": note.text}


@app.get("/notes")
async def list_notes() -> list[dict[str, Any]]:
    notes = await db.session.scalars(select(Note).order_by(Note.id))
    return [{"id": note.id, "text": note.text} for note in notes]


@app.delete("/notes/{note_id}", status_code=204)
async def delete_note(note_id: int) -> None:
    note = await db.session.get(Note, note_id)
    if note is None:
        raise HTTPException(status_code=404, detail="no such note")
    await db.session.delete(note)


@app.get("/stats")
async def stats() -> dict[str, int]:
    # Independent queries at the same time: each coroutine gets its own session.
    async def count(model: type[Base]) -> int:
        return (await db.session.scalar(select(func.count()).select_from(model))) or 0

    async with db(multi_sessions=True, max_concurrent=2):
        notes, audits = await db.gather(count(Note), count(AuditEntry))
    return {"notes": notes, "audit_entries": audits}


@app.get("/replicas")
async def replica_status() -> list[dict[str, Any]]:
    # What the background checks found: state, lag in seconds and bytes (empty: no replicas).
    return db.replica_status()


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
