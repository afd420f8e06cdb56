"""``python -m bench.api_load``: how fast POST /api/v1/exports answers under 50 concurrent clients.

Starts the API (``pulse-exports serve``) on loopback against a PostgreSQL (the embedded one unless
``--database-url`` is given) with file storage, then runs N clients that each create exports back to
back (closed loop, no pause) for a bounded time, and prints latency percentiles. The API launches
nothing here (no Dagster GraphQL URL): this measures the API and its database, which is what a
caller waits for; launching adds one Dagster round trip (see the README). Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from pulse_exports.embedded import free_port

TARGET_P95_MS = 100.0


@contextmanager
def embedded_database(workdir: Path) -> Iterator[str]:
    from pulse_exports.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(workdir / "pg")
    try:
        yield server.start()
    finally:
        server.stop()


@contextmanager
def api_server(
    database_url: str, storage_url: str, workers: int, workdir: Path, extra_env: dict[str, str]
) -> Iterator[str]:
    """``pulse-exports serve`` in its own process group; yields its base URL once /health answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DAGSTER_"))}
    env.update(PULSE_DATABASE_URL=database_url, PULSE_STORAGE_URL=storage_url, **extra_env)
    log = (workdir / "api.log").open("wb")
    command = [sys.executable, "-m", "pulse_exports.cli", "serve", "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{(workdir / 'api.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


async def _post_loop(
    host: str, port: int, request: bytes, deadline: float, budget: list[int], latencies: list[float]
) -> int:
    """One client on one keep-alive connection: POST, read the whole answer, repeat. Returns its errors.

    A few lines of HTTP/1.1 over asyncio streams instead of an HTTP client library: the load
    generator shares the machine's two cores with the API, so it must spend as little as possible.
    """
    errors = 0
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            elapsed = time.perf_counter() - started
            if status_line.split(b" ", 2)[1:2] == [b"202"]:
                latencies.append(elapsed)
            else:
                errors += 1
    finally:
        writer.close()
        await writer.wait_closed()
    return errors


async def run_clients(
    url: str, key: str, *, clients: int, seconds: float, max_requests: int, body: dict[str, Any]
) -> tuple[list[float], int]:
    """``clients`` concurrent loops of POST /exports until ``seconds`` pass or ``max_requests`` are sent."""
    parts = httpx.URL(url)
    payload = json.dumps(body).encode()
    request = (
        f"POST /api/v1/exports HTTP/1.1\r\nHost: {parts.host}:{parts.port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    latencies: list[float] = []
    budget = [max_requests]
    deadline = time.monotonic() + seconds
    loops = [_post_loop(parts.host, parts.port or 80, request, deadline, budget, latencies) for _ in range(clients)]
    errors = sum(await asyncio.gather(*loops))
    return latencies, errors


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="A PostgreSQL to create a scratch database on; default: embedded.")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=100_000, help="Upper bound on requests sent.")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes.")
    parser.add_argument("--pool-size", type=int, default=8, help="PULSE_DB_POOL_SIZE of each worker.")
    parser.add_argument("--no-estimate", action="store_true", help="PULSE_ESTIMATE_ROWS=false: no EXPLAIN per request.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    parser.add_argument("--check", action="store_true", help=f"Exit 1 when p95 >= {TARGET_P95_MS:.0f} ms.")
    args = parser.parse_args(argv)

    from pulse_exports import migrations
    from pulse_exports.apikeys import ApiKeyStore
    from pulse_exports.sample_data import seed_demo

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pulse-api-load-")))
        server_url = args.database_url or stack.enter_context(embedded_database(workdir))
        database_url = _scratch_database(stack, server_url)
        migrations.upgrade(database_url)
        seed_demo(database_url, tenants=3, devices=300, telemetry_rows=20_000)
        key = ApiKeyStore(database_url).create("tenant-001", name="api load").secret
        extra_env = {"PULSE_DB_POOL_SIZE": str(args.pool_size), "PULSE_ESTIMATE_ROWS": str(not args.no_estimate)}
        storage_url = (workdir / "exports").as_uri()
        url = stack.enter_context(api_server(database_url, storage_url, args.workers, workdir, extra_env))
        body = {"export_type": "telemetry", "format": "parquet", "filters": {"time_range": "7d"}}
        if args.warmup_seconds > 0:
            warmup = {"clients": args.clients, "seconds": args.warmup_seconds, "max_requests": 5_000}
            asyncio.run(run_clients(url, key, body=body, **warmup))
        started = time.monotonic()
        latencies, errors = asyncio.run(
            run_clients(url, key, clients=args.clients, seconds=args.seconds, max_requests=args.max_requests, body=body)
        )
        wall = time.monotonic() - started

    ordered = sorted(latencies)
    result = {
        "clients": args.clients,
        "workers": args.workers,
        "seconds": round(wall, 2),
        "requests": len(latencies),
        "errors": errors,
        "requests_per_second": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * percentile(ordered, 0.50), 1),
        "p95_ms": round(1000 * percentile(ordered, 0.95), 1),
        "p99_ms": round(1000 * percentile(ordered, 0.99), 1),
        "mean_ms": round(1000 * statistics.fmean(ordered), 1),
        "target_p95_ms": TARGET_P95_MS,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"POST /exports, {result['clients']} concurrent clients, {result['workers']} API worker(s), "
            f"{result['seconds']} s: {result['requests']} created ({result['requests_per_second']}/s), "
            f"{result['errors']} errors\n"
            f"latency p50 {result['p50_ms']} ms  p95 {result['p95_ms']} ms  p99 {result['p99_ms']} ms"
            f"  (target p95 < {TARGET_P95_MS:.0f} ms)"
        )
    return 1 if errors or (args.check and result["p95_ms"] >= TARGET_P95_MS) else 0


def _scratch_database(stack: ExitStack, server_url: str) -> str:
    """A fresh database on the server, dropped at the end."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg
    from psycopg import sql

    name = f"pulse_api_load_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop() -> None:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    stack.callback(drop)
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


if __name__ == "__main__":
    sys.exit(main())
