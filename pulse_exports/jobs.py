"""The export job: one Dagster run per export, partitioned by export id.

claim -> plan -> extract_and_write -> finish. A run whose claim finds nothing (the export is
already taken, finished or cancelled) skips the rest and ends cleanly. Any error marks the job
FAILED with a short reason before the run fails.
"""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg

from pulse_exports.catalog import ExportRequestError
from pulse_exports.jobstore import ExportJob
from pulse_exports.pipeline import (
    ExportCancelled,
    PartLimits,
    discard_export,
    export_prefix,
    stream_query,
    write_export,
    write_manifest,
)
from pulse_exports.redact import redact
from pulse_exports.resources import ExportSettings, ExportStorage, PulseDatabase

exports_partitions = dg.DynamicPartitionsDefinition(name="exports")

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
        raise dg.Failure(description=reason) from exc


@dg.op(out=dg.Out(dict, is_required=False), description="PENDING/QUEUED -> RUNNING, atomically, for this run.")
def claim_export(context: dg.OpExecutionContext, database: PulseDatabase) -> Iterator[dg.Output[dict]]:
    export_id = context.partition_key
    with failing_job_on_error(database, export_id, context.run_id, "claim"):
        job = database.jobs().claim(export_id, context.run_id)
    if job is None:
        context.log.info(f"export {export_id} has nothing to claim (already running, done or cancelled)")
        return
    context.log.info(f"claimed export {export_id} of tenant {job.tenant_id} ({job.export_type}, {job.format})")
    yield dg.Output({"export_id": export_id}, metadata={"tenant": job.tenant_id, "export_type": job.export_type})


@dg.op(description="Compose the tenant-scoped query and estimate its rows.")
def plan_export(context: dg.OpExecutionContext, claimed: dict, database: PulseDatabase) -> dict:
    export_id = claimed["export_id"]
    with failing_job_on_error(database, export_id, context.run_id, "plan"):
        job = _job(database, export_id)
        catalog = database.catalog()
        with psycopg.connect(database.source()) as conn:
            plan = catalog.plan(conn, job.request)
            estimate = _estimate_rows(conn, plan.count_query)
        if job.row_limit is not None:
            estimate = min(estimate, job.row_limit)
        database.jobs().set_estimate(job.id, estimate)
    context.log.info(f"plan: {len(plan.columns)} columns, about {estimate} rows")
    return {"export_id": export_id, "query": plan.query, "columns": list(plan.columns), "estimate": estimate}


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
    with failing_job_on_error(database, export_id, run_id, "extract"):
        job = _job(database, export_id)
        jobs = database.jobs()
        limits = PartLimits(
            max_rows=int(job.options.get("part_max_rows", settings.part_max_rows)),
            max_bytes=int(job.options.get("part_max_bytes", settings.part_max_bytes)),
        )
        reader = stream_query(database.source(), plan["query"], settings.batch_rows)
        outcome = write_export(
            reader,
            export_id=export_id,
            request=job.request,
            store=storage.get_store(),
            limits=limits,
            on_progress=lambda rows: jobs.record_progress(job.id, run_id, rows),
            workdir=Path(settings.workdir) if settings.workdir else None,
        )
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
        try:
            manifest = write_manifest(store, export_id, job.request, outcome)
            done = database.jobs().complete(
                job.id,
                context.run_id,
                storage_location=outcome["location"],
                manifest=manifest,
                row_count=outcome["row_count"],
                file_size_bytes=outcome["bytes"],
                retention=settings.retention,
            )
        except BaseException:
            discard_export(store, export_prefix(job.tenant_id, export_id))
            raise
        if not done:
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
            "rows_per_second": dg.MetadataValue.float(round(outcome["row_count"] / seconds, 1)),
            "seconds": dg.MetadataValue.float(round(seconds, 3)),
            "location": dg.MetadataValue.text(outcome["location"]),
            "manifest": dg.MetadataValue.json(
                {k: manifest[k] for k in ("format", "compression", "row_count", "bytes", "columns")}
            ),
        }
    )
    context.log.info(f"export {export_id} COMPLETED: {outcome['row_count']} rows at {outcome['location']}")


def _job(database: PulseDatabase, export_id: str) -> ExportJob:
    job = database.jobs().get(export_id)
    if job is None:
        raise LookupError(f"export {export_id} does not exist in export_jobs")
    return job


def _estimate_rows(conn: Any, count_query: str) -> int:
    """The planner's row estimate: instant, unlike count(*) over millions of rows."""
    row = conn.execute(f"EXPLAIN (FORMAT JSON) {count_query}").fetchone()
    return int(row[0][0]["Plan"]["Plan Rows"]) if row else 0


@dg.job(
    partitions_def=exports_partitions,
    # One process for the whole run: a run is one streaming loop, and a process per step
    # would add seconds of start-up to every export.
    executor_def=dg.in_process_executor,
    tags={"dagster/max_runtime": str(6 * 3600)},
    description="Export one export_jobs row (the partition key is its id) to partitioned files.",
)
def export_job() -> None:
    finish_export(extract_and_write(plan_export(claim_export())))
