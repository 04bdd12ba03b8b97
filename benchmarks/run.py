#!/usr/bin/env python3
"""The benchmark suite's entry point (``make bench``): venvs, databases, rounds, report.

Stdlib only, so any Python 3 can start it. It

1. creates two virtual environments under benchmarks/.venvs/ on one interpreter (Python 3.12 by
   default, which the published 0.8.1 requires): ``ours`` (this checkout, editable) and
   ``published`` (fastapi-async-sqlalchemy==0.8.1 from PyPI), both with exactly the versions
   in benchmarks/requirements.txt; the floor, raw and Depends contenders run in ``ours``;
2. starts a PostgreSQL server of its own on a free port, pinned to one CPU, for the run (or uses
   BENCH_POSTGRES_URL, or the shared server on 127.0.0.1:5432 when that is impossible);
3. runs rounds: in each round, for each database, every contender once, each in a process of
   its own pinned to one CPU (which runs every scenario in-process, then behind uvicorn), the
   order reversed every other round;
4. runs the memory test (100,000 requests) for this project and for 0.8.1, side by side;
5. writes benchmarks/results/latest.{json,md} and prints the report; ``--update-docs`` also
   puts it into docs/performance.md.

    python3 benchmarks/run.py                      # what `make bench` runs
    python3 benchmarks/run.py --rounds 7           # longer, steadier
    python3 benchmarks/run.py --quick              # a smoke run: 1 round, small counts
    python3 benchmarks/run.py --databases sqlite --modes inproc --scenarios nodb,select1
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
RESULTS = HERE / "results"
DOCS = ROOT / "docs" / "performance.md"
PUBLISHED = "fastapi-async-sqlalchemy==0.8.1"

SCENARIOS = ("nodb", "select1", "insert", "gather", "concurrent")
MODES = ("inproc", "uvicorn")
# (label, worker --contender, virtual environment). "raw2" runs the raw contender a second time:
# raw2/raw of the same round is the sanity ratio, the noise floor of every other ratio.
CONTENDERS = (
    ("floor", "floor", "ours"),
    ("raw", "raw", "ours"),
    ("depends", "depends", "ours"),
    ("ours", "ours", "ours"),
    ("published", "published", "published"),
    ("raw2", "raw", "ours"),
)
LABELS = {
    "floor": "floor",
    "raw": "raw",
    "depends": "Depends",
    "ours": "ours",
    "published": "0.8.1",
    "raw2": "raw again",
}
BASELINE = {"nodb": "floor"}  # every other scenario: "raw"
KNOBS = (
    "BENCH_PYTHON",
    "BENCH_ROUNDS",
    "BENCH_SCALE",
    "BENCH_DATABASES",
    "BENCH_MODES",
    "BENCH_SCENARIOS",
    "BENCH_MEMORY_REQUESTS",
    "BENCH_POSTGRES_URL",
    "BENCH_MARIADB_URL",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- interpreter and virtual environments ------------------------------------------------------


def find_python() -> str:
    """BENCH_PYTHON, else the newest pyenv 3.12, else python3.12 on PATH, else this Python."""
    if os.environ.get("BENCH_PYTHON"):
        return os.environ["BENCH_PYTHON"]
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(
        glob.glob(f"{root}/versions/3.12.*/bin/python"),
        key=lambda p: [int(x) for x in p.split("/versions/")[1].split("/")[0].split(".")],
    )
    if candidates:
        return candidates[-1]
    return shutil.which("python3.12") or sys.executable


def python_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _pip(venv: Path, *args: str) -> None:
    command = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"bench: {' '.join(command)} failed")


def ensure_venv(name: str, python: str) -> Path:
    """Create (once) the virtual environment ``name``; recreate it when its inputs change."""
    venv = VENVS / name
    version = python_version(python)
    requirements = (HERE / "requirements.txt").read_bytes()
    key = hashlib.sha256(
        b"\0".join([name.encode(), python.encode(), version.encode(), requirements])
    ).hexdigest()
    stamp = venv / ".bench-stamp"
    if stamp.exists() and stamp.read_text() == key and (venv / "bin" / "python").exists():
        return venv
    log(f"bench: creating {venv.relative_to(ROOT)} (Python {version})")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    _pip(venv, "install", "--quiet", "--upgrade", "pip")
    _pip(venv, "install", "--quiet", "-r", str(HERE / "requirements.txt"))
    if name == "ours":
        _pip(venv, "install", "--quiet", "--no-deps", "-e", str(ROOT))
    else:
        # 0.8.1 declares Requires-Python >=3.12; on an older interpreter its code still imports.
        old = tuple(map(int, version.split("."))) < (3, 12)
        extra = ["--ignore-requires-python"] if old else []
        _pip(venv, "install", "--quiet", "--no-deps", *extra, PUBLISHED)
    stamp.write_text(key)
    return venv


def venv_python(name: str) -> str:
    return str(VENVS / name / "bin" / "python")


def package_versions(venv: str) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "names = ['fastapi-async-sqlalchemy', 'SQLAlchemy', 'fastapi', 'starlette', 'uvicorn',"
        " 'httptools', 'aiosqlite', 'asyncpg', 'asyncmy', 'greenlet', 'pydantic']\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    out = subprocess.run([venv_python(venv), "-c", code], check=True, capture_output=True)
    return dict(json.loads(out.stdout))


# -- CPUs ------------------------------------------------------------------------------------


def plan_cpus() -> tuple[str | None, str | None]:
    """(CPU for benchmark processes, CPU for the database server, the load generator and this
    script); (None, None) when there is only one CPU or taskset is missing."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None, None
    return str(cpus[-1]), str(cpus[0])


def pinned(cpu: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command] if cpu is not None else command


# Every benchmark process gets the same hash seed: one less thing that differs between two runs
# of the same code.
WORKER_ENV = {**os.environ, "PYTHONHASHSEED": "0"}


# -- databases -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Databases:
    """The database URLs of the run; a PostgreSQL server of its own when it can start one."""

    def __init__(self, wanted: list[str], server_cpu: str | None) -> None:
        self.wanted = wanted
        self.server_cpu = server_cpu
        self.urls: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="fasa-bench-"))
        self._pg_dir: Path | None = None
        self._pg_ctl: str | None = None

    def __enter__(self) -> Databases:
        for db in self.wanted:
            try:
                getattr(self, f"_start_{db}")()
            except Exception as exc:  # report and go on without that database
                log(f"bench: {db} unavailable, skipped: {exc}")
                self.notes[db] = f"skipped: {exc}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pg_dir is not None and self._pg_ctl is not None:
            subprocess.run(
                self._as_postgres(
                    [
                        self._pg_ctl,
                        "-D",
                        str(self._pg_dir / "data"),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ]
                ),
                capture_output=True,
            )
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _start_sqlite(self) -> None:
        self.urls["sqlite"] = f"sqlite+aiosqlite:///{self._tmp / 'bench.sqlite3'}"
        self.notes["sqlite"] = "aiosqlite, a file in a temporary directory, WAL, synchronous=OFF"

    @staticmethod
    def _as_postgres(command: list[str]) -> list[str]:
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    def _start_postgresql(self) -> None:
        if os.environ.get("BENCH_POSTGRES_URL"):
            self.urls["postgresql"] = os.environ["BENCH_POSTGRES_URL"]
            self.notes["postgresql"] = "asyncpg, BENCH_POSTGRES_URL (not pinned by the bench)"
            return
        try:
            self._start_own_postgres()
        except Exception as exc:
            log(f"bench: no PostgreSQL server of its own ({exc}); using 127.0.0.1:5432")
            self._use_shared_postgres()
            self.notes["postgresql"] = (
                f"asyncpg, the shared server on 127.0.0.1:5432 (not pinned: {exc})"
            )

    def _start_own_postgres(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
        initdb = bins[-1] if bins else shutil.which("initdb")
        if initdb is None:
            raise RuntimeError("initdb not found")
        bindir = Path(initdb).parent
        self._pg_ctl = str(bindir / "pg_ctl")
        self._pg_dir = self._tmp / "postgres"
        self._pg_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self._pg_dir, "postgres", "postgres")
            shutil.chown(self._tmp, "postgres", "postgres")
        os.chmod(self._pg_dir, 0o700)
        data = self._pg_dir / "data"
        subprocess.run(
            self._as_postgres(
                [
                    initdb,
                    "-D",
                    str(data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
        )
        port = _free_port()
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self._pg_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200 -c shared_buffers=128MB"
        )
        command = pinned(
            self.server_cpu,
            [
                self._pg_ctl,
                "-D",
                str(data),
                "-l",
                str(self._pg_dir / "log"),
                "-w",
                "-o",
                options,
                "start",
            ],
        )
        subprocess.run(self._as_postgres(command), check=True, capture_output=True)
        psql = str(bindir / "psql") if (bindir / "psql").exists() else "psql"
        subprocess.run(
            self._as_postgres(
                [
                    psql,
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "-qc",
                    "CREATE DATABASE bench",
                ]
            ),
            check=True,
            capture_output=True,
        )
        version = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True
        ).stdout.strip()
        self.urls["postgresql"] = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/bench"
        cpu = f"pinned to CPU {self.server_cpu}" if self.server_cpu else "not pinned"
        self.notes["postgresql"] = (
            f"asyncpg; a server of the bench's own ({version}, temporary data directory, "
            f"fsync=off, synchronous_commit=off), {cpu}"
        )

    def _use_shared_postgres(self) -> None:
        url = "postgresql+asyncpg://postgres@127.0.0.1:5432/bench"
        exists = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-tAc",
                "SELECT 1 FROM pg_database WHERE datname = 'bench'",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if exists != "1":
            subprocess.run(
                [
                    "psql",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-qc",
                    "CREATE DATABASE bench",
                ],
                check=True,
                capture_output=True,
            )
        self.urls["postgresql"] = url

    def _start_mariadb(self) -> None:
        url = os.environ.get("BENCH_MARIADB_URL", "mysql+asyncmy://root@127.0.0.1:3306/bench")
        if "BENCH_MARIADB_URL" not in os.environ:
            client = shutil.which("mariadb") or shutil.which("mysql")
            if client is None:
                raise RuntimeError("no mariadb client")
            subprocess.run(
                [client, "-h", "127.0.0.1", "-uroot", "-e", "CREATE DATABASE IF NOT EXISTS bench"],
                check=True,
                capture_output=True,
            )
        self.urls["mariadb"] = url
        self.notes["mariadb"] = "asyncmy, the shared server on 127.0.0.1:3306 (not pinned)"


def _version_key(path: str) -> list[int]:
    part = path.split("/postgresql/")[1].split("/")[0]
    return [int(x) for x in part.split(".") if x.isdigit()]


# -- running ---------------------------------------------------------------------------------


def run_worker(
    contender: str,
    venv: str,
    db: str,
    url: str,
    modes: list[str],
    scenarios: list[str],
    scale: float,
    bench_cpu: str | None,
    aux_cpu: str | None,
) -> dict[str, Any]:
    command = [
        venv_python(venv),
        str(HERE / "worker.py"),
        f"--contender={contender}",
        f"--db={db}",
        f"--url={url}",
        f"--modes={','.join(modes)}",
        f"--scenarios={','.join(scenarios)}",
        f"--scale={scale}",
    ]
    if aux_cpu is not None:
        command.append(f"--loadgen-cpus={aux_cpu}")
    result = subprocess.run(
        pinned(bench_cpu, command), capture_output=True, text=True, timeout=900, env=WORKER_ENV
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"bench: worker {contender} ({venv}) on {db} failed")
    return dict(json.loads(result.stdout))


def run_micro(venv: str, bench_cpu: str | None) -> dict[str, Any]:
    command = [venv_python(venv), str(HERE / "micro.py")]
    result = subprocess.run(
        pinned(bench_cpu, command), capture_output=True, text=True, timeout=600, env=WORKER_ENV
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"bench: micro run in {venv} failed")
    return dict(json.loads(result.stdout))


def start_memory(venv: str, requests: int, cpu: str | None, tmp: Path) -> subprocess.Popen[str]:
    url = f"sqlite+aiosqlite:///{tmp / f'memory-{venv}.sqlite3'}"
    command = [venv_python(venv), str(HERE / "memory.py"), f"--url={url}", f"--requests={requests}"]
    return subprocess.Popen(
        pinned(cpu, command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=WORKER_ENV,
    )


def finish_memory(venv: str, process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=1800)
    if process.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"bench: memory run in {venv} failed")
    return dict(json.loads(out))


# -- statistics ------------------------------------------------------------------------------

METRICS = ("us", "cpu_us")


def spread(values: list[float]) -> float:
    """Half the range of ``values``, relative to their median (0.03 means ±3 %)."""
    if len(values) < 2:
        return 0.0
    return (max(values) - min(values)) / 2 / statistics.median(values)


def summarize(runs: dict[str, Any]) -> dict[str, Any]:
    """Per (mode/db, scenario, contender, metric): the rounds' values, their median and spread,
    and the ratios to the baseline of the same round with their median."""
    summary: dict[str, Any] = {}
    for cell, scenarios in runs.items():
        summary[cell] = {}
        for scenario, by_contender in scenarios.items():
            base = BASELINE.get(scenario, "raw")
            entry: dict[str, Any] = {"baseline": base, "contenders": {}}
            for contender, metrics in by_contender.items():
                entry["contenders"][contender] = {}
                for metric in METRICS:
                    rounds = metrics[metric]
                    base_rounds = by_contender.get(base, {}).get(metric, [])
                    ratios = [value / b for value, b in zip(rounds, base_rounds, strict=False) if b]
                    entry["contenders"][contender][metric] = {
                        "rounds": rounds,
                        "median": statistics.median(rounds),
                        "spread": spread(rounds),
                        "ratios": ratios,
                        "ratio": statistics.median(ratios) if ratios else None,
                    }
            summary[cell][scenario] = entry
    return summary


# A target is judged three ways: on the median over the rounds of a quantity computed within
# each round (wall-clock and CPU time), and on the same quantity computed from each contender's
# best round (CPU time), which is what a contender costs when nothing else disturbs it.
VIEWS = (("wall", "us", "paired"), ("cpu", "cpu_us", "paired"), ("cpu_best", "cpu_us", "best"))
VIEW_TEXT = {
    "wall": "wall-clock, median of the rounds",
    "cpu": "CPU time, median of the rounds",
    "cpu_best": "CPU time, best round of each",
}


def _samples(c: dict[str, Any], names: list[str], metric: str, view: str) -> list[dict[str, float]]:
    """Per round, each contender's value; or, for the "best" view, one sample of minimums."""
    if view == "best":
        return [{name: min(c[name][metric]["rounds"]) for name in names}]
    count = min(len(c[name][metric]["rounds"]) for name in names)
    return [{name: c[name][metric]["rounds"][i] for name in names} for i in range(count)]


def _judge(values: list[float | None], limit: float) -> tuple[float | None, str, bool]:
    """The median of ``values`` (None: undefined in that round), how many are ≤ ``limit``, and
    whether the median is."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None, f"0/{len(values)}", False
    median = statistics.median(defined)
    return median, f"{sum(1 for v in defined if v <= limit)}/{len(values)}", median <= limit


def _share(sample: dict[str, float], base: str) -> float | None:
    """(ours - base) / (published - base): our overhead as a share of 0.8.1's."""
    published = sample["published"] - sample[base]
    return (sample["ours"] - sample[base]) / published if published > 0 else None


def targets(
    summary: dict[str, Any], memory: dict[str, Any], micro: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per target and mode/database; per view, the text to show and whether it is met."""
    rows: list[dict[str, Any]] = []
    if micro.get("ours") and micro.get("published"):
        ours, published = micro["ours"]["overhead_us"], micro["published"]["overhead_us"]
        share = ours / published
        rows.append(
            {
                "target": "nodb: our overhead ≤ 10 % of 0.8.1's (the middleware alone)",
                "cell": "micro",
                "cpu": (f"{share:.0%} (+{ours:.1f} vs +{published:.1f} µs)", share <= 0.10),
            }
        )
    for cell, scenarios in summary.items():
        for scenario, base, per, limit in (("nodb", "floor", 1, 0.10), ("gather", "raw", 4, 0.25)):
            entry = scenarios.get(scenario)
            if entry is None or "ours" not in entry["contenders"]:
                continue
            c = entry["contenders"]
            what = "per coroutine" if per > 1 else "per request"
            row: dict[str, Any] = {
                "target": f"{scenario}: our overhead {what} ≤ {limit:.0%} of 0.8.1's",
                "cell": cell,
            }
            for key, metric, view in VIEWS:
                samples = _samples(c, ["ours", "published", base], metric, view)
                share, count, met = _judge([_share(s, base) for s in samples], limit)
                ours = statistics.median((s["ours"] - s[base]) / per for s in samples)
                published = statistics.median((s["published"] - s[base]) / per for s in samples)
                shown = "n/a" if share is None else f"{share:.0%}"
                rounds = f"; {count} rounds" if view == "paired" else ""
                row[key] = (f"{shown} ({ours:+.1f} vs {published:+.1f} µs{rounds})", met)
            rows.append(row)
        for scenario in ("select1", "insert"):
            entry = scenarios.get(scenario)
            if entry is None or "ours" not in entry["contenders"]:
                continue
            c = entry["contenders"]
            rivals = [name for name in ("published", "depends") if name in c]
            row = {"target": f"{scenario}: ours ≤ 1.05 x raw; < 0.8.1; < Depends", "cell": cell}
            for key, metric, view in VIEWS:
                samples = _samples(c, ["ours", "raw", *rivals], metric, view)
                ratios = {
                    name: statistics.median(s[name] / s["raw"] for s in samples)
                    for name in ["ours", *rivals]
                }
                met = ratios["ours"] <= 1.05 and all(ratios["ours"] < ratios[r] for r in rivals)
                held = sum(
                    1
                    for s in samples
                    if s["ours"] <= 1.05 * s["raw"] and all(s["ours"] < s[r] for r in rivals)
                )
                text = " / ".join(f"{ratios[name]:.3f}" for name in ["ours", *rivals])
                rounds = f" ({held}/{len(samples)} rounds)" if view == "paired" else ""
                row[key] = (text + rounds, met)
            rows.append(row)
    if memory.get("ours"):
        m = memory["ours"]
        growth = (m["rss_end_kib"] - m["rss_start_kib"]) / 1024
        text = (
            f"RSS {growth:+.2f} MB; {len(m['package_growing_sites'])} growing site(s) of "
            f"ours; {m['live_sessions']} live sessions"
        )
        met = growth < 2 and not m["package_growing_sites"] and m["live_sessions"] == 0
        rows.append(
            {
                "target": f"{m['requests']:,} requests: RSS growth < 2 MB, no growing site of ours",
                "cell": "inproc/sqlite",
                "wall": (text, met),
            }
        )
    return rows


# -- report ----------------------------------------------------------------------------------


def _fmt_us(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _fmt_ratio(entry: dict[str, Any]) -> str:
    ratios = entry["ratios"]
    if not ratios:
        return "n/a"
    if len(ratios) == 1:
        return f"{entry['ratio']:.3f}"
    return f"{entry['ratio']:.3f} [{min(ratios):.2f}-{max(ratios):.2f}]"


def _scenario_table(
    scenarios: dict[str, Any],
    names: list[str],
    fmt: Callable[[dict[str, Any]], str],
    skip_baseline: bool = False,
) -> list[str]:
    """A Markdown table: a row per scenario, a column per contender, ``fmt`` of each metric."""

    def cell(entry: dict[str, Any], name: str) -> str:
        c = entry["contenders"].get(name)
        if c is None or (skip_baseline and name == entry["baseline"]):
            return "n/a"
        return " · ".join(fmt(c[metric]) for metric in METRICS)

    rows = [
        f"| {scenario} | " + " | ".join(cell(entry, name) for name in names) + " |"
        for scenario, entry in scenarios.items()
    ]
    head = "| scenario | " + " | ".join(LABELS[name] for name in names) + " |"
    return [head, "| --- |" + " ---: |" * len(names), *rows]


def _verdict(row: dict[str, Any], metric: str) -> str:
    if metric not in row:
        return "n/a"
    text, met = row[metric]
    return f"{text} — {'met' if met else '**missed**'}"


def report(
    raw: dict[str, Any], summary: dict[str, Any], memory: dict[str, Any], micro: dict[str, Any]
) -> str:
    meta = raw["meta"]
    lines: list[str] = []
    add = lines.append
    add(f"Run of {meta['finished']}, {meta['seconds'] / 60:.1f} min: `{meta['command']}`")
    add("")
    add(
        f"- Machine: {meta['nproc']} CPUs ({meta['cpu_model']}), Linux {meta['kernel']}; "
        f"benchmark processes pinned to CPU {meta['bench_cpu']}; the database server, the load "
        f"generator and the driver script to CPU {meta['aux_cpu']}. Load average at the start "
        f"{meta['loadavg_start']}, at the end {meta['loadavg_end']} (other people's tests run "
        "on this machine too)."
    )
    add(f"- Python {meta['python']} for every contender (`{meta['python_path']}`).")
    versions = meta["versions"]
    add(
        "- Both environments: "
        + ", ".join(
            f"{name} {version}"
            for name, version in versions["ours"].items()
            if name != "fastapi-async-sqlalchemy"
        )
        + "."
    )
    add(
        f"- ours: fastapi-async-sqlalchemy {versions['ours'].get('fastapi-async-sqlalchemy')} "
        f"(this checkout); 0.8.1: fastapi-async-sqlalchemy "
        f"{versions['published'].get('fastapi-async-sqlalchemy')} from PyPI."
    )
    for db, note in meta["databases"].items():
        add(f"- {db}: {note}.")
    add(f"- {meta['rounds']} round(s); request counts x {meta['scale']:g}.")
    add("")
    add("### Targets")
    add("")
    add(
        "For select1 and insert: ours/raw / 0.8.1/raw / Depends/raw. For nodb and gather: our "
        "overhead over the baseline as a share of 0.8.1's, and both overheads in µs. \"Median "
        'of the rounds": the quantity is computed within each round, then the median is '
        'taken; "k/n rounds" counts the rounds in which the target held on its own. "Best '
        "round of each\": computed from each contender's fastest round, the least disturbed "
        "view on a shared machine."
    )
    add("")
    add("| target | mode/database | " + " | ".join(VIEW_TEXT[k] for k, _, _ in VIEWS) + " |")
    add("| --- | --- |" + " --- |" * len(VIEWS))
    for row in targets(summary, memory, micro):
        verdicts = " | ".join(_verdict(row, key) for key, _, _ in VIEWS)
        add(f"| {row['target']} | {row['cell']} | {verdicts} |")
    add("")
    sanity: dict[str, list[float]] = {key: [] for key, _, _ in VIEWS}
    for scenarios in summary.values():
        for entry in scenarios.values():
            c = entry["contenders"]
            if "raw2" not in c:
                continue
            for key, metric, view in VIEWS:
                samples = _samples(c, ["raw", "raw2"], metric, view)
                sanity[key].append(statistics.median(s["raw2"] / s["raw"] for s in samples))
    if sanity["wall"]:
        add("Sanity: `raw again`/raw compares identical code in two processes of the same round.")
        add("")
        for key, _, _ in VIEWS:
            values = sanity[key]
            within = sum(1 for r in values if abs(r - 1) <= 0.02)
            add(
                f"- {VIEW_TEXT[key]}: within ±2 % in {within} of {len(values)} scenario cells, "
                f"from {min(values):.3f} to {max(values):.3f}."
            )
        add("")
    names = [label for label, _, _ in CONTENDERS]
    titles = {
        "inproc": "in-process ASGI driver",
        "uvicorn": "uvicorn on 127.0.0.1 + load generator",
    }
    for cell, scenarios in summary.items():
        mode, db = cell.split("/")
        add(f"### {titles[mode]}, {db}")
        add("")
        add(
            "µs per request, wall-clock · CPU time of the benchmark process: the median of the "
            "rounds ± half their range."
        )
        add("")
        lines += _scenario_table(
            scenarios, names, lambda m: f"{_fmt_us(m['median'])} ±{m['spread']:.0%}"
        )
        add("")
        add(
            "Ratio to the baseline of the same round, wall-clock · CPU: the median [lowest-"
            "highest]. The baseline is the floor for nodb and raw otherwise."
        )
        add("")
        ratio_names = [n for n in names if n != "floor"]
        lines += _scenario_table(scenarios, ratio_names, _fmt_ratio, skip_baseline=True)
        add("")
    if micro:
        add("### The middleware alone")
        add("")
        add(
            "A bare ASGI app (two `send` calls, no framework, no database) with and without "
            "`SQLAlchemyMiddleware`, alternating batches in one process (benchmarks/micro.py); "
            "CPU µs per request, the median of the batches."
        )
        add("")
        add("| | bare app | with the middleware | the middleware's cost |")
        add("| --- | ---: | ---: | ---: |")
        for venv, m in micro.items():
            add(
                f"| {LABELS[venv]} ({m['package']}) | {m['bare_us']:.1f} | "
                f"{m['middleware_us']:.1f} | +{m['overhead_us']:.1f} |"
            )
        add("")
    if memory:
        add("### Memory")
        add("")
        first = next(iter(memory.values()))
        add(
            f"{first['requests']:,} requests in-process on SQLite after "
            f"{first['warmup']:,} warm-up requests; each reads `db.session` "
            f"(`commit_on_exit=True`), every {first['io_every']}th also runs an INSERT. RSS after "
            f"`gc.collect()`; tracemalloc (1 frame) takes three snapshots "
            f"{first['trace_requests']:,} requests apart, and a site grows if it grew over both "
            "stretches (tracemalloc growth: first to last snapshot)."
        )
        add("")
        add(
            "| | RSS after warm-up | growth over the requests | RSS at each fifth (MB) | "
            "gc objects before → after | live sessions | tracemalloc growth | growing sites "
            "in the package |"
        )
        add("| --- | ---: | ---: | --- | --- | ---: | ---: | --- |")
        for venv, m in memory.items():
            steps = " → ".join(f"{c['rss_kib'] / 1024:.1f}" for c in m["checkpoints"])
            sites = (
                "; ".join(
                    f"`{_short(s['site'])}` {s['size_diff']:+,} B"
                    for s in m["package_growing_sites"]
                )
                or "none"
            )
            add(
                f"| {LABELS[venv]} ({m['package']}) | {m['rss_start_kib'] / 1024:.1f} MB | "
                f"{(m['rss_end_kib'] - m['rss_start_kib']) / 1024:+.2f} MB | {steps} | "
                f"{m['gc_objects_start']:,} → {m['gc_objects_end']:,} | {m['live_sessions']} | "
                f"{m['traced_growth_bytes']:+,} B | {sites} |"
            )
        add("")
        for venv, m in memory.items():
            top = (
                ", ".join(
                    f"`{_short(s['site'])}` {s['size_diff']:+,} B ({s['count_diff']:+} blocks)"
                    for s in m["top_growing_sites"][:3]
                )
                or "none"
            )
            add(f"- {LABELS[venv]}, largest growing sites anywhere: {top}.")
        add("")
    return "\n".join(lines)


def _short(site: str) -> str:
    parts = Path(site).parts
    for marker in ("site-packages", "src"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1 :])
    return "/".join(parts[-2:])


def update_docs(markdown: str) -> None:
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    text = DOCS.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"bench: {DOCS} has no {begin} … {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOCS.write_text(f"{head}{begin}\n{markdown}\n{end}{tail}")
    log(f"bench: updated {DOCS.relative_to(ROOT)}")


# -- main ------------------------------------------------------------------------------------


def _env_list(name: str, default: tuple[str, ...]) -> list[str]:
    value = os.environ.get(name)
    return value.split(",") if value else list(default)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)))
    parser.add_argument(
        "--databases",
        default=",".join(_env_list("BENCH_DATABASES", ("sqlite", "postgresql"))),
        help="sqlite, postgresql, mariadb (default: sqlite,postgresql)",
    )
    parser.add_argument("--modes", default=",".join(_env_list("BENCH_MODES", MODES)))
    parser.add_argument("--scenarios", default=",".join(_env_list("BENCH_SCENARIOS", SCENARIOS)))
    parser.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get("BENCH_SCALE", 1)),
        help="multiplies every request count",
    )
    parser.add_argument(
        "--memory-requests",
        type=int,
        default=int(os.environ.get("BENCH_MEMORY_REQUESTS", 100_000)),
        help="0 skips the memory test",
    )
    parser.add_argument("--no-micro", action="store_true", help="skip the middleware-alone step")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round, a tenth of the requests, 5,000 for memory",
    )
    parser.add_argument(
        "--update-docs", action="store_true", help="write the report into docs/performance.md"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only render benchmarks/results/latest.json again (with --update-docs: into the docs)",
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "latest.json").read_text())
        markdown = report(saved, summarize(saved["runs"]), saved["memory"], saved["micro"])
        print(markdown)
        if args.update_docs:
            update_docs(markdown)
        return
    if args.quick:
        args.rounds, args.scale, args.memory_requests = 1, args.scale / 10, 5_000
    started = time.time()
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())

    bench_cpu, aux_cpu = plan_cpus()
    if aux_cpu is not None:
        os.sched_setaffinity(0, {int(aux_cpu)})  # keep this script off the benchmark CPU

    python = find_python()
    for name in ("ours", "published"):
        ensure_venv(name, python)
    versions = {name: package_versions(name) for name in ("ours", "published")}

    modes = [m for m in args.modes.split(",") if m]
    scenarios = [s for s in args.scenarios.split(",") if s]
    runs: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {}
    memory: dict[str, Any] = {}
    with Databases([d for d in args.databases.split(",") if d], aux_cpu) as databases:
        dbs = [d for d in databases.wanted if d in databases.urls]
        for mode in modes:
            for db in dbs:
                runs[f"{mode}/{db}"] = {}
        for round_number in range(args.rounds):
            # Reversed every other round, so a slow drift of the machine favours no one.
            order = list(CONTENDERS) if round_number % 2 == 0 else list(reversed(CONTENDERS))
            for db in dbs:
                for label, contender, venv in order:
                    result = run_worker(
                        contender,
                        venv,
                        db,
                        databases.urls[db],
                        modes,
                        scenarios,
                        args.scale,
                        bench_cpu,
                        aux_cpu,
                    )
                    for mode, by_scenario in result["results"].items():
                        for scenario, timings in by_scenario.items():
                            cell = runs[f"{mode}/{db}"].setdefault(scenario, {})
                            metrics = cell.setdefault(label, {m: [] for m in METRICS})
                            for metric in METRICS:
                                metrics[metric].append(statistics.median(timings[metric]))
                log(
                    f"bench: round {round_number + 1}/{args.rounds}, {db} done "
                    f"({(time.time() - started) / 60:.1f} min)"
                )
        micro: dict[str, Any] = {}
        if not args.no_micro:
            for venv in ("ours", "published"):
                micro[venv] = run_micro(venv, bench_cpu)
        if args.memory_requests > 0:
            # Memory needs no quiet CPU: both run at once, one on each CPU.
            log(f"bench: memory, {args.memory_requests:,} requests each for ours and 0.8.1")
            processes = {
                venv: start_memory(venv, args.memory_requests, cpu, databases._tmp)
                for venv, cpu in (("ours", bench_cpu), ("published", aux_cpu))
            }
            memory = {venv: finish_memory(venv, p) for venv, p in processes.items()}
        database_notes = {db: databases.notes.get(db, "") for db in databases.wanted}

    argv = " ".join(arg for arg in sys.argv[1:] if arg != "--update-docs")
    raw = {
        "meta": {
            "command": " ".join(
                [
                    *(f"{k}={v}" for k, v in sorted(os.environ.items()) if k in KNOBS),
                    "make bench",
                    *([f"BENCH_ARGS='{argv}'"] if argv else []),
                ]
            ),
            "finished": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "seconds": time.time() - started,
            "nproc": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "kernel": platform.release(),
            "bench_cpu": bench_cpu,
            "aux_cpu": aux_cpu,
            "python": python_version(python),
            "python_path": python,
            "versions": versions,
            "databases": database_notes,
            "rounds": args.rounds,
            "scale": args.scale,
            "loadavg_start": loadavg_start,
            "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        },
        "runs": runs,
        "micro": micro,
        "memory": memory,
    }
    summary = summarize(runs)
    markdown = report(raw, summary, memory, micro)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({**raw, "summary": summary}, indent=1))
    (RESULTS / "latest.md").write_text(markdown + "\n")
    print(markdown)
    log(
        f"bench: wrote {(RESULTS / 'latest.md').relative_to(ROOT)} and latest.json "
        f"in {(time.time() - started) / 60:.1f} min"
    )
    if args.update_docs:
        update_docs(markdown)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
