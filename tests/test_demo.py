"""The demo app that `make demo` runs answers as its docstring says, on every database."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from conftest import Database, serve
from sqlalchemy import text

from fastapi_async_sqlalchemy import db

pytestmark = pytest.mark.anyio

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


async def test_demo_app_creates_lists_counts_and_deletes_notes(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notes are created (with an audit entry from a background task), listed, counted, deleted."""
    monkeypatch.setenv("DEMO_DATABASE_URL", database.url)
    demo = runpy.run_path(str(DEMO), run_name="demo")
    try:
        async with serve(demo["app"]) as client:
            created = await client.post("/notes", params={"text": "hello"})
            assert created.status_code == 201
            note_id = created.json()["id"]
            assert (await client.post("/notes", params={"text": " "})).status_code == 422
            assert (await client.get("/notes")).json() == [{"id": note_id, "text": "hello"}]
            assert (await client.get("/stats")).json() == {"notes": 1, "audit_entries": 1}
            assert (await client.delete(f"/notes/{note_id}")).status_code == 204
            assert (await client.delete(f"/notes/{note_id}")).status_code == 404
            assert (await client.get("/notes")).json() == []
            assert db.pool_status()["checked_out"] == 0
    finally:
        async with database.check.begin() as connection:
            await connection.execute(text("DROP TABLE IF EXISTS demo_audit"))
            await connection.execute(text("DROP TABLE IF EXISTS demo_notes"))
