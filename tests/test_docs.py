"""Every Python example in the README and in docs/ runs, and does what the text around it says.

An example is a ```python block preceded by ``<!-- test: NAME -->``; ``CHECKS[NAME]`` runs it
(SQLite files are moved into the test's temporary directory) and checks what it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import serve, unused_app
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from replicas import BOUNCER_URL, PRIMARY_URL, REPLICA_URLS, caught_up, healthy, require
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db
from fastapi_async_sqlalchemy.testing import isolated

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKED = re.compile(r"<!-- test: (?P<name>[\w-]+) -->\n```python\n(?P<code>.*?)```", re.S)
SQLITE_FILE = re.compile(r"sqlite\+aiosqlite:///(?P<file>[\w.]+)")


def examples() -> dict[str, str]:
    found: dict[str, str] = {}
    for page in PAGES:
        for match in MARKED.finditer(page.read_text()):
            assert match["name"] not in found, f"example name {match['name']} used twice"
            found[match["name"]] = match["code"]
    return found


def run_example(name: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Execute the example; return its namespace and what it printed."""
    code = SQLITE_FILE.sub(
        lambda m: f"sqlite+aiosqlite:///{tmp_path / m['file']}", examples()[name]
    )
    # A module of its own, as a file of the reader's would be (Pydantic's generic models look
    # their module up in sys.modules).
    module = types.ModuleType(f"docs_example_{name.replace('-', '_')}")
    sys.modules[module.__name__] = module
    namespace: dict[str, Any] = module.__dict__
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"<example {name}>", "exec", dont_inherit=True), namespace)
    return namespace, printed.getvalue()


async def execute(*statements: str) -> None:
    async with db(commit_on_exit=True):
        for statement in statements:
            await db.session.execute(text(statement))


async def scalar(statement: str) -> Any:
    async with db():
        return (await db.session.execute(text(statement))).scalar()


# -- the checks, one per example ------------------------------------------------------------------


async def check_quickstart(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        async with db(commit_on_exit=True):
            connection = await db.session.connection()
            await connection.run_sync(ns["Base"].metadata.create_all)
        created = await client.post("/users", params={"name": "ann"})
        assert created.status_code == 201
        user_id = created.json()["id"]
        assert (await client.get(f"/users/{user_id}")).json() == {"name": "ann"}
        assert (await client.get("/users/999")).status_code == 404
        assert (await client.post("/users", params={"name": "ann"})).status_code == 500
        assert (await client.get("/users")).json() == ["ann"]


async def check_outside_a_request(ns: dict[str, Any], printed: str) -> None:
    assert printed.split() == ["1"]


async def check_background_task(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute("CREATE TABLE visits (page TEXT)")
        assert (await client.get("/pages/home")).json() == {"page": "home"}
        assert await scalar("SELECT page FROM visits") == "home"


async def check_gather(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute(
            "CREATE TABLE users (name TEXT)",
            "CREATE TABLE orders (item TEXT)",
            "INSERT INTO orders VALUES ('book')",
        )
        assert (await client.get("/dashboard")).json() == {"users": 0, "orders": 1}


async def check_several_databases(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        async with ns["archive"](commit_on_exit=True):
            await ns["archive"].session.execute(text("CREATE TABLE old_orders (id INTEGER)"))
        assert (await client.get("/sizes")).json() == {"primary": 0, "archive": 1}


async def check_status_rule(ns: dict[str, Any], printed: str) -> None:
    app = ns["app"]

    @app.get("/moved")
    async def moved() -> Any:
        from fastapi.responses import RedirectResponse

        await db.session.execute(text("INSERT INTO log VALUES ('moved')"))
        return RedirectResponse("/elsewhere", status_code=302)

    async with serve(app) as client:
        await execute("CREATE TABLE log (entry TEXT)")
        assert (await client.get("/moved", follow_redirects=False)).status_code == 302
        assert await scalar("SELECT count(*) FROM log") == 0


async def check_streaming(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute("CREATE TABLE users (name TEXT)", "INSERT INTO users VALUES ('bo'), ('al')")
        assert (await client.get("/export")).text == "al\nbo\n"


async def check_yield_dependency(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute("CREATE TABLE orders (item TEXT)")
        assert (await client.post("/orders")).status_code == 201
        assert await scalar("SELECT item FROM orders") == "book"


async def check_plain(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute("CREATE TABLE users (name TEXT)", "CREATE TABLE orders (item TEXT)")
        assert (await client.get("/report")).json() == {"users": 0, "orders": 0}


async def check_multi(ns: dict[str, Any], printed: str) -> None:
    assert printed.split() == ["3"]


async def check_throttled(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        assert (await client.get("/quote")).json() == {"total": 1.5 * sum(range(50))}
        assert db.pool_status()["checked_out"] == 0


async def check_pool_status(ns: dict[str, Any], printed: str) -> None:
    assert "'capacity': 4" in printed
    assert "'saturation': 0.0" in printed


async def check_dispose(ns: dict[str, Any], printed: str) -> None:
    assert printed.split() == ["1"]


async def check_testing(ns: dict[str, Any], printed: str) -> None:
    await asyncio.to_thread(ns["test_with_testclient"])
    await ns["test_with_httpx"]()


async def check_admission(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}


async def check_on_commit(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute("CREATE TABLE users (name TEXT UNIQUE)")
        assert (await client.post("/users", params={"name": "ann"})).status_code == 201
        assert ns["outbox"] == ["welcome, ann"]
        # A second sign-up with the same name fails its INSERT: no e-mail for it.
        assert (await client.post("/users", params={"name": "ann"})).status_code == 500
        assert ns["outbox"] == ["welcome, ann"]


async def check_on_commit_errors(ns: dict[str, Any], printed: str) -> None:
    assert printed.split() == ["ConnectionError", "42"]


async def check_run_in_transaction(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER)",
            "INSERT INTO accounts VALUES (1, 100), (2, 0)",
        )
        moved = await client.post("/transfers", params={"source": 1, "target": 2, "amount": 30})
        assert moved.json() == {"balance": 70}
        refused = await client.post("/transfers", params={"source": 2, "target": 1, "amount": 99})
        assert refused.status_code == 500
        assert await scalar("SELECT balance FROM accounts WHERE id = 2") == 30


async def check_statement_timeout(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        response = await client.get("/report")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        await execute(
            "CREATE TABLE report_cache (line TEXT)", "INSERT INTO report_cache VALUES ('x')"
        )
        await ns["nightly_rebuild"]()
        assert await scalar("SELECT count(*) FROM report_cache") == 0


async def check_assert_num_queries(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]):
        await execute("CREATE TABLE tags (name TEXT)", "INSERT INTO tags VALUES ('red'), ('blue')")
        await ns["test_tags_are_one_query"]()


async def check_isolation_fastapi(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute(
            "CREATE TABLE plans (name TEXT)", "CREATE TABLE users (name TEXT UNIQUE, plan TEXT)"
        )
        async with isolated():
            await ns["test_signup"](None, client)
        async with isolated():
            await ns["test_the_next_test_starts_clean"](None, client)
        assert await scalar("SELECT count(*) FROM plans") == 0
        assert await scalar("SELECT count(*) FROM users") == 0


async def check_isolation_starlette(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]):
        await execute("CREATE TABLE notes (body TEXT)")
        await ns["test_notes"]()
        assert await scalar("SELECT count(*) FROM notes") == 0


async def check_capture_on_commit(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]):
        await execute("CREATE TABLE orders (item TEXT)")
        await ns["test_the_confirmation_waits_for_the_commit"]()
        assert await scalar("SELECT count(*) FROM orders") == 0


async def check_stats(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        figures = (await client.get("/report")).json()
    assert figures["statements"] == 2
    assert figures["milliseconds"] > 0


async def check_server_timing(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute("CREATE TABLE visits (id INTEGER PRIMARY KEY)")
        response = await client.post("/visits")
    timing = response.headers["server-timing"]
    assert re.fullmatch(
        r'db;dur=[\d.]+;desc="1 query"(, db-pool;dur=[\d.]+)?, db-commit;dur=[\d.]+', timing
    )


async def check_n_plus_one(ns: dict[str, Any], printed: str) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("fastapi_async_sqlalchemy")
    logger.addHandler(handler)
    try:
        async with serve(ns["app"]) as client:
            async with db(commit_on_exit=True):
                connection = await db.session.connection()
                await connection.run_sync(ns["Base"].metadata.create_all)
                for number in range(1, 21):
                    db.session.add(ns["Author"](id=number, books=[ns["Book"](id=number)]))
            assert (await client.get("/authors")).json() == [1] * 20
    finally:
        logger.removeHandler(handler)
    [record] = [record for record in records if "N+1" in record.getMessage()]
    assert "GET /authors" in record.getMessage()
    assert "FROM books WHERE" in record.getMessage()


async def check_opentelemetry(ns: dict[str, Any], printed: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with pytest.MonkeyPatch.context() as patch:  # this test only: the suite keeps the no-op
        patch.setattr(trace, "get_tracer_provider", lambda: provider)
        async with serve(ns["app"]) as client:
            await execute("CREATE TABLE orders (item TEXT)")
            assert (await client.post("/orders")).status_code == 200
    names = sorted(span.name for span in exporter.get_finished_spans())
    assert names.count("session") == 2  # the table's block, the request
    assert names.count("COMMIT") == 2
    provider.shutdown()


async def check_recipe_depends(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute("CREATE TABLE tags (name TEXT UNIQUE)")
        assert (await client.post("/tags/red")).status_code == 200
        assert (await client.post("/tags/blue")).status_code == 200
        assert (await client.get("/tags")).json() == ["blue", "red"]


async def check_recipe_worker(ns: dict[str, Any], printed: str) -> None:
    await ns["on_startup"]({})
    try:
        await execute(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, invoiced INTEGER DEFAULT 0)",
            "INSERT INTO orders (id) VALUES (1), (2)",
        )
        await ns["send_invoice"]({}, 1)
        assert await scalar("SELECT group_concat(invoiced) FROM orders") == "1,0"
    finally:
        await ns["on_shutdown"]({})


ALEMBIC_ENV = """
from alembic import context

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
"""

ALEMBIC_VERSION = """
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table("accounts", sa.Column("id", sa.Integer, primary_key=True))
"""


async def check_recipe_alembic(ns: dict[str, Any], printed: str) -> None:
    with tempfile.TemporaryDirectory() as where:
        await _migrate_at_startup(ns, Path(where))


async def _migrate_at_startup(ns: dict[str, Any], folder: Path) -> None:
    (folder / "migrations" / "versions").mkdir(parents=True)
    (folder / "alembic.ini").write_text(f"[alembic]\nscript_location = {folder / 'migrations'}\n")
    (folder / "migrations" / "env.py").write_text(ALEMBIC_ENV)
    (folder / "migrations" / "script.py.mako").write_text("")
    (folder / "migrations" / "versions" / "0001_accounts.py").write_text(ALEMBIC_VERSION)
    with contextlib.chdir(folder):  # alembic.ini is found where the app starts
        async with serve(ns["app"]):
            assert await scalar("SELECT version_num FROM alembic_version") == "0001"
            assert await scalar("SELECT count(*) FROM accounts") == 0


async def check_recipe_pagination(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute(
            "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT)",
            "INSERT INTO books (title) VALUES ('a'), ('b'), ('c')",
        )
        page = (await client.get("/books", params={"page": 2, "size": 2})).json()
    assert page["total"] == 3
    assert page["items"] == [{"id": 3, "title": "c"}]


async def check_recipe_sqlmodel(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        async with db(commit_on_exit=True):
            connection = await db.session.connection()
            await connection.run_sync(ns["Hero"].__table__.create)
        created = (await client.post("/heroes", json={"name": "Deadpond"})).json()
        assert created == {"id": 1, "name": "Deadpond"}
        assert (await client.get("/heroes")).json() == [{"id": 1, "name": "Deadpond"}]


async def check_recipe_tenants(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        for tenant_db in ns["tenants"].values():
            async with tenant_db(commit_on_exit=True):
                await tenant_db.session.execute(text("CREATE TABLE notes (body TEXT)"))
        await client.post("/notes", params={"body": "for acme"}, headers={"x-tenant": "acme"})
        assert (await client.get("/notes", headers={"x-tenant": "acme"})).json() == ["for acme"]
        assert (await client.get("/notes", headers={"x-tenant": "globex"})).json() == []
        assert (await client.get("/notes", headers={"x-tenant": "initech"})).status_code == 404


async def check_recipe_streaming(ns: dict[str, Any], printed: str) -> None:
    async with serve(ns["app"]) as client:
        await execute(
            "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)",
            "INSERT INTO people (name) VALUES ('ada'), ('grace')",
        )
        response = await client.get("/export.csv")
    assert response.text == "id,name\n1,ada\n2,grace\n"


async def check_errors(ns: dict[str, Any], printed: str) -> None:
    assert "async with db():" in printed


async def _notes_table(create: bool) -> None:
    """The ``notes`` table of the scaling examples, on the local primary, replayed."""
    require(PRIMARY_URL, *REPLICA_URLS)
    engine = create_async_engine(PRIMARY_URL, poolclass=NullPool)
    async with engine.begin() as connection:
        await connection.execute(text("DROP TABLE IF EXISTS notes"))
        if create:
            await connection.execute(text("CREATE TABLE notes (id serial PRIMARY KEY, body text)"))
            await connection.execute(text("INSERT INTO notes (body) VALUES ('first')"))
    await engine.dispose()
    await caught_up(REPLICA_URLS)


async def check_scaling_replicas(ns: dict[str, Any], printed: str) -> None:
    await _notes_table(True)
    try:
        async with serve(ns["app"]) as client:
            await healthy(db)
            assert [s["state"] for s in (await client.get("/health/replicas")).json()] == [
                "healthy",
                "healthy",
            ]
            assert (await client.get("/notes")).json() == {
                "notes": ["first"],
                "from_replica": True,
            }
            added = await client.post("/notes", params={"body": "second"})
            assert added.headers["set-cookie"].startswith("db_position=")
            # The writer reads its note back at once, wherever it can be read.
            assert (await client.get("/notes")).json()["notes"] == ["first", "second"]
    finally:
        await _notes_table(False)


async def check_scaling_replica_block(ns: dict[str, Any], printed: str) -> None:
    await _notes_table(True)
    middleware = SQLAlchemyMiddleware(
        unused_app, db_url=PRIMARY_URL, replica_urls=REPLICA_URLS, replica_check_interval=0.05
    )
    try:
        await healthy(db)
        assert await ns["nightly_report"]() == 1
        refusal = await ns["misplaced_write"]()
        assert "open `async with db():`" in refusal
        assert await scalar("SELECT count(*) FROM notes") == 1
    finally:
        await middleware.dispose()
        await _notes_table(False)


async def check_scaling_pgbouncer(ns: dict[str, Any], printed: str) -> None:
    require(BOUNCER_URL)
    async with serve(ns["app"]):
        for _ in range(20):  # many transactions over PgBouncer's few server connections
            async with db(commit_on_exit=True):
                assert await db.session.scalar(text("SELECT 1")) == 1
    async with ns["worker_engine"].connect() as connection:
        assert await connection.scalar(text("SHOW statement_timeout")) == "0"
    await ns["worker_engine"].dispose()


CHECKS: dict[str, Callable[[dict[str, Any], str], Any]] = {
    "quickstart": check_quickstart,
    "outside-a-request": check_outside_a_request,
    "background-task": check_background_task,
    "gather": check_gather,
    "several-databases": check_several_databases,
    "status-rule": check_status_rule,
    "streaming": check_streaming,
    "yield-dependency": check_yield_dependency,
    "plain": check_plain,
    "multi": check_multi,
    "throttled": check_throttled,
    "pool-status": check_pool_status,
    "dispose": check_dispose,
    "testing": check_testing,
    "admission": check_admission,
    "errors": check_errors,
    "on-commit": check_on_commit,
    "on-commit-errors": check_on_commit_errors,
    "run-in-transaction": check_run_in_transaction,
    "statement-timeout": check_statement_timeout,
    "assert-num-queries": check_assert_num_queries,
    "isolation-fastapi": check_isolation_fastapi,
    "isolation-starlette": check_isolation_starlette,
    "capture-on-commit": check_capture_on_commit,
    "stats": check_stats,
    "server-timing": check_server_timing,
    "n-plus-one": check_n_plus_one,
    "opentelemetry": check_opentelemetry,
    "recipe-depends": check_recipe_depends,
    "recipe-worker": check_recipe_worker,
    "recipe-alembic": check_recipe_alembic,
    "recipe-pagination": check_recipe_pagination,
    "recipe-sqlmodel": check_recipe_sqlmodel,
    "recipe-tenants": check_recipe_tenants,
    "recipe-streaming": check_recipe_streaming,
    "scaling-replicas": check_scaling_replicas,
    "scaling-replica-block": check_scaling_replica_block,
    "scaling-pgbouncer": check_scaling_pgbouncer,
}


def test_every_python_block_in_the_docs_is_a_checked_example() -> None:
    """No ```python block goes untested, and no check is left without its example."""
    blocks = sum(page.read_text().count("```python\n") for page in PAGES)
    assert blocks == len(examples())
    assert set(examples()) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_docs_example_runs_as_described(name: str, tmp_path: Path) -> None:
    """The example runs on SQLite and does what its page says."""
    try:
        namespace, printed = run_example(name, tmp_path)
        asyncio.run(CHECKS[name](namespace, printed))
    finally:
        binding = db._binding
        if binding is not None:  # a failed check must not leave the shared proxy bound
            asyncio.run(binding.owner.dispose())  # type: ignore[attr-defined]
    assert db._binding is None, "the example left the proxy bound"


def test_the_api_reference_documents_every_public_name() -> None:
    """docs/api.md names each public name (the errors through their module), so the site's
    reference cannot silently miss one."""
    import fastapi_async_sqlalchemy
    import fastapi_async_sqlalchemy.exceptions
    import fastapi_async_sqlalchemy.testing

    reference = (ROOT / "docs" / "api.md").read_text()
    assert ".. automodule:: fastapi_async_sqlalchemy.exceptions" in reference
    assert ".. automodule:: fastapi_async_sqlalchemy.testing" in reference
    errors = set(fastapi_async_sqlalchemy.exceptions.__all__)
    aliases = {"DBSessionType", "__version__"}  # DBSessionType is DBSessionMeta
    for name in set(fastapi_async_sqlalchemy.__all__) - errors - aliases:
        assert f"fastapi_async_sqlalchemy.{name}\n" in reference, f"{name} is not in docs/api.md"
