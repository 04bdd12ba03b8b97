"""What the middleware raises for bad construction arguments, as an except clause sees it
(ValueError, TypeError, sqlalchemy.exc.ArgumentError, ImportError): an unparseable db_url, an
unknown driver, a known driver that is not installed (aioodbc), an unknown engine_args keyword,
pool_warn_threshold="x", request_queue_timeout="x", exclude_paths=5."""

from _compat import attempt, run, url
from fastapi import FastAPI

from fastapi_async_sqlalchemy import create_middleware_and_session_proxy

CASES = {
    "unparseable_db_url": {"db_url": "not a database url"},
    "unknown_driver": {"db_url": "postgresql+nosuchdriver://user@127.0.0.1/test"},
    "driver_not_installed": {"db_url": "mssql+aioodbc://user@127.0.0.1/test"},
    "unknown_engine_args_keyword": {"engine_args": {"no_such_argument": 1}},
    "pool_warn_threshold_x": {"pool_warn_threshold": "x"},
    "request_queue_timeout_x": {"request_queue_timeout": "x"},
    "exclude_paths_5": {"exclude_paths": 5},
}


async def main() -> dict:
    result: dict = {}
    for label, arguments in CASES.items():
        Middleware, _ = create_middleware_and_session_proxy()
        arguments = {"db_url": url(), **arguments}
        result[label] = attempt(
            lambda arguments=arguments, Middleware=Middleware: Middleware(FastAPI(), **arguments),
        )
    return result


run(main)
