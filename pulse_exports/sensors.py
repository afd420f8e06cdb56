"""Sensors: turn PENDING export_jobs rows into runs, and write back runs that end outside op code."""

import os
import uuid
from datetime import timedelta

import dagster as dg

from pulse_exports.callbacks import deliver_due_callbacks
from pulse_exports.jobs import TAG_EXPORT_ID, export_job, export_tags, exports_partitions
from pulse_exports.pipeline import discard_export, export_prefix
from pulse_exports.recurring import enqueue_due_schedules
from pulse_exports.resources import CallbackSettings, ExportSettings, ExportStorage, PulseDatabase

# A QUEUED job whose run never appeared (a tick that failed after marking it) is requested
# again after this long; run_key dedupe makes that a no-op when the run does exist.
STALE_QUEUED_AFTER = timedelta(minutes=5)
# The shortest time between two export_jobs_sensor ticks (read when the code location loads). `pulse-exports
# daemon` evaluates it as soon as a job becomes PENDING (LISTEN, migration 0006) and every 5 s otherwise;
# dagster-daemon every 5 s. Each tick costs the daemon and code server ~45 ms of CPU.
EXPORT_SENSOR_INTERVAL_SECONDS = int(os.environ.get("PULSE_EXPORT_SENSOR_INTERVAL_SECONDS") or 1)
# How often the reconciler looks for stale heartbeats (read when the code location loads).
RECONCILER_INTERVAL_SECONDS = int(os.environ.get("PULSE_RECONCILER_INTERVAL_SECONDS") or 30)


@dg.sensor(
    job=export_job,
    minimum_interval_seconds=EXPORT_SENSOR_INTERVAL_SECONDS,
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


def dagster_will_retry(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether Dagster's run retries (dagster.yaml ``run_retries``) will launch another attempt."""
    if not instance.run_retries_enabled:
        return False
    max_retries = int(run.tags.get("dagster/max_retries", instance.run_retries_max_retries))
    return int(run.tags.get("dagster/retry_number", "0")) < max_retries


def worker_exit(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """How the run's worker process died, when the code server saw it go (SIGKILL, OOM kill, crash exit code):
    e.g. "was terminated by signal 9 (SIGKILL)". None when it did not log that."""
    marker = f"Run execution process for {run_id} "
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        text = entry.message or ""
        if marker in text:
            return text.split(marker, 1)[1].split(". ", 1)[0].rstrip(".")
    return None


@dg.run_failure_sensor(
    monitored_jobs=[export_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="Marks an export FAILED when its run fails where op code could not (crash, lost worker), "
    "unless Dagster will retry the run, whose claim then takes the export over.",
)
def export_run_failure_sensor(
    context: dg.RunFailureSensorContext, database: PulseDatabase, storage: ExportStorage
) -> None:
    run = context.dagster_run
    export_id = _export_id(run)
    if export_id is None:
        return
    message = (context.failure_event.message or "run failed").splitlines()[0][:500]
    if exit_clause := worker_exit(context.instance, run.run_id):
        message = f"worker lost: its process {exit_clause}"
    jobs = database.jobs()
    job = jobs.get(export_id)
    if (
        job is not None
        and job.status == "RUNNING"
        and job.run_id == run.run_id
        and dagster_will_retry(context.instance, run)
    ):
        jobs.note(export_id, run.run_id, f"Dagster run {run.run_id} failed ({message}); a retry will take over")
        context.log.info(f"export {export_id}: run failed, Dagster will retry it")
        return
    if jobs.fail(export_id, f"Dagster run {run.run_id} failed: {message}", run_id=run.run_id):
        if job is not None:  # a failed export leaves no files: remove what the lost worker uploaded
            discard_export(storage.get_store(), export_prefix(job.tenant_id, str(export_id)))
        context.log.info(f"export {export_id} marked FAILED")


@dg.sensor(
    minimum_interval_seconds=RECONCILER_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Finds RUNNING exports whose worker stopped heartbeating (e.g. SIGKILL), fails their "
    "Dagster run so retries apply, and aborts their unfinished uploads.",
)
def export_reconciler_sensor(
    context: dg.SensorEvaluationContext, database: PulseDatabase, storage: ExportStorage, settings: ExportSettings
) -> dg.SkipReason | None:
    jobs = database.jobs()
    stale = jobs.stale_running(timedelta(seconds=settings.heartbeat_timeout_seconds))
    if not stale:
        return dg.SkipReason("no lost workers")
    store = storage.get_store()
    instance = context.instance
    for job in stale:
        reason = f"worker lost: no heartbeat for {int(settings.heartbeat_timeout_seconds)}s"
        store.abort_multipart_uploads(export_prefix(job.tenant_id, str(job.id)))
        run = instance.get_run_by_id(job.run_id) if job.run_id else None
        if run is not None and not run.is_finished:
            # Failing the run lets Dagster's run retries and the failure sensor decide what follows.
            instance.report_run_failed(run, message=reason)
            context.log.warning(f"export {job.id}: {reason}; run {run.run_id} marked failed")
            continue
        if run is not None and run.is_complete_and_waiting_to_retry:
            continue  # Dagster's retry daemon has yet to launch the retry, whose claim takes the export over
        retry = _retry_of(instance, job.run_id) if job.run_id else None
        if (retry is None or retry.is_finished) and jobs.fail(job.id, reason, run_id=job.run_id):
            discard_export(store, export_prefix(job.tenant_id, str(job.id)))
            context.log.warning(f"export {job.id}: {reason}; marked FAILED")
    return None


def _retry_of(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/parent_run_id": run_id}), limit=1)
    return runs[0] if runs else None


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


@dg.sensor(
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="POSTs the signed event of each ended export to its callback_url; retries with backoff.",
)
def export_callbacks_sensor(
    context: dg.SensorEvaluationContext, database: PulseDatabase, callbacks: CallbackSettings
) -> dg.SkipReason:
    results = deliver_due_callbacks(database.jobs(), callbacks.policy())
    for r in results:  # never the URL, body or signature: they may carry tokens
        detail = f": {r.error}" if r.error else ""
        context.log.info(
            f"callback of export {r.export_id} (event {r.event_id}, attempt {r.attempt}): {r.outcome}{detail}"
        )
    if not results:
        return dg.SkipReason("no callbacks due")
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in ("delivered", "retrying", "failed")}
    return dg.SkipReason(", ".join(f"{n} {outcome}" for outcome, n in counts.items()))


@dg.sensor(
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Makes one PENDING export_jobs row per due export_schedules tick (after downtime: the latest "
    "missed tick, once); export_jobs_sensor launches it.",
)
def export_schedules_sensor(
    context: dg.SensorEvaluationContext, database: PulseDatabase, settings: ExportSettings
) -> dg.SkipReason:
    ticks = enqueue_due_schedules(database.url, database.catalog(), limit=settings.sensor_batch_size)
    for t in ticks:
        if t.error:
            context.log.warning(f"schedule {t.schedule_id} ({t.tenant_id}): {t.error}")
        else:
            made = "created" if t.created else "already existed"
            context.log.info(
                f"schedule {t.schedule_id} ({t.tenant_id}) tick {t.scheduled_for}: export {t.export_id} {made}"
            )
    if not ticks:
        return dg.SkipReason("no schedules due")
    created = sum(t.created for t in ticks)
    paused = sum(t.error is not None for t in ticks)
    return dg.SkipReason(f"{created} exports created, {paused} schedules paused")
