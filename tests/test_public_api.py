"""The public surface: names, compatible import paths, error classes, typing promises, version."""

from __future__ import annotations

import pickle
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession

import fastapi_async_sqlalchemy
import fastapi_async_sqlalchemy.exceptions
import fastapi_async_sqlalchemy.middleware
from fastapi_async_sqlalchemy import (
    DBSessionMeta,
    DBSessionType,
    FastAPIAsyncSQLAlchemyError,
    MissingSessionError,
    PoolTimeoutError,
    SessionNotInitialisedError,
    create_middleware_and_session_proxy,
    db,
)

pytestmark = pytest.mark.anyio

PROJECT_ROOT = Path(__file__).resolve().parents[1]

SPEC_NAMES = {
    "db",
    "SQLAlchemyMiddleware",
    "create_middleware_and_session_proxy",
    "DBSessionMeta",
    "DBSessionType",
    "MissingSessionError",
    "SessionNotInitialisedError",
    "PoolTimeoutError",
    "__version__",
}


def public_names(module: ModuleType) -> set[str]:
    """The names a module really exposes: not private, and not a submodule."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }


def exported_exception_classes() -> list[type[BaseException]]:
    package = fastapi_async_sqlalchemy
    values = [getattr(package, name) for name in package.__all__]
    return [v for v in values if isinstance(v, type) and issubclass(v, BaseException)]


def test_all_lists_exactly_what_the_package_exposes() -> None:
    """`__all__` holds every public name of the package (and `__version__`), and nothing else."""
    exported = fastapi_async_sqlalchemy.__all__
    assert len(exported) == len(set(exported))
    assert set(exported) == public_names(fastapi_async_sqlalchemy) | {"__version__"}
    for name in exported:
        assert hasattr(fastapi_async_sqlalchemy, name)


def test_all_holds_every_name_the_spec_promises() -> None:
    """Every public name of the 0.8 releases is still exported from the package."""
    assert set(fastapi_async_sqlalchemy.__all__) >= SPEC_NAMES


def test_names_still_import_from_the_middleware_module() -> None:
    """Imports written against `fastapi_async_sqlalchemy.middleware` keep working."""
    from fastapi_async_sqlalchemy.middleware import (
        DBSessionMeta,
        DefaultAsyncSession,
        MissingSessionError,
        PoolTimeoutError,
        SessionNotInitialisedError,
        SQLAlchemyMiddleware,
        create_middleware_and_session_proxy,
        db,
    )

    same_as_the_package = {
        "DBSessionMeta": DBSessionMeta,
        "MissingSessionError": MissingSessionError,
        "PoolTimeoutError": PoolTimeoutError,
        "SessionNotInitialisedError": SessionNotInitialisedError,
        "SQLAlchemyMiddleware": SQLAlchemyMiddleware,
        "create_middleware_and_session_proxy": create_middleware_and_session_proxy,
        "db": db,
    }
    for name, value in same_as_the_package.items():
        assert value is getattr(fastapi_async_sqlalchemy, name), name
    assert DefaultAsyncSession is SQLModelAsyncSession  # SQLModel is installed here
    for name in fastapi_async_sqlalchemy.middleware.__all__:
        assert hasattr(fastapi_async_sqlalchemy.middleware, name), name


def test_every_error_imports_from_the_exceptions_module() -> None:
    """Every error class imports from the exceptions module, as the same object as the package's."""
    from fastapi_async_sqlalchemy.exceptions import (
        ConcurrencyError,
        FastAPIAsyncSQLAlchemyError,
        InvalidConfigurationError,
        MissingSessionError,
        PoolTimeoutError,
        ProxyBindingError,
        SessionFinalizedError,
        SessionNotInitialisedError,
    )

    imported = {
        ConcurrencyError,
        FastAPIAsyncSQLAlchemyError,
        InvalidConfigurationError,
        MissingSessionError,
        PoolTimeoutError,
        ProxyBindingError,
        SessionFinalizedError,
        SessionNotInitialisedError,
    }
    module = fastapi_async_sqlalchemy.exceptions
    defined = {
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == module.__name__
    }
    assert imported <= defined
    assert {getattr(module, name) for name in module.__all__} == defined
    assert set(exported_exception_classes()) == defined


@pytest.mark.parametrize("error_class", exported_exception_classes(), ids=lambda c: c.__name__)
def test_every_exported_error_derives_from_the_base_class(
    error_class: type[BaseException],
) -> None:
    """`except FastAPIAsyncSQLAlchemyError` catches every error the library exports."""
    assert issubclass(error_class, FastAPIAsyncSQLAlchemyError)


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("InvalidConfigurationError", ValueError),
        ("SessionFinalizedError", RuntimeError),
        ("ProxyBindingError", RuntimeError),
        ("ConcurrencyError", RuntimeError),
        ("CoroutineRequiredError", TypeError),
        ("PoolTimeoutError", TimeoutError),
    ],
)
def test_errors_keep_the_builtin_base_existing_code_catches(
    name: str, builtin: type[Exception]
) -> None:
    """Errors that were builtin errors upstream are still caught by the same `except` clause."""
    assert issubclass(getattr(fastapi_async_sqlalchemy, name), builtin)


@pytest.mark.parametrize(
    "error",
    [
        MissingSessionError(),
        MissingSessionError("custom message"),
        SessionNotInitialisedError(),
        PoolTimeoutError(),
        PoolTimeoutError(
            timeout=0.25,
            retry_after=3,
            pool_status={"capacity": 15, "checked_out": 15, "saturation": 1.0},
        ),
    ],
    ids=repr,
)
def test_errors_survive_a_pickle_round_trip(error: Exception) -> None:
    """Errors cross process boundaries (multiprocessing, task queues) with message and fields."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    for field in ("timeout", "retry_after", "pool_status"):
        assert getattr(copy, field, None) == getattr(error, field, None)


def test_pool_timeout_error_is_a_timeout_error_with_its_details() -> None:
    """PoolTimeoutError is caught as TimeoutError and carries timeout, retry_after, pool_status."""
    status: dict[str, Any] = {"capacity": 5, "checked_out": 5, "saturation": 1.0}
    with pytest.raises(TimeoutError) as raised:
        raise PoolTimeoutError(timeout=1.5, retry_after=2, pool_status=status)
    error = raised.value
    assert isinstance(error, PoolTimeoutError)
    assert (error.timeout, error.retry_after, error.pool_status) == (1.5, 2, status)
    assert "\n" not in str(error)


def test_proxy_is_an_instance_of_its_annotation_type() -> None:
    """`isinstance(db, DBSessionMeta)` holds and DBSessionType is the same class."""
    assert isinstance(db, DBSessionMeta)
    assert DBSessionType is DBSessionMeta


async def test_each_call_returns_a_new_independent_pair() -> None:
    """create_middleware_and_session_proxy() never hands out a class or proxy twice."""
    FirstMiddleware, first = create_middleware_and_session_proxy()
    SecondMiddleware, second = create_middleware_and_session_proxy()
    assert FirstMiddleware is not SecondMiddleware
    assert FirstMiddleware is not fastapi_async_sqlalchemy.SQLAlchemyMiddleware
    assert len({id(first), id(second), id(db)}) == 3
    assert isinstance(first, DBSessionMeta)
    assert isinstance(second, DBSessionMeta)

    async def unused_app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    middleware = FirstMiddleware(unused_app, db_url="sqlite+aiosqlite://")
    try:
        assert first.engine is middleware.engine
        with pytest.raises(SessionNotInitialisedError):
            second.engine  # noqa: B018
    finally:
        await middleware.dispose()


def test_version_matches_the_project_metadata() -> None:
    """`__version__` is the version pyproject.toml declares."""
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    assert fastapi_async_sqlalchemy.__version__ == project["version"]


def test_typing_promises_hold_under_mypy_strict() -> None:
    """tests/typing_checks.py (db.session's type, add_middleware keywords, ...) passes mypy."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "tests/typing_checks.py"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
