"""The export job: one Dagster run per export, partitioned by export id.

claim -> plan -> extract_and_write -> finish. A run whose claim finds nothing (the export is
already taken, finished or cancelled) skips the rest and ends cleanly. Any error marks the job
FAILED with a short reason before the run fails.
"""

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg

from pulse_exports.catalog import ExportRequest, ExportRequestError
from pulse_exports.db import HeldConnection
from pulse_exports.heartbeat import Heartbeat
from pulse_exports.jobstore import ExportJob, JobStore
from pulse_exports.pipeline import (
    SLICE_SESSION_OPTIONS,
    ConcurrentCheck,
    ExportCancelled,
    ExportOutcome,
    PartLimits,
    SourceQueryError,
    discard_export,
    export_prefix,
    stream_query,
    verify_parts,
    write_export,
    write_export_slices,
    write_manifest,
)
from pulse_exports.quotas import QuotaConfigError, QuotaExceeded
from pulse_exports.redact import redact
from pulse_exports.resources import ExportSettings, ExportStorage, PulseDatabase

exports_partitions = dg.DynamicPartitionsDefinition(name="exports")

# Metric columns are typed from this many rows, and checked against every row while the export
# streams (extract_and_write): the first row no longer waits for a full pass over the metrics.
METRIC_SAMPLE_ROWS = 10_000

TAG_TENANT = "pulse/tenant"
TAG_EXPORT_ID = "pulse/export_id"
TAG_EXPORT_TYPE = "pulse/export_type"


def export_tags(job: ExportJob) -> dict[str, str]:
    """The tags every export run carries, whoever launches it (sensor or API)."""
    return {TAG_TENANT: job.tenant_id, TAG_EXPORT_ID: str(job.id), TAG_EXPORT_TYPE: job.export_type}


def failure_reason(step: str, exc: BaseException) -> str:
    """A short, actionable reason for export_jobs.error, with any credentials scrubbed."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if isinstance(exc, ExportRequestError):
        hint = "the request no longer matches the catalog"
    elif isinstance(exc, QuotaExceeded):
        hint = "over the tenant's quota"
    elif isinstance(exc, QuotaConfigError):
        hint = "the service's quota configuration is invalid"
    elif "psycopg" in type(exc).__module__ or "connectorx" in text.lower():
        hint = "the source database refused the query or is unreachable"
    elif "botocore" in type(exc).__module__ or "boto3" in type(exc).__module__ or isinstance(exc, OSError):
        hint = "the export storage could not be written"
    else:
        hint = "unexpected error"
    reason = f"{step} failed ({hint}): {name}: {text}"
    return redact(reason)[:1000]


@contextmanager
def failing_job_on_error(database: PulseDatabase, export_id: str, run_id: str, step: str) -> Iterator[None]:
    """Mark the export FAILED with a reason when the step raises, then let the run fail."""
    try:
        yield
    except ExportCancelled as exc:
        raise dg.Failure(description=f"{step}: {exc}", allow_retries=False) from exc
    except Exception as exc:
        reason = failure_reason(step, exc)
        database.jobs().fail(uuid.UUID(export_id), reason, run_id=run_id)
        # Another attempt would go over the same quota: no run retry.
        raise dg.Failure(description=reason, allow_retries=not isinstance(exc, QuotaExceeded)) from exc


@dg.op(out=dg.Out(dict, is_required=False), description="PENDING/QUEUED -> RUNNING, atomically, for this run.")
def claim_export(context: dg.OpExecutionContext, database: PulseDatabase) -> Iterator[dg.Output[dict]]:
    export_id = context.partition_key
    with failing_job_on_error(database, export_id, context.run_id, "claim"):
        job = database.jobs().claim(export_id, context.run_id, parent_run_id=context.dagster_run.parent_run_id)
    if job is None:
        context.log.info(f"export {export_id} has nothing to claim (already running, done or cancelled)")
        return
    context.log.info(f"claimed export {export_id} of tenant {job.tenant_id} ({job.export_type}, {job.format})")
    yield dg.Output({"export_id": export_id}, metadata={"tenant": job.tenant_id, "export_type": job.export_type})


@dg.op(description="Compose the tenant-scoped query and estimate its rows.")
def plan_export(
    context: dg.OpExecutionContext, claimed: dict, database: PulseDatabase, settings: ExportSettings
) -> dict:
    export_id = claimed["export_id"]
    jobs = database.jobs()
    with failing_job_on_error(database, export_id, context.run_id, "plan"), _heartbeat(jobs, settings, context):
        job = _job(database, export_id)
        quota = settings.quotas().for_tenant(job.tenant_id)
        catalog = database.catalog()
        with psycopg.connect(database.source()) as conn:
            plan = catalog.plan(
                conn,
                _quota_request(job, quota.max_rows),
                metric_sample_rows=METRIC_SAMPLE_ROWS,
                **_slicing(job, settings),
            )
        estimate = plan.estimated_rows if job.row_limit is None else min(plan.estimated_rows, job.row_limit)
        jobs.set_estimate(job.id, estimate)
    sampled = " (metric columns from a sample, checked while exporting)" if plan.metrics_sampled else ""
    context.log.info(f"plan: {len(plan.columns)} columns, about {estimate} rows{sampled}")
    return {
        "export_id": export_id,
        "query": plan.query,
        "slice_queries": list(plan.slice_queries),
        "columns": list(plan.columns),
        "estimate": estimate,
        "metrics_sampled": plan.metrics_sampled,
        "unplanned_keys_query": plan.unplanned_keys_query,
        "max_rows": quota.max_rows,
        "max_bytes": quota.max_bytes,
    }


@dg.op(description="Stream the rows with connectorx into part files in the export store.")
def extract_and_write(
    context: dg.OpExecutionContext,
    plan: dict,
    database: PulseDatabase,
    storage: ExportStorage,
    settings: ExportSettings,
) -> dict:
    export_id = plan["export_id"]
    run_id = context.run_id
    # Progress reports, heartbeats and ownership checks share one session; marking the job FAILED takes
    # a new one (the held one may be what broke).
    with (
        HeldConnection(database.url) as held,
        failing_job_on_error(database, export_id, run_id, "extract"),
        _heartbeat(database.jobs(held), settings, context) as beat,
    ):
        job = _job(database, export_id)
        jobs = database.jobs(held)
        limits = PartLimits(
            max_rows=int(job.options.get("part_max_rows", settings.part_max_rows)),
            max_bytes=int(job.options.get("part_max_bytes", settings.part_max_bytes)),
        )

        rows_flowing = threading.Event()  # the first rows are written: the metric-key check may start

        def progress(rows: int) -> bool:
            rows_flowing.set()
            return not beat.lost and jobs.record_progress(job.id, run_id, rows)

        def export(queries: list[str]) -> ExportOutcome:
            source, store = database.source(), storage.get_store()
            common: dict[str, Any] = dict(
                export_id=export_id,
                request=job.request,
                store=store,
                limits=limits,
                on_progress=progress,
                workdir=Path(settings.workdir) if settings.workdir else None,
                max_rows=plan.get("max_rows"),
                max_bytes=plan.get("max_bytes"),
                owns_export=lambda: jobs.owns(job.id, run_id),
            )
            if len(queries) == 1:
                return write_export(stream_query(source, queries[0], settings.batch_rows), **common)
            context.log.info(f"reading {len(queries)} time slices at once")
            batch_rows = max(settings.batch_rows // len(queries), 1024)  # the same rows in memory as one stream
            readers = [
                lambda q=q: stream_query(source, q, batch_rows, session_options=SLICE_SESSION_OPTIONS) for q in queries
            ]
            return write_export_slices(readers, **common)

        outcome = _export_checking_metric_columns(context, database, settings, job, plan, export, rows_flowing)
    context.log.info(f"wrote {outcome.row_count} rows in {len(outcome.parts)} parts, {outcome.bytes} bytes")
    return {"export_id": export_id, "outcome": outcome.to_dict()}


@dg.op(description="Write manifest.json last, then mark the export COMPLETED.")
def finish_export(
    context: dg.OpExecutionContext,
    written: dict,
    database: PulseDatabase,
    storage: ExportStorage,
    settings: ExportSettings,
) -> None:
    export_id = written["export_id"]
    outcome = written["outcome"]
    with failing_job_on_error(database, export_id, context.run_id, "finish"):
        job = _job(database, export_id)
        store = storage.get_store()
        jobs = database.jobs()
        try:
            if not jobs.heartbeat(job.id, context.run_id):  # never write the manifest of an export taken over
                raise ExportCancelled("the export was cancelled or taken over by another run")
            verify_parts(store, outcome["parts"])  # the manifest vouches for exactly these files
            manifest = write_manifest(store, export_id, job.request, outcome)
            done = database.jobs().complete(
                job.id,
                context.run_id,
                storage_location=outcome["location"],
                manifest=manifest,
                row_count=outcome["row_count"],
                file_size_bytes=outcome["bytes"],
                retention=_retention(job, settings),
            )
        except BaseException:
            if jobs.owns(job.id, context.run_id):  # else the files are the run's that took the export over
                discard_export(store, export_prefix(job.tenant_id, export_id))
            raise
        if not done:
            if jobs.owns(job.id, context.run_id):
                discard_export(store, export_prefix(job.tenant_id, export_id))
            raise ExportCancelled("the export was cancelled before it could complete")
    seconds = max(outcome["seconds"], 1e-6)
    context.add_output_metadata(
        {
            "tenant": job.tenant_id,
            "export_id": export_id,
            "rows": dg.MetadataValue.int(outcome["row_count"]),
            "bytes": dg.MetadataValue.int(outcome["bytes"]),
            "parts": dg.MetadataValue.int(len(outcome["parts"])),
            # throughput of the data path (extract + write); duration_seconds is claim to COMPLETED
            "rows_per_second": dg.MetadataValue.float(round(outcome["row_count"] / seconds, 1)),
            "mib_per_second": dg.MetadataValue.float(round(outcome["bytes"] / 2**20 / seconds, 3)),
            "write_seconds": dg.MetadataValue.float(round(seconds, 3)),
            "duration_seconds": dg.MetadataValue.float(_since(job.started_at)),
            "location": dg.MetadataValue.text(outcome["location"]),
            "manifest": dg.MetadataValue.json(
                {k: manifest[k] for k in ("format", "compression", "row_count", "bytes", "columns")}
            ),
        }
    )
    context.log.info(f"export {export_id} COMPLETED: {outcome['row_count']} rows at {outcome['location']}")


def _since(started_at: datetime | None) -> float:
    """Seconds from the claim (export_jobs.started_at) to now, as /metrics measures export duration."""
    return round((datetime.now(timezone.utc) - started_at).total_seconds(), 3) if started_at else 0.0


def _heartbeat(jobs: JobStore, settings: ExportSettings, context: dg.OpExecutionContext) -> Heartbeat:
    export_id, run_id = uuid.UUID(context.partition_key), context.run_id
    return Heartbeat(lambda: jobs.heartbeat(export_id, run_id), settings.heartbeat_interval_seconds)


def _retention(job: ExportJob, settings: ExportSettings) -> timedelta:
    """How long the files are kept: the request's expires_in (seconds), else the default."""
    expires_in = job.options.get("expires_in")
    return timedelta(seconds=int(expires_in)) if expires_in else settings.retention


def _export_checking_metric_columns(
    context: dg.OpExecutionContext,
    database: PulseDatabase,
    settings: ExportSettings,
    job: ExportJob,
    plan: dict,
    export: Callable[[list[str]], ExportOutcome],
    rows_flowing: threading.Event | None = None,
) -> ExportOutcome:
    """Export with the plan's query. When its metric columns came from a sample, look meanwhile
    for a row with a key the sample lacked or a value of another JSON type than the sample's; if there
    is one, or the query failed (a cast refused a value), export again with columns from all rows."""
    if not plan.get("metrics_sampled"):
        return export(plan.get("slice_queries") or [plan["query"]])
    check = None
    if unplanned_keys := plan.get("unplanned_keys_query"):
        check = ConcurrentCheck(
            database.source(),
            lambda conn: not conn.execute(unplanned_keys).fetchone()[0],
            start_after=rows_flowing,  # its scan would delay the first row
        )
    try:
        try:
            outcome: ExportOutcome | None = export(plan.get("slice_queries") or [plan["query"]])
        except SourceQueryError as exc:
            context.log.info(f"the sampled plan failed ({exc}): planning from every row")
            outcome = None
        if outcome is not None and (check is None or check.result()):
            return outcome
    finally:
        if check is not None:
            check.cancel()
    if outcome is not None:
        context.log.info("a row has a metric key the sample lacked: planning from every row")
    with psycopg.connect(database.source()) as conn:
        exact = database.catalog().plan(conn, _quota_request(job, plan.get("max_rows")), **_slicing(job, settings))
    return export(list(exact.slice_queries) or [exact.query])


def _slicing(job: ExportJob, settings: ExportSettings) -> dict[str, int]:
    """How the catalog may split the export's query: never under a row limit, which applies to all slices."""
    slices = settings.extract_slices if job.row_limit is None else 1
    return {"slices": slices, "min_slice_rows": settings.min_slice_rows}


def _quota_request(job: ExportJob, max_rows: int | None) -> ExportRequest:
    """The request to plan: with a max_rows quota, the query reads at most max_rows + 1 rows,
    enough to tell an export over the quota (write_export fails it) without reading the rest."""
    request = job.request
    if max_rows is None or (request.row_limit is not None and request.row_limit <= max_rows):
        return request
    return dataclasses.replace(request, row_limit=max_rows + 1)


def _job(database: PulseDatabase, export_id: str) -> ExportJob:
    job = database.jobs().get(export_id)
    if job is None:
        raise LookupError(f"export {export_id} does not exist in export_jobs")
    return job


@dg.job(
    partitions_def=exports_partitions,
    # One process for the whole run: a run is one streaming loop, and a process per step
    # would add seconds of start-up to every export.
    executor_def=dg.in_process_executor,
    tags={
        "dagster/max_runtime": str(6 * 3600),
        # A retry of a crashed run starts from claim, which takes the job over from its parent.
        "dagster/retry_strategy": "ALL_STEPS",
    },
    description="Export one export_jobs row (the partition key is its id) to partitioned files.",
)
def export_job() -> None:
    finish_export(extract_and_write(plan_export(claim_export())))
