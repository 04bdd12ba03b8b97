"""The demo app that `make demo` runs answers as its docstring says, on every database."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from conftest import Database, serve
from replicas import PRIMARY_URL, REPLICA_URLS, caught_up, healthy, require
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from fastapi_async_sqlalchemy import db
from fastapi_async_sqlalchemy.testing import assert_max_queries, isolated

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


async def test_demo_app_under_the_testing_kit(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo tested as its users would test it: each isolated run starts from empty tables,
    sees its own writes (the route's, the background audit's, the gathered counts), and leaves
    nothing behind; the route that lists notes is one query however many there are."""
    monkeypatch.setenv("DEMO_DATABASE_URL", database.url)
    demo = runpy.run_path(str(DEMO), run_name="demo")
    try:
        async with serve(demo["app"]) as client:  # the lifespan creates the tables, outside
            for _ in range(2):
                async with isolated():
                    assert (await client.get("/notes")).json() == []
                    for text_ in ("one", "two", "three"):
                        assert (
                            await client.post("/notes", params={"text": text_})
                        ).status_code == 201
                    with assert_max_queries(1):
                        listed = (await client.get("/notes")).json()
                    assert [note["text"] for note in listed] == ["one", "two", "three"]
                    assert (await client.get("/stats")).json() == {"notes": 3, "audit_entries": 3}
                assert db.pool_status()["checked_out"] == 0
        async with database.check.connect() as connection:
            count = await connection.execute(text("SELECT count(*) FROM demo_notes"))
            assert count.scalar_one() == 0
    finally:
        async with database.check.begin() as connection:
            await connection.execute(text("DROP TABLE IF EXISTS demo_audit"))
            await connection.execute(text("DROP TABLE IF EXISTS demo_notes"))


async def test_demo_app_on_a_primary_with_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo-replicas`: the lists read from a replica, the writer reads its note back at
    once, and under the testing kit the replicas mirror the primary."""
    require(PRIMARY_URL, *REPLICA_URLS)
    monkeypatch.setenv("DEMO_DATABASE_URL", PRIMARY_URL)
    monkeypatch.setenv("DEMO_REPLICA_URLS", ",".join(REPLICA_URLS))
    demo = runpy.run_path(str(DEMO), run_name="demo")
    check = create_async_engine(PRIMARY_URL, poolclass=NullPool)
    try:
        async with serve(demo["app"]) as client:
            await healthy(db)
            await caught_up(REPLICA_URLS)  # the tables the lifespan created
            assert [s["state"] for s in (await client.get("/replicas")).json()] == [
                "healthy",
                "healthy",
            ]
            for text_ in ("one", "two"):
                assert (await client.post("/notes", params={"text": text_})).status_code == 201
                listed = (await client.get("/notes")).json()  # with the write's token
                assert listed[-1]["text"] == text_
            client.cookies.clear()
            async with isolated():
                assert (await client.post("/notes", params={"text": "three"})).status_code == 201
                listed = (await client.get("/notes")).json()
                assert [note["text"] for note in listed] == ["one", "two", "three"]
                assert (await client.get("/stats")).json() == {"notes": 3, "audit_entries": 3}
            assert [note["text"] for note in (await client.get("/notes")).json()][-1] == "two"
            assert db.pool_status()["checked_out"] == 0
    finally:
        async with check.begin() as connection:
            await connection.execute(text("DROP TABLE IF EXISTS demo_audit"))
            await connection.execute(text("DROP TABLE IF EXISTS demo_notes"))
        await check.dispose()
