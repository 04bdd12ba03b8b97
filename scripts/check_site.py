"""Check the built documentation site in a real browser: `make docs` runs it after the build.

It serves docs/_build/html on a local port and has headless Chromium load the front page (a
redirect to docs/index.html), a deep page and a search. It fails on any message in the browser's
console (a script error, a failed load), on any file the pages asked for that the server did not
have, and if searching for ``on_commit`` does not find the API reference's entry.

Chromium comes from Debian's ``chromium`` package (scripts/chromium.sh installs it). Without it
the check is skipped with a message, and fails under CI (``CI`` set).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SITE = Path(__file__).resolve().parent.parent / "docs" / "_build" / "html"

# (path, text the loaded page must contain)
PAGES = [
    ("index.html", "Quick start"),  # the front page, after its redirect
    ("docs/observability.html", "Server-Timing"),
    ("search.html?q=on_commit", "docs/api.html#fastapi_async_sqlalchemy.DBSessionMeta.on_commit"),
]


MISSING: list[str] = []  # paths the pages asked for that the site does not have


class Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code == 404 and self.path != "/favicon.ico":  # the browser asks for it on its own
            MISSING.append(self.path)
        super().send_error(code, message, explain)


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def load(chromium: str, url: str) -> tuple[str, list[str]]:
    """The page's DOM once its scripts ran, and what it wrote to the console."""
    done = subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",  # root in containers
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def main() -> int:
    if not (SITE / "index.html").exists():
        print(f"check_site: {SITE} is not built: run `make docs`", file=sys.stderr)
        return 1
    chromium = browser()
    if chromium is None:
        message = "check_site: no Chromium (scripts/chromium.sh installs Debian's package)"
        print(message, file=sys.stderr)
        return 1 if os.environ.get("CI") else 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(SITE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    problems: list[str] = []
    try:
        for path, expected in PAGES:
            dom, console = load(chromium, base + path)
            if expected not in dom:
                problems.append(f"{path}: {expected!r} is not on the page")
            problems.extend(f"{path}: console: {line}" for line in console)
    finally:
        server.shutdown()
    problems.extend(f"not found: {path}" for path in MISSING)
    for problem in problems:
        print(f"check_site: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_site: {len(PAGES)} pages load in Chromium without errors; search works")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
