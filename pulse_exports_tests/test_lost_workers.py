"""Lost workers and crashed runs: heartbeats, the reconciler, and hand-over to Dagster's run retries."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from pulse_exports.jobs import export_job
from pulse_exports.jobstore import ExportJob
from pulse_exports.local_runs import tick_export_sensor
from pulse_exports.resources import ExportSettings, PulseDatabase
from pulse_exports.sensors import export_reconciler_sensor, export_run_failure_sensor

from .exports_harness import ExportHarness

TENANT = "tenant-002"


@pytest.fixture
def retrying_instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """An instance with dagster.yaml's run retries: one retry of a crashed run."""
    overrides = {"run_retries": {"enabled": True, "max_retries": 1, "retry_on_asset_or_op_failure": False}}
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
        yield instance


def claimed_by_dying_worker(exports: ExportHarness, **tags: str) -> tuple[ExportJob, dg.DagsterRun]:
    """A job claimed by a run whose worker then went silent (heartbeat ten minutes old)."""
    job = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    (request,) = tick_export_sensor(exports.defs, exports.instance)
    run = exports.instance.create_run_for_job(job_def=export_job, tags={**request.tags, **tags})
    assert exports.jobs.claim(job.id, run.run_id) is not None
    with psycopg.connect(exports.database_url, autocommit=True) as conn:
        conn.execute("UPDATE export_jobs SET heartbeat_at = now() - interval '10 minutes' WHERE id = %s", (job.id,))
    return job, run


def reconcile(exports: ExportHarness) -> None:
    context = dg.build_sensor_context(
        instance=exports.instance,
        resources={"database": PulseDatabase(url=exports.database_url), "storage": exports.storage,
                   "settings": ExportSettings()},
    )  # fmt: skip
    export_reconciler_sensor(context)


def run_failure_sensor_sees(exports: ExportHarness, run_id: str) -> None:
    run = exports.instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
    event = next(
        e.dagster_event
        for e in exports.instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.RUN_FAILURE
    )
    context = dg.build_run_status_sensor_context(
        sensor_name=export_run_failure_sensor.name,
        dagster_event=event,
        dagster_instance=exports.instance,
        dagster_run=run,
        resources={"database": PulseDatabase(url=exports.database_url), "storage": exports.storage},
    ).for_run_failure()
    export_run_failure_sensor(context)


def test_silent_worker_gets_its_run_failed_and_the_job_failed_worker_lost(exports: ExportHarness) -> None:
    job, run = claimed_by_dying_worker(exports)
    reconcile(exports)
    assert exports.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    run_failure_sensor_sees(exports, run.run_id)
    done = exports.jobs.get(job.id)
    assert done.status == "FAILED" and "worker lost" in done.error


def test_crashed_run_that_dagster_will_retry_is_left_for_the_retry(
    exports: ExportHarness, retrying_instance: dg.DagsterInstance
) -> None:
    exports.instance = retrying_instance
    job, run = claimed_by_dying_worker(exports)
    reconcile(exports)
    run_failure_sensor_sees(exports, run.run_id)
    waiting = exports.jobs.get(job.id)
    assert waiting.status == "RUNNING" and "a retry will take over" in waiting.error

    retry_run_id = "retry-of-" + run.run_id[:8]
    assert exports.jobs.claim(job.id, "someone-else") is None  # not claimable by a stranger
    taken = exports.jobs.claim(job.id, retry_run_id, parent_run_id=run.run_id)
    assert taken is not None and taken.run_id == retry_run_id and taken.attempts == 2 and taken.error is None


def test_retries_spent_end_in_failed_worker_lost(exports: ExportHarness, retrying_instance: dg.DagsterInstance) -> None:
    exports.instance = retrying_instance
    job, run = claimed_by_dying_worker(exports, **{"dagster/retry_number": "1"})
    reconcile(exports)
    run_failure_sensor_sees(exports, run.run_id)
    done = exports.jobs.get(job.id)
    assert done.status == "FAILED" and "worker lost" in done.error


def test_worker_killed_under_a_live_code_server_ends_failed_worker_lost_without_files(
    exports: ExportHarness,
) -> None:
    """The code server logs how its run process died; once no retry follows, that is the job's reason."""
    job, run = claimed_by_dying_worker(exports)
    prefix = f"{TENANT}/{job.id}/"
    exports.store.put_bytes(f"{prefix}part-00000.csv", b"seq\n1\n")  # what the worker uploaded before dying
    exports.instance.report_engine_event(
        f"Run execution process for {run.run_id} was terminated by signal 9 (SIGKILL). This usually indicates...",
        run,
    )
    exports.instance.report_run_failed(run)
    run_failure_sensor_sees(exports, run.run_id)
    done = exports.jobs.get(job.id)
    assert done.status == "FAILED"
    reason = "worker lost: its process was terminated by signal 9 (SIGKILL)"
    assert done.error == f"Dagster run {run.run_id} failed: {reason}"
    assert exports.store.list_keys(prefix) == []


def test_reconciler_waits_for_a_retry_dagster_has_yet_to_launch(
    exports: ExportHarness, retrying_instance: dg.DagsterInstance
) -> None:
    exports.instance = retrying_instance
    job, run = claimed_by_dying_worker(exports)
    exports.instance.report_run_failed(run, message="gone")  # tagged dagster/will_retry=true, no retry yet
    reconcile(exports)
    assert exports.jobs.get(job.id).status == "RUNNING"  # the retry's claim will take it over

    exports.instance.add_run_tags(run.run_id, {"dagster/will_retry": "false"})  # the retry daemon gave up
    reconcile(exports)
    done = exports.jobs.get(job.id)
    assert done.status == "FAILED" and "worker lost" in done.error


def test_reconciler_fails_a_stale_job_whose_run_already_ended(exports: ExportHarness) -> None:
    job, run = claimed_by_dying_worker(exports)
    exports.instance.report_run_failed(run, message="gone")  # ended, and no retry will come
    reconcile(exports)
    done = exports.jobs.get(job.id)
    assert done.status == "FAILED" and "worker lost" in done.error


def test_live_worker_is_left_alone(exports: ExportHarness) -> None:
    job = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    tick_export_sensor(exports.defs, exports.instance)
    assert exports.jobs.claim(job.id, "live-run") is not None
    reconcile(exports)
    assert exports.jobs.get(job.id).status == "RUNNING"
    assert exports.jobs.heartbeat(job.id, "live-run") is True
    assert exports.jobs.heartbeat(job.id, "other-run") is False
