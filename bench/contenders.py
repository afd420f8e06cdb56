"""The contenders and how one measurement of each is taken.

Every contender exports the same tenant's rows and runs in its own process, measured by
``bench.measure``: psql's ``\\copy`` (the practical limit), the naive fetch-all worker, and
pulse_exports end to end (submit -> sensor tick -> run worker process -> parts -> manifest ->
COMPLETED) for each format and store, as under Dagster's ``DefaultRunLauncher`` (a new process per
run). The ``pulse-warm-*`` contenders run pulse_exports as the product does with the warm run launcher:
POST to the real API, GraphQL launch, queued run forked from a warm zygote (``bench.warm``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import cpu_seconds, run_measured

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    kind: str  # psql | naive | pulse
    format: str = "csv"
    compression: str | None = None
    storage: str = "file"  # file | s3
    submit: str = "api"  # warm contenders: POST to the API (GraphQL launch), or an export_jobs row for the sensor


PSQL = Contender("psql", "psql \\copy CSV", "psql")
NAIVE = Contender("naive", "naive: psycopg fetchall + csv.DictWriter", "naive")
PULSE = [
    Contender(f"pulse-{name}-{storage}", f"pulse_exports {label} -> {storage}", "pulse", fmt, compression, storage)
    for storage in ("file", "s3")
    for name, label, fmt, compression in (
        ("csv", "CSV", "csv", "none"),
        ("csvgz", "CSV gzip", "csv", "gzip"),
        ("ndjson", "NDJSON", "ndjson", "none"),
        ("parquet", "Parquet (zstd)", "parquet", "zstd"),
    )
]
# The same exports as the product runs them with the warm run launcher (bench/warm.py): POST /api/v1/exports
# to a real API, webserver and daemon; the run is forked from a pre-imported zygote.
WARM = [
    Contender(f"pulse-warm-{name}-{storage}", f"pulse_exports {label} -> {storage}, API + warm launcher", "warm", *spec)
    for storage in ("file", "s3")
    for name, label, spec in (
        ("csv", "CSV", ("csv", "none", storage)),
        ("parquet", "Parquet (zstd)", ("parquet", "zstd", storage)),
    )
]
# The same, submitted as a bare export_jobs row (any producer may insert one): the daemon's export_jobs_sensor
# (`pulse-exports daemon`: woken by the row's NOTIFY; the sensor's interval is 1 s) queues the run.
WARM_SENSOR = [
    Contender(f"pulse-warm-sensor-{name}-file", f"pulse_exports {label} -> file, sensor + warm launcher", "warm", *spec)
    for name, label, spec in (
        ("csv", "CSV", ("csv", "none", "file", "sensor")),
        ("parquet", "Parquet (zstd)", ("parquet", "zstd", "file", "sensor")),
    )
]
ALL = [PSQL, NAIVE, *PULSE, *WARM, *WARM_SENSOR]
BY_KEY = {c.key: c for c in ALL}


@dataclass
class Target:
    """The rows one scale exports: a tenant of a seeded database, optionally cut by a row limit."""

    database_url: str
    tenant: str
    rows: int
    row_limit: int | None
    query: str  # the SELECT the catalog builds for this export (psql runs exactly this)


@dataclass
class Environment:
    """What the contenders share within one benchmark invocation."""

    workdir: Path
    psql: Path
    dagster_home: Path
    s3: Any | None = None  # servers.S3Endpoint
    s3_server_pid: int | None = None  # the S3 server's process when it runs here (its CPU is measured)
    s3_bucket: str = "pulse-bench"
    _stores: dict[str, Any] = field(default_factory=dict)
    _defs: dict[tuple[str, str], Any] = field(default_factory=dict)
    _instance: Any = None
    _warm: dict[tuple[str, str], Any] = field(default_factory=dict)  # (database, store) -> warm.WarmStack

    def storage_url(self, storage: str) -> str:
        if storage == "s3":
            return f"s3://{self.s3_bucket}/exports"
        return (self.workdir / "store").as_uri()

    def export_storage(self, storage: str) -> Any:
        from pulse_exports.resources import ExportStorage

        if storage == "s3":
            if self.s3 is None:
                raise RuntimeError("S3 contenders need an S3 endpoint")
            return ExportStorage(
                url=self.storage_url("s3"),
                endpoint_url=self.s3.url,
                access_key_id=self.s3.access_key_id,
                secret_access_key=self.s3.secret_access_key,
                region_name=self.s3.region_name,
            )
        return ExportStorage(url=self.storage_url("file"))

    def store(self, storage: str) -> Any:
        if storage not in self._stores:
            self._stores[storage] = self.export_storage(storage).get_store()
        return self._stores[storage]

    def definitions(self, database_url: str, storage: str) -> Any:
        """The Definitions the 'daemon' (this process) ticks the sensor with."""
        from pulse_exports.definitions import build_definitions
        from pulse_exports.resources import PulseDatabase

        key = (database_url, storage)
        if key not in self._defs:
            self._defs[key] = build_definitions(
                database=PulseDatabase(url=database_url), storage=self.export_storage(storage)
            )
        return self._defs[key]

    def instance(self) -> Any:
        import dagster as dg

        if self._instance is None:
            self._instance = dg.DagsterInstance.get()
        return self._instance

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DAGSTER_HOME"] = str(self.dagster_home)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        if self.s3 is not None:
            env["AWS_ACCESS_KEY_ID"] = self.s3.access_key_id
            env["AWS_SECRET_ACCESS_KEY"] = self.s3.secret_access_key
            env["AWS_DEFAULT_REGION"] = self.s3.region_name
        return env

    def warm_stack(self, database_url: str, storage: str) -> Any:
        """The webserver + daemon + API deployment for this database and store, started on first use.
        Stacks of other databases (another scale's) are stopped first: one runs at a time."""
        from bench.warm import StackFailed, WarmStack

        key = (database_url, storage)
        for other in [k for k in self._warm if k[0] != database_url]:
            self._close_stack(other)
        if key not in self._warm:
            if storage == "s3" and self.s3 is None:
                raise RuntimeError("S3 contenders need an S3 endpoint")
            stack = WarmStack(database_url, self.storage_url(storage), self.s3 if storage == "s3" else None)
            self._warm[key] = stack  # registered first: a failed start is still stopped by close()
            print(f"starting Dagster (code server, webserver, daemon) and the API ({storage}) ...", flush=True)
            started = time.monotonic()
            try:
                stack.start()
            except StackFailed as exc:
                self._close_stack(key)
                raise ContenderFailed(f"the warm stack did not start: {exc}") from exc
            print(f"started in {time.monotonic() - started:.0f} s", flush=True)
        if self._warm[key].resume():
            time.sleep(RESUME_SETTLE_SECONDS)
        return self._warm[key]

    def pause_stacks(self, keep: tuple[str, str] | None = None) -> None:
        """Pause every warm stack but ``keep`` (database, store): the contender measured next runs beside
        its own deployment only, never beside the other store's idle one."""
        for key, stack in self._warm.items():
            if key != keep:
                stack.pause()

    def _close_stack(self, key: tuple[str, str]) -> None:
        stack = self._warm.pop(key)
        stack.close()

    def close(self) -> None:
        # A second Ctrl-C must not leave services running: the stacks are stopped with SIGINT ignored.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for key in list(self._warm):
                self._close_stack(key)
        finally:
            signal.signal(signal.SIGINT, previous)
        if self._instance is not None:
            self._instance.dispose()
            self._instance = None


# After SIGCONT a paused stack's daemon and webserver run the loops they missed at once (the first POST
# after a resume was answered in 0.15-0.18 s instead of 0.04 s): let them settle before the clock starts.
RESUME_SETTLE_SECONDS = 2.0


class ContenderFailed(RuntimeError):
    pass


def measure(contender: Contender, target: Target, env: Environment) -> dict[str, Any]:
    """Run the contender once on the target's rows; returns one result record."""
    env.pause_stacks((target.database_url, contender.storage) if contender.kind == "warm" else None)
    s3_server = env.s3_server_pid if contender.storage == "s3" else None
    s3_cpu_before = cpu_seconds(s3_server) if s3_server else 0.0
    if contender.kind == "psql":
        record = _measure_psql(target, env)
    elif contender.kind == "naive":
        record = _measure_naive(target, env)
    elif contender.kind == "warm":
        record = _measure_warm(contender, target, env)
    else:
        record = _measure_pulse(contender, target, env)
    if record["rows"] != target.rows:
        raise ContenderFailed(f"{contender.key} exported {record['rows']} rows, expected {target.rows}")
    if s3_server:
        # It shares the machine's cores with the export: its CPU is part of what an S3 contender waits for.
        record["s3_server_cpu_seconds"] = cpu_seconds(s3_server) - s3_cpu_before
    return {"contender": contender.key, **record}


def _check(contender: str, measured: Any) -> None:
    if measured.returncode != 0:
        tail = (measured.stderr or measured.stdout)[-3000:]
        raise ContenderFailed(f"{contender} exited with {measured.returncode}:\n{tail}")


def psql_plan(database_url: str, query: str) -> str:
    """PostgreSQL's plan for the query, as a chain of node types (parallel workers noted): psql's time
    depends on it (a parallel scan and sort uses both cores; an index scan, one)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        node = conn.execute(f"EXPLAIN (FORMAT JSON) {query}").fetchone()[0][0]["Plan"]  # type: ignore[index]
    steps = []
    while node:
        workers = f" ({node['Workers Planned']} workers)" if "Workers Planned" in node else ""
        steps.append(("Parallel " if node.get("Parallel Aware") else "") + node["Node Type"] + workers)
        node = (node.get("Plans") or [None])[0]
    return " > ".join(steps)


def _measure_psql(target: Target, env: Environment) -> dict[str, Any]:
    plan = psql_plan(target.database_url, target.query)  # just before: autovacuum's statistics may change it
    out = env.workdir / "psql.csv"
    copy = f"\\copy ({target.query}) TO '{out}' CSV HEADER"
    argv = [str(env.psql), target.database_url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", copy]
    measured = run_measured(argv, env=env.child_env())
    _check("psql", measured)
    rows = _csv_lines(out) - 1
    size = out.stat().st_size
    out.unlink()
    return {"seconds": measured.seconds, "peak_rss": measured.peak_rss, "bytes": size, "rows": rows, "plan": plan}


def _measure_naive(target: Target, env: Environment) -> dict[str, Any]:
    out = env.workdir / "naive.csv"
    argv = [sys.executable, "-m", "bench.worker", "naive", "--database-url", target.database_url]
    argv += ["--tenant", target.tenant, "--out", str(out)]
    if target.row_limit is not None:
        argv += ["--row-limit", str(target.row_limit)]
    measured = run_measured(argv, env=env.child_env(), cwd=REPO)
    _check("naive", measured)
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    size = out.stat().st_size
    out.unlink()
    peak = max(measured.peak_rss, int(result["vm_hwm"]))
    return {
        "seconds": measured.seconds,
        "peak_rss": peak,
        "peak_anon": measured.peak_anon,
        "bytes": size,
        "rows": int(result["rows"]),
    }


def _measure_pulse(contender: Contender, target: Target, env: Environment) -> dict[str, Any]:
    """submit -> sensor tick (here, as the daemon would) -> run worker process -> COMPLETED."""
    from pulse_exports.catalog import Catalog
    from pulse_exports.jobstore import JobStore
    from pulse_exports.local_runs import tick_export_sensor
    from pulse_exports.pipeline import MANIFEST_NAME, export_prefix

    jobs = JobStore(target.database_url)
    request = Catalog.load().validate(
        tenant_id=target.tenant,
        export_type="telemetry",
        format=contender.format,
        compression=contender.compression,
        row_limit=target.row_limit,
    )
    defs = env.definitions(target.database_url, contender.storage)
    instance = env.instance()
    started = time.monotonic()
    submitted_at = time.time()
    job, _ = jobs.create(request, created_by="bench", idempotency_key=f"bench-{uuid.uuid4().hex}")
    requests = tick_export_sensor(defs, instance)
    if [r.partition_key for r in requests] != [str(job.id)]:
        raise ContenderFailed(f"the sensor requested {[r.partition_key for r in requests]}, expected [{job.id}]")
    argv = [sys.executable, "-m", "bench.worker", "pulse-run", "--database-url", target.database_url]
    argv += ["--export-id", str(job.id), "--tenant", target.tenant, "--storage-url", env.storage_url(contender.storage)]
    if contender.storage == "s3":
        argv += ["--s3-endpoint", env.s3.url]
    measured = run_measured(argv, env=env.child_env(), cwd=REPO, started=started)
    _check(contender.key, measured)
    marks = json.loads(measured.stdout.strip().splitlines()[-1])
    done = jobs.get(job.id)
    if done is None or done.status != "COMPLETED" or not marks.get("success"):
        status = done.status if done else "missing"
        raise ContenderFailed(f"{contender.key}: export {job.id} ended {status}: {done.error if done else ''}")
    store = env.store(contender.storage)
    prefix = export_prefix(target.tenant, str(job.id))
    if not store.exists(prefix + MANIFEST_NAME):
        raise ContenderFailed(f"{contender.key}: export {job.id} is COMPLETED without a manifest")
    store.delete_prefix(prefix)
    first = marks.get("first_batch_at")
    return {
        # submit -> COMPLETED; the worker's interpreter shutdown after that is process_seconds
        "seconds": marks["run_finished_at"] - submitted_at,
        "process_seconds": measured.seconds,
        "peak_rss": max(measured.peak_rss, int(marks["vm_hwm"])),
        "peak_anon": measured.peak_anon,
        "bytes": int(done.file_size_bytes or 0),
        "rows": int(done.row_count or 0),
        "first_row_seconds": (first - submitted_at) if first else None,
        "worker_start_seconds": marks["run_started_at"] - submitted_at,
    }


def warm_up(contender: Contender, target: Target, env: Environment) -> None:
    """Start the contender's stack and run one small untimed export: the first launch after the daemon
    starts imports everything in the zygote (~1-2 s), which no later launch pays."""
    from bench.warm import WARMUP_ROWS, StackFailed

    stack = env.warm_stack(target.database_url, contender.storage)
    if stack.warmed:
        return
    try:
        done = stack.export(contender.format, contender.compression, row_limit=min(WARMUP_ROWS, target.rows))
    except StackFailed as exc:
        raise ContenderFailed(f"{contender.key} warm-up: {exc}") from exc
    env.store(contender.storage).delete_prefix(_prefix(target.tenant, done["export_id"]))
    stack.warmed = True


def _measure_warm(contender: Contender, target: Target, env: Environment) -> dict[str, Any]:
    """POST /api/v1/exports -> GraphQL launch -> queue -> forked run worker -> COMPLETED (bench/warm.py)."""
    from bench.warm import StackFailed
    from pulse_exports.pipeline import MANIFEST_NAME

    stack = env.warm_stack(target.database_url, contender.storage)
    try:
        record = stack.export(contender.format, contender.compression, target.row_limit, via=contender.submit)
    except StackFailed as exc:
        raise ContenderFailed(f"{contender.key}: {exc}") from exc
    store = env.store(contender.storage)
    prefix = _prefix(target.tenant, record["export_id"])
    if not store.exists(prefix + MANIFEST_NAME):
        raise ContenderFailed(f"{contender.key}: export {record['export_id']} is COMPLETED without a manifest")
    store.delete_prefix(prefix)
    if not record["peak_rss"]:
        raise ContenderFailed(f"{contender.key}: the run worker exited before its memory was read")
    return record


def _prefix(tenant: str, export_id: str) -> str:
    from pulse_exports.pipeline import export_prefix

    return export_prefix(tenant, export_id)


def _csv_lines(path: Path) -> int:
    lines = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            lines += chunk.count(b"\n")
    return lines
