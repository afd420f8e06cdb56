"""``kill -9`` of a run worker mid-export, with real dagster-webserver and dagster-daemon processes and the
production ``run_retries`` (one retry): the retry takes the export over and completes it, and a worker killed
again once the retry is spent leaves the export FAILED ("worker lost"). Never a job stuck RUNNING."""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pulse_exports.catalog import Catalog
from pulse_exports.jobstore import TERMINAL, ExportJob, JobStore
from pulse_exports.storage import ExportStore, store_from_url
from pulse_exports_tests.dagster_processes import DagsterServices, wait_for
from pulse_exports_tests.servers import S3Endpoint

from .test_api import insert_telemetry

pytestmark = pytest.mark.slow

TENANT = "tenant-003"
BULK_ROWS = 300_000
# Heartbeats every second, stale after 8 s, looked for every 5 s: a lost worker is noticed in seconds, not minutes.
DAGSTER_ENV = {
    "PULSE_EXPORT_HEARTBEAT_INTERVAL_SECONDS": "1",
    "PULSE_EXPORT_HEARTBEAT_TIMEOUT_SECONDS": "8",
    "PULSE_RECONCILER_INTERVAL_SECONDS": "5",
    "PULSE_EXPORT_BATCH_ROWS": "20000",  # progress (rows_done) shows up early, so the kill lands mid-export
}

_RUN_LOGS = """
query RunLogs($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events { __typename ... on MessageEvent { message } } }
  }
}
"""
_RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { runId status tags { key value } } }
}
"""


@pytest.fixture(scope="module")
def bulk_rows(dagster_services: DagsterServices) -> int:
    """The tenant's telemetry, grown so an export runs for several seconds; returns its row count."""
    insert_telemetry(dagster_services.database_url, TENANT, BULK_ROWS)
    with psycopg.connect(dagster_services.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry WHERE tenant_id = %s", (TENANT,)).fetchone()
    assert row is not None and row[0] > BULK_ROWS
    return int(row[0])


@pytest.fixture
def store(dagster_services: DagsterServices, s3_endpoint: S3Endpoint) -> ExportStore:
    return store_from_url(
        dagster_services.storage_url,
        endpoint_url=s3_endpoint.url,
        access_key_id=s3_endpoint.access_key_id,
        secret_access_key=s3_endpoint.secret_access_key,
        region_name=s3_endpoint.region_name,
    )


def submit(services: DagsterServices) -> ExportJob:
    """A PENDING export_jobs row; export_jobs_sensor in the daemon launches its run."""
    request = Catalog.load().validate(
        tenant_id=TENANT, export_type="telemetry", format="csv", options={"part_max_rows": 50_000}
    )
    job, created = JobStore(services.database_url).create(request, created_by="worker kill test")
    assert created
    return job


def running_mid_export(services: DagsterServices, export_id: uuid.UUID, not_run: str | None = None) -> ExportJob:
    """Wait until the export is RUNNING under a run other than ``not_run`` and has written rows, not all of them."""
    jobs = JobStore(services.database_url)

    def mid_export() -> ExportJob | None:
        job = jobs.get(export_id)
        assert job is not None and job.status not in TERMINAL, job
        running = job.status == "RUNNING" and job.run_id != not_run and job.rows_done > 0
        return job if running else None

    return wait_for("the export to be RUNNING mid-way", mid_export, services.processes, 150, 0.05)


def worker_pid(services: DagsterServices, run_id: str) -> int:
    """The run worker's pid, from the engine event Dagster's code server logs when it starts the run process."""
    logs = services.graphql(_RUN_LOGS, {"runId": run_id})["logsForRun"]
    assert logs["__typename"] == "EventConnection", logs
    pids = [
        int(m.group(1))
        for e in logs["events"]
        if (m := re.match(r"Started process for run \(pid: (\d+)\)", e.get("message") or ""))
    ]
    assert len(pids) == 1, logs
    return pids[0]


def kill_worker(services: DagsterServices, run_id: str, sig: signal.Signals = signal.SIGKILL) -> int:
    """Signal the run worker of ``run_id``: a process of the daemon's session (its code server's child)."""
    pid = worker_pid(services, run_id)
    assert services.daemon.process is not None
    assert os.getsid(pid) == services.daemon.process.pid, "the pid is not one of the daemon's processes"
    os.kill(pid, sig)
    return pid


def gone(pid: int) -> bool:
    """The process has exited (and been reaped, or is a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def ended(services: DagsterServices, export_id: uuid.UUID) -> ExportJob:
    """Wait until the export leaves RUNNING for good: a stuck job fails the test here."""
    jobs = JobStore(services.database_url)

    def terminal() -> ExportJob | None:
        job = jobs.get(export_id)
        return job if job is not None and job.status in TERMINAL else None

    return wait_for("the export to end", terminal, services.processes, 180, 0.5)


def dagster_run(services: DagsterServices, run_id: str) -> dict[str, Any]:
    run = services.graphql(_RUN, {"runId": run_id})["runOrError"]
    assert run["__typename"] == "Run", run
    return {"status": run["status"], "tags": {t["key"]: t["value"] for t in run["tags"]}}


def test_killed_worker_is_retried_and_the_retry_completes_the_export(
    dagster_services: DagsterServices, bulk_rows: int, store: ExportStore
) -> None:
    job = submit(dagster_services)
    first = running_mid_export(dagster_services, job.id)
    assert first.attempts == 1 and first.run_id is not None
    kill_worker(dagster_services, first.run_id)

    done = ended(dagster_services, job.id)
    assert done.status == "COMPLETED", done.error
    assert done.attempts == 2 and done.run_id != first.run_id
    assert done.row_count == bulk_rows and done.rows_done == bulk_rows
    assert dagster_run(dagster_services, first.run_id)["status"] == "FAILURE"
    retry = dagster_run(dagster_services, done.run_id)
    assert retry["tags"]["dagster/parent_run_id"] == first.run_id and retry["tags"]["dagster/retry_number"] == "1"

    # The retry rewrote the export from scratch: exactly the manifest's parts, rows adding up, no dangling uploads.
    assert done.manifest is not None
    parts = done.manifest["parts"]
    assert sum(p["rows"] for p in parts) == bulk_rows
    prefix = f"{TENANT}/{job.id}/"
    assert sorted(store.list_keys(prefix)) == sorted([p["key"] for p in parts] + [f"{prefix}manifest.json"])
    assert store.abort_multipart_uploads(prefix) == 0


def test_worker_killed_again_after_the_retry_ends_failed_worker_lost(
    dagster_services: DagsterServices, bulk_rows: int, store: ExportStore
) -> None:
    job = submit(dagster_services)
    first = running_mid_export(dagster_services, job.id)
    assert first.run_id is not None
    kill_worker(dagster_services, first.run_id)
    second = running_mid_export(dagster_services, job.id, not_run=first.run_id)
    assert second.attempts == 2 and second.run_id is not None
    kill_worker(dagster_services, second.run_id)  # max_retries is 1: no third attempt

    done = ended(dagster_services, job.id)
    print(f"after two kills: {done.status} ({done.error})")
    assert done.status == "FAILED" and done.error is not None and "worker lost" in done.error, done.error
    assert done.attempts == 2 and done.run_id == second.run_id and done.rows_done < bulk_rows
    assert dagster_run(dagster_services, second.run_id)["status"] == "FAILURE"
    # The sensor that marked it FAILED then removes the parts the killed workers uploaded.
    prefix = f"{TENANT}/{job.id}/"
    wait_for("the files to be gone", lambda: store.list_keys(prefix) == [], dagster_services.processes, 30)
    assert store.abort_multipart_uploads(prefix) == 0


def test_frozen_worker_is_replaced_through_the_reconciler_and_leaves_the_export_alone_when_it_wakes(
    dagster_services: DagsterServices, bulk_rows: int, store: ExportStore
) -> None:
    """SIGSTOP: the code server still sees the worker alive, so only its silent heartbeat tells it is lost."""
    job = submit(dagster_services)
    first = running_mid_export(dagster_services, job.id)
    assert first.run_id is not None
    pid = kill_worker(dagster_services, first.run_id, signal.SIGSTOP)
    try:
        done = ended(dagster_services, job.id)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert done.status == "COMPLETED", done.error
    assert done.attempts == 2 and done.run_id != first.run_id and done.row_count == bulk_rows
    assert dagster_run(dagster_services, first.run_id)["status"] == "FAILURE"  # failed by the reconciler

    # Woken up, the old worker finds the export taken over and stops, without touching the new attempt's files.
    wait_for("the old worker to stop", lambda: gone(pid), dagster_services.processes, 60)
    assert done.manifest is not None
    prefix = f"{TENANT}/{job.id}/"
    expected = sorted([p["key"] for p in done.manifest["parts"]] + [f"{prefix}manifest.json"])
    assert sorted(store.list_keys(prefix)) == expected
    after = JobStore(dagster_services.database_url).get(job.id)
    assert after is not None and (after.status, after.run_id, after.row_count) == ("COMPLETED", done.run_id, bulk_rows)
