"""A bounded HTTP/1.1 load generator for a server on the loopback interface (stdlib only).

It opens ``--connections`` keep-alive connections to 127.0.0.1, sends ``--warmup`` requests that
are not timed, then ``--requests`` timed requests split into ``--segments`` equal segments, and
stops. Every response must be a 2xx with the expected body length; anything else fails the run.
It prints one JSON line when the warm-up is over and one per segment (its seconds and request
count), as each happens, so the server can read its own CPU time at the same moments.

    python loadgen.py --port 8000 --path /select1 --requests 2000 --connections 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


def build_request(method: str, path: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n").encode()


async def _connection_loop(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, count: int
) -> None:
    for _ in range(count):
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        if not 200 <= status < 300:
            raise RuntimeError(f"HTTP {status}: {head[:200]!r}")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
                break
        else:
            raise RuntimeError(f"no content-length in {head[:200]!r}")
        await reader.readexactly(length)


async def main(args: argparse.Namespace) -> None:
    request = build_request(args.method, args.path)
    connections = [
        await asyncio.open_connection("127.0.0.1", args.port) for _ in range(args.connections)
    ]

    async def run(total: int) -> None:
        per_connection, extra = divmod(total, len(connections))
        await asyncio.gather(
            *(
                _connection_loop(reader, writer, request, per_connection + (i < extra))
                for i, (reader, writer) in enumerate(connections)
            )
        )

    await run(args.warmup)
    report({"warm": True})
    per_segment = max(1, args.requests // args.segments)
    for _ in range(args.segments):
        start = time.perf_counter()
        await run(per_segment)
        report(
            {"segment_seconds": time.perf_counter() - start, "requests_per_segment": per_segment}
        )
    for _, writer in connections:
        writer.close()


def report(event: dict[str, object]) -> None:
    """One JSON line per event, flushed at once: the server reads its CPU time at each."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this (s)")
    arguments = parser.parse_args()
    try:
        asyncio.run(asyncio.wait_for(main(arguments), arguments.timeout))
    except Exception as exc:  # report and fail: the worker turns this into an error
        report({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
