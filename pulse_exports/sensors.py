"""Sensors: turn PENDING export_jobs rows into runs, and write back runs that end outside op code."""


import uuid
from datetime import timedelta

import dagster as dg

from pulse_exports.jobs import TAG_EXPORT_ID, export_job, export_tags, exports_partitions
from pulse_exports.resources import ExportSettings, PulseDatabase

# A QUEUED job whose run never appeared (a tick that failed after marking it) is requested
# again after this long; run_key dedupe makes that a no-op when the run does exist.
STALE_QUEUED_AFTER = timedelta(minutes=5)


@dg.sensor(
    job=export_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches one run per PENDING export_jobs row, oldest first (run_key = export id).",
)
def export_jobs_sensor(
    context: dg.SensorEvaluationContext, database: PulseDatabase, settings: ExportSettings
) -> dg.SensorResult:
    jobs = database.jobs()
    pending = jobs.pending(settings.sensor_batch_size, stale_queued_after=STALE_QUEUED_AFTER)
    if not pending:
        return dg.SensorResult(skip_reason="no pending exports")
    keys = [str(job.id) for job in pending]
    new_keys = [k for k in keys if not context.instance.has_dynamic_partition(exports_partitions.name, k)]
    requests = [dg.RunRequest(run_key=str(job.id), partition_key=str(job.id), tags=export_tags(job)) for job in pending]
    jobs.mark_queued([job.id for job in pending])
    context.log.info(f"requesting {len(requests)} export runs")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[exports_partitions.build_add_request(new_keys)] if new_keys else [],
    )


def _export_id(run: dg.DagsterRun) -> uuid.UUID | None:
    value = run.tags.get(TAG_EXPORT_ID) or run.tags.get("dagster/partition")
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


@dg.run_failure_sensor(
    monitored_jobs=[export_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="Marks an export FAILED when its run fails where op code could not (crash, lost worker).",
)
def export_run_failure_sensor(context: dg.RunFailureSensorContext, database: PulseDatabase) -> None:
    export_id = _export_id(context.dagster_run)
    if export_id is None:
        return
    message = (context.failure_event.message or "run failed").splitlines()[0][:500]
    reason = f"Dagster run {context.dagster_run.run_id} failed: {message}"
    if database.jobs().fail(export_id, reason, run_id=context.dagster_run.run_id):
        context.log.info(f"export {export_id} marked FAILED")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.CANCELED,
    monitored_jobs=[export_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="Marks an export CANCELLED when its run is terminated.",
)
def export_run_canceled_sensor(context: dg.RunStatusSensorContext, database: PulseDatabase) -> None:
    export_id = _export_id(context.dagster_run)
    if export_id is not None and database.jobs().cancel(
        export_id, run_id=context.dagster_run.run_id, reason="the Dagster run was terminated"
    ):
        context.log.info(f"export {export_id} marked CANCELLED")
