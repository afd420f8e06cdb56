"""The one-command demo: embedded PostgreSQL, sample data and two real exports through Dagster."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psycopg

from pulse_exports import migrations
from pulse_exports.embedded import EmbeddedPostgres
from pulse_exports.redact import redact
from pulse_exports.sample_data import is_seeded, seed_demo, tenant_name

DEMO_DATABASE = "pulse"
DEMO_EXPORTS = (
    {"export_type": "telemetry", "format": "csv", "compression": "gzip", "filters": {"time_range": "90d"}},
    {"export_type": "devices", "format": "parquet"},
)


# The embedded instance: SQLite storage (Dagster's default), the production profile's queue limits
# (dagster.yaml at the repository root) with a half-second dequeue, and no telemetry. `make up` runs
# everything on one machine in one Python environment: runs start from the warm launcher's
# pre-imported process (~0.2 s) instead of a new interpreter (~1.5 s); see deploy/README.md.
_WRITTEN_BY = "# Written by pulse-exports (demo, dev); delete this line to keep your own edits.\n"
LOCAL_DAGSTER_YAML = (
    _WRITTEN_BY
    + """\
telemetry:
  enabled: false
run_coordinator:
  module: pulse_exports.run_coordinator
  class: FastQueuedRunCoordinator
  config:
    dequeue_interval_seconds: 0.25
run_launcher:
  module: pulse_exports.warm_launcher
  class: WarmRunLauncher
  config:
    # preload_s3: S3 runs skip boto3's import and botocore's model parsing
    preload: ["pulse_exports.definitions", "pulse_exports.storage:preload_s3"]
concurrency:
  runs:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: pulse/tenant
        value: {applyLimitPerUniqueValue: true}
        limit: 2
"""
)
_OLD_DAGSTER_YAML = "telemetry:\n  enabled: false\n"  # what earlier versions wrote; replaced


def ensure_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server if missing; return its URL."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return server_url.rsplit("/", 1)[0] + "/" + name


def prepare_environment(home: Path) -> dict[str, str]:
    """Fill in PULSE_DATABASE_URL, PULSE_STORAGE_URL and DAGSTER_HOME with embedded defaults."""
    home.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    if not os.environ.get("PULSE_DATABASE_URL"):
        server = EmbeddedPostgres(home / "pg").start()
        env["PULSE_DATABASE_URL"] = ensure_database(server, DEMO_DATABASE)
    if not os.environ.get("PULSE_STORAGE_URL"):
        env["PULSE_STORAGE_URL"] = (home / "exports").as_uri()
    if not os.environ.get("DAGSTER_HOME"):
        dagster_home = home / "dagster_home"
        dagster_home.mkdir(exist_ok=True)
        config = dagster_home / "dagster.yaml"
        current = config.read_text() if config.exists() else None
        if current is None or current == _OLD_DAGSTER_YAML or current.startswith(_WRITTEN_BY):
            config.write_text(LOCAL_DAGSTER_YAML)
        env["DAGSTER_HOME"] = str(dagster_home)
    os.environ.update(env)
    return env


def run_api_leg(home: Path, defs: Any, instance: Any) -> bool:
    """The product API's path: an API key, POST /exports, the sensor's launch, GET until done, download."""
    from pulse_exports.api import create_app
    from pulse_exports.api.in_thread import serve_in_thread
    from pulse_exports.apikeys import ApiKeyStore
    from pulse_exports.client import PulseExportsClient
    from pulse_exports.local_runs import run_pending_exports

    keys = ApiKeyStore(os.environ["PULSE_DATABASE_URL"])
    key = keys.create(tenant_name(1), name="demo")
    with serve_in_thread(create_app()) as base_url, PulseExportsClient(base_url, key.secret) as client:
        created = client.create("alerts", format="ndjson", filters={"time_range": "30d"})
        print(f"\nAPI:          {base_url}/docs  (key {key.key.prefix}..., tenant {key.key.tenant_id})")
        print(f"              POST /api/v1/exports -> {created.status.value} {created.export_id}")
        run_pending_exports(defs, instance, log_level="WARNING")  # what the daemon's sensor does
        done = client.wait(created.export_id, timeout=120, interval=0.2)
        completed = done.status.value == "COMPLETED"
        files = client.download(done.id, home / "api-download" / str(done.id)) if completed else []
        print(f"              GET  /api/v1/exports/{{id}} -> {done.status.value} rows={done.row_count}")
        print(f"              GET  /api/v1/exports/{{id}}/download -> {', '.join(str(f) for f in files) or '-'}")
    keys.revoke(str(key.key.id))  # the demo's key has done its job
    return completed and bool(files)


def run_demo(home: Path, *, telemetry_rows: int = 1_000_000) -> int:
    """Run the demo and print a summary; returns a process exit code."""
    import dagster as dg

    from pulse_exports.definitions import build_definitions
    from pulse_exports.local_runs import run_pending_exports
    from pulse_exports.resources import ExportStorage, PulseDatabase

    started = time.monotonic()
    env = prepare_environment(home)
    database_url = os.environ["PULSE_DATABASE_URL"]
    source_url = os.environ.get("PULSE_SOURCE_DATABASE_URL") or database_url
    print(f"job database: {redact(database_url)}")
    print(f"storage:      {os.environ['PULSE_STORAGE_URL']}")
    print(f"DAGSTER_HOME: {os.environ['DAGSTER_HOME']}")
    applied = migrations.upgrade(database_url)
    print(f"migrations:   {len(applied)} applied, at version {migrations.current_version(database_url)}")
    if not is_seeded(source_url):
        seeded = seed_demo(source_url, tenants=3, devices=600, telemetry_rows=telemetry_rows)
        print(
            f"sample data:  {seeded.telemetry_rows} telemetry rows, {seeded.devices} devices in {seeded.seconds:.1f}s"
        )
    database = PulseDatabase(url=database_url)
    catalog = database.catalog()
    jobs = database.jobs()
    submitted = []
    for spec in DEMO_EXPORTS:
        request = catalog.validate(tenant_id=tenant_name(1), **spec)  # type: ignore[arg-type]
        job, _ = jobs.create(request, created_by="demo")
        submitted.append(job.id)
        print(f"submitted:    {job.export_type} as {job.format} ({job.compression}) -> export {job.id}")
    defs = build_definitions(database=database, storage=ExportStorage(url=os.environ["PULSE_STORAGE_URL"]))
    with dg.DagsterInstance.get() as instance:
        runs = run_pending_exports(defs, instance, log_level="INFO")
        ok = _print_summary(jobs, submitted, runs)
        ok = run_api_leg(home, defs, instance) and ok
    print(f"\ndone in {time.monotonic() - started:.1f}s.")
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"Browse the runs:  {exports} dagster dev -w workspace.yaml" if exports else "Browse: dagster dev")
    print("Run it all (Dagster UI and daemon beside the API, on these embedded defaults):  make up")
    return 0 if ok else 1


def _print_summary(jobs: Any, submitted: list[Any], runs: list[Any]) -> bool:
    ok = True
    print()
    for export_id in submitted:
        job = jobs.get(export_id)
        assert job is not None
        run = next((r.run_id for r in runs if r.export_id == str(export_id)), "-")
        seconds = (job.completed_at - job.started_at).total_seconds() if job.completed_at and job.started_at else 0
        print(
            f"{job.export_type:<10} {job.status:<10} rows={job.row_count or 0:<9} bytes={job.file_size_bytes or 0:<10} "
            f"parts={len(job.manifest['parts']) if job.manifest else 0} time={seconds:.2f}s run={run}"
        )
        print(f"           files: {job.storage_location or '-'}")
        if job.error:
            print(f"           error: {job.error}")
        ok = ok and job.status == "COMPLETED"
    return ok
