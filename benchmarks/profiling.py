"""Profile one contender in one scenario, in-process: where does a request's time go?

Run it in the contender's environment (benchmarks/.venvs/ours or .venvs/published), pinned:

    taskset -c 1 benchmarks/.venvs/ours/bin/python benchmarks/profiling.py \\
        --contender ours --scenario select1 --db sqlite
    ... --compare raw        # also time raw in the same process: the overhead, without noise
    ... --pyinstrument       # a pyinstrument call tree instead of cProfile (pip install it)

Without --pyinstrument it prints cProfile's functions sorted by own time, in µs per request,
and (``--focus``, default the package) the calls into the package with their cumulative time.
``--compare`` alternates batches of the contender and the other contender(s) in this one
process and prints their CPU time per request: a precise A/B of code that can share a process
(floor, raw, depends and ours share .venvs/ours; the published package runs in .venvs/published).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps
import driver
from worker import make_engine, prepare

URLS = {
    "sqlite": "sqlite+aiosqlite:////tmp/fasa-bench-profile.sqlite3",
    "postgresql": "postgresql+asyncpg://postgres@127.0.0.1:5432/bench",
}


async def main(args: argparse.Namespace) -> None:
    engine = make_engine(args.db, args.url or URLS[args.db])
    await prepare(engine, args.db)
    method, path = apps.ROUTES[args.scenario]
    scope = driver.http_scope(method, path)
    concurrency = 50 if args.scenario == "concurrent" else 1
    names = [args.contender, *(args.compare.split(",") if args.compare else [])]
    built = {name: apps.build_app(name, args.scenario, engine) for name in names}
    lifespans = [driver.lifespan(app) for app in built.values()]
    for lifespan in lifespans:
        await lifespan.__aenter__()
    try:
        for app in built.values():
            await driver.serve(app, scope, args.requests // 5 or 1, concurrency)
        if args.compare:
            cpu: dict[str, list[float]] = {name: [] for name in names}
            for round_number in range(args.rounds):
                order = names if round_number % 2 == 0 else names[::-1]
                for name in order:
                    gc.collect()
                    start = time.process_time_ns()
                    await driver.serve(built[name], scope, args.requests, concurrency)
                    cpu[name].append((time.process_time_ns() - start) / args.requests / 1000)
            base = statistics.median(cpu[names[0]])
            print(
                f"CPU µs per request, {args.scenario} on {args.db}, median of {args.rounds} "
                "alternating batches:"
            )
            for name in names:
                value = statistics.median(cpu[name])
                print(f"  {name:10} {value:9.1f}   {value - base:+8.1f} vs {names[0]}")
            return
        app = built[args.contender]
        if args.pyinstrument:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0001, async_mode="disabled")
            profiler.start()
            await driver.serve(app, scope, args.requests, concurrency)
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False))
            return
        profile = cProfile.Profile()
        start = time.process_time_ns()
        profile.enable()
        await driver.serve(app, scope, args.requests, concurrency)
        profile.disable()
        per_request = (time.process_time_ns() - start) / args.requests / 1000
    finally:
        for lifespan in reversed(lifespans):
            await lifespan.__aexit__(None, None, None)
        await engine.dispose()
    _print_profile(profile, args, per_request)


def _print_profile(profile: cProfile.Profile, args: argparse.Namespace, per_request: float) -> None:
    stats = pstats.Stats(profile, stream=io.StringIO())
    n = args.requests
    rows = []
    for (filename, line, function), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tottime, cumtime, ncalls, f"{_short(filename)}:{line}({function})"))
    print(
        f"{args.contender}, {args.scenario} on {args.db}: {per_request:.1f} µs CPU per request "
        "under cProfile (which inflates every call)"
    )
    print(f"\nown time, µs per request (top {args.top}):")
    for tottime, cumtime, ncalls, name in sorted(rows, reverse=True)[: args.top]:
        print(
            f"  {tottime / n * 1e6:8.1f} own {cumtime / n * 1e6:8.1f} cum "
            f"{ncalls / n:6.1f} calls  {name}"
        )
    focus = args.focus
    focused = [row for row in rows if focus in row[3]]
    if focused:
        print(f"\nfunctions matching {focus!r}, by cumulative µs per request:")
        for tottime, cumtime, ncalls, name in sorted(focused, key=lambda r: -r[1])[: args.top]:
            print(
                f"  {cumtime / n * 1e6:8.1f} cum {tottime / n * 1e6:8.1f} own "
                f"{ncalls / n:6.1f} calls  {name}"
            )


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for marker in ("site-packages", "src"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1 :])
    return filename


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contender", choices=apps.CONTENDERS, default="ours")
    parser.add_argument("--scenario", choices=apps.SCENARIOS, default="select1")
    parser.add_argument("--db", choices=sorted(URLS), default="sqlite")
    parser.add_argument("--url", help="database URL (default: see URLS)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=12, help="with --compare")
    parser.add_argument("--compare", help="contenders to time against, e.g. raw,floor")
    parser.add_argument("--focus", default="fastapi_async_sqlalchemy")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--pyinstrument", action="store_true")
    asyncio.run(main(parser.parse_args()))
