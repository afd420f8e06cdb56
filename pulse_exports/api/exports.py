"""/exports: create (and launch), list, follow, download and cancel a tenant's exports."""

from __future__ import annotations

import logging
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated

import psycopg
from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse

from pulse_exports.api.deps import ApiRuntime, LinksDep, RuntimeDep, Tenant, TenantDep
from pulse_exports.api.pagination import PageCursor, PageLimit, created_and_id, decode_cursor, next_page
from pulse_exports.api.schemas import (
    DownloadManifest,
    DownloadPart,
    ExportBase,
    ExportCreate,
    ExportCreated,
    ExportLinks,
    ExportPage,
    ExportPublic,
    ExportStatus,
    LaunchOutcome,
    QuotaRefusal,
    QuotaRefused,
)
from pulse_exports.catalog import ExportRequest, ExportRequestError
from pulse_exports.formats import content_type
from pulse_exports.jobstore import ACTIVE, ExportJob
from pulse_exports.launcher import DagsterUnavailable, LaunchRefused
from pulse_exports.logs import bind
from pulse_exports.netguard import validate_callback_url
from pulse_exports.pipeline import discard_export, export_prefix
from pulse_exports.quotas import ESTIMATE_REFUSAL_FACTOR, RETRY_AFTER_SECONDS, QuotaExceeded, TenantQuota
from pulse_exports.storage import LocalExportStore, S3ExportStore, validate_key

_log = logging.getLogger(__name__)

router = APIRouter(prefix="/exports", tags=["exports"])

_NOT_FOUND = {404: {"description": "No such export for this tenant (unknown, malformed or another tenant's id)."}}
_PATH_TOKEN = re.compile(r"\[(\d+)\]|([^.\[\]]+)")
_TYPE_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,128}")  # a name as the catalog could hold it: no control characters


def _invalid(exc: ExportRequestError, *, expires_in_given: bool) -> RequestValidationError:
    """A catalog error as FastAPI's own 422 body, the location naming the request field."""
    loc: list[str | int] = [int(i) if i else name for i, name in _PATH_TOKEN.findall(exc.field)]
    if expires_in_given and loc == ["options", "expires_in"]:
        loc = ["expires_in"]
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": exc.message, "input": None}])


def quota_invalid(exc: QuotaExceeded, field: str, value: object) -> RequestValidationError:
    """A quota refusal of one request field, as a 422 like the others (plus the quota and its limit)."""
    return RequestValidationError(
        [
            {
                "type": "quota_exceeded",
                "loc": ("body", field),
                "msg": exc.message,
                "input": value,
                "ctx": {"quota": exc.quota, "limit": exc.limit},
            }
        ]
    )


def check_row_limit(quota: TenantQuota, row_limit: int | None) -> None:
    """422 naming row_limit when it asks for more rows than the tenant's max_rows quota."""
    if quota.max_rows is not None and row_limit is not None and row_limit > quota.max_rows:
        raise quota_invalid(QuotaExceeded.for_row_limit(quota.max_rows, row_limit), "row_limit", row_limit)


def validated_request(body: ExportCreate, tenant: Tenant, runtime: ApiRuntime) -> tuple[ExportRequest, str | None]:
    """The body checked against the catalog and its callback URL against the network guard: (the request,
    the callback URL); a 422 naming the field otherwise."""
    spec = body.model_dump(include=set(ExportBase.model_fields))
    spec["options"] = dict(body.options or {})
    if body.expires_in is not None:
        spec["options"]["expires_in"] = body.expires_in
    try:
        request = runtime.catalog().validate(tenant_id=tenant.id, **spec)
        callback_url = (
            validate_callback_url(body.callback_url, runtime.callback_allowlist) if body.callback_url else None
        )
    except ExportRequestError as exc:
        raise _invalid(exc, expires_in_given=body.expires_in is not None) from None
    return request, callback_url


def _tenant_job(runtime: ApiRuntime, tenant: Tenant, export_id: str) -> ExportJob:
    job = runtime.jobs.get(export_id, tenant_id=tenant.id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="export not found")
    bind(export_id=str(job.id))
    return job


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        409: {"description": "The Idempotency-Key was used for a different request."},
        429: {
            "model": QuotaRefused,
            "description": "The tenant already has max_active_jobs unfinished exports.",
            "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
        },
    },
)
def create_export(
    body: ExportCreate,
    tenant: TenantDep,
    runtime: RuntimeDep,
    links: LinksDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Retries with the same key return the export the first request made.",
        ),
    ] = None,
) -> ExportCreated:
    """Create an export and launch its run at once when Dagster's GraphQL API is configured."""
    request, callback_url = validated_request(body, tenant, runtime)
    quota = runtime.quotas.for_tenant(tenant.id)
    limited = quota.max_rows is not None or quota.max_active_jobs is not None
    # A retry of a request already made returns its export, whatever the quotas say now.
    if limited and idempotency_key and (existing := runtime.jobs.find_by_idempotency_key(tenant.id, idempotency_key)):
        return _replay(existing, request, callback_url, links, response)
    check_row_limit(quota, request.row_limit)
    estimated_first = quota.max_rows is not None and request.row_limit is None
    estimated_rows = _estimate_rows(runtime, request) if estimated_first else None
    # Without row_limit, only a clear excess of the estimate is refused: the run enforces max_rows exactly.
    if (
        quota.max_rows is not None
        and estimated_rows is not None
        and estimated_rows > ESTIMATE_REFUSAL_FACTOR * quota.max_rows
    ):
        raise quota_invalid(QuotaExceeded.for_estimate(quota.max_rows, estimated_rows), "row_limit", None)
    try:
        job, created = runtime.jobs.create(
            request,
            callback_url=callback_url,
            created_by=f"api-key:{tenant.api_key_id}",
            idempotency_key=idempotency_key,
            max_active_jobs=quota.max_active_jobs,
            queued=runtime.launcher is not None,  # launched below; the sensor takes it only if that fails
        )
    except QuotaExceeded as exc:
        refusal = QuotaRefusal(quota=exc.quota, limit=exc.limit, msg=exc.message)
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=refusal.model_dump(),
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None
    bind(export_id=str(job.id))
    if not created:
        return _replay(job, request, callback_url, links, response)
    response.headers["Location"] = links.status_url(job.id)
    if not estimated_first:
        estimated_rows = _estimate_rows(runtime, request)
    launch, launch_error, run_id = _launch(runtime, job)
    current = ExportStatus.QUEUED if run_id else ExportStatus.PENDING  # not launched: the sensor's
    return ExportCreated(
        export_id=job.id,
        status=current,
        status_url=links.status_url(job.id),
        estimated_rows=estimated_rows,
        launch=launch,
        launch_error=launch_error,
        run_id=run_id,
    )


def _replay(
    job: ExportJob, request: ExportRequest, callback_url: str | None, links: ExportLinks, response: Response
) -> ExportCreated:
    """The answer to a repeated Idempotency-Key: the export it made (409 if the request differs)."""
    response.headers["Location"] = links.status_url(job.id)
    if job.request != request or job.callback_url != callback_url:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail="this Idempotency-Key was already used for a different export request"
        )
    return ExportCreated(
        export_id=job.id,
        status=ExportStatus(job.status),
        status_url=links.status_url(job.id),
        estimated_rows=job.rows_total,
        launch="idempotent replay",
        run_id=job.run_id,
    )


def _estimate_rows(runtime: ApiRuntime, request: ExportRequest) -> int | None:
    if not runtime.settings.estimate_rows:
        return None
    try:
        with runtime.source_pool.connection() as conn:
            return runtime.catalog().estimate_rows(conn, request)
    except psycopg.Error as exc:  # an estimate is a courtesy; the export itself is already accepted
        _log.warning("no row estimate for a %s export: %s", request.export_type, type(exc).__name__)
        return None


def _launch(runtime: ApiRuntime, job: ExportJob) -> tuple[LaunchOutcome, str | None, str | None]:
    """(outcome, error shown to the caller, run id). Failures leave the job PENDING for the sensor.

    The job was created QUEUED: export_jobs_sensor takes PENDING jobs (woken by each new one), and would
    otherwise request a second run for it, one that finds nothing to claim. Should this process die before
    it records the run, the sensor takes the job once it has been QUEUED for 5 minutes."""
    if runtime.launcher is None:
        return "sensor", None, None
    try:
        run_id = runtime.launcher.launch(job)
    except DagsterUnavailable as exc:
        runtime.jobs.release_to_sensor(job.id)
        _log.warning("export %s: Dagster unreachable, left to the sensor: %s", job.id, exc)
        return "deferred to sensor", "Dagster is unreachable", None
    except LaunchRefused as exc:
        runtime.jobs.release_to_sensor(job.id)
        _log.error("export %s: Dagster refused the launch, left to the sensor: %s", job.id, exc)
        return "deferred to sensor", "Dagster refused the launch", None
    except BaseException:
        runtime.jobs.release_to_sensor(job.id)
        raise
    if not runtime.jobs.mark_launched(job.id, run_id):
        _log.info("export %s was claimed before its launch was recorded (run %s)", job.id, run_id)
    return "launched", None, run_id


@router.get("")
def list_exports(
    tenant: TenantDep,
    runtime: RuntimeDep,
    links: LinksDep,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
    status_filter: Annotated[list[ExportStatus] | None, Query(alias="status")] = None,
    type_filter: Annotated[list[str] | None, Query(alias="type", description="Export types.")] = None,
) -> ExportPage:
    """The tenant's exports, newest first."""
    for i, name in enumerate(type_filter or []):
        if not _TYPE_NAME.fullmatch(name):  # also keeps NUL, which PostgreSQL text refuses, out of the query
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("query", "type", i), "msg": "not an export type name", "input": name}]
            )
    jobs = runtime.jobs.list_for_tenant(
        tenant.id,
        limit=limit + 1,
        before=decode_cursor(cursor, created_and_id) if cursor else None,
        statuses=[s.value for s in status_filter or []],
        export_types=type_filter or [],
    )
    page, next_cursor = next_page(jobs, limit, lambda job: (job.created_at.isoformat(), str(job.id)))
    return ExportPage(items=[ExportPublic.from_job(job, links) for job in page], next_cursor=next_cursor)


@router.get("/{export_id}", responses=_NOT_FOUND)
def get_export(export_id: str, tenant: TenantDep, runtime: RuntimeDep, links: LinksDep) -> ExportPublic:
    """Status, progress, outcome and links of one export."""
    return ExportPublic.from_job(_tenant_job(runtime, tenant, export_id), links)


@router.get(
    "/{export_id}/download",
    response_model=DownloadManifest,
    responses={
        **_NOT_FOUND,
        200: {"description": "The parts with a URL each, or (file storage) the file itself."},
        302: {"description": "Redirect to a presigned URL of the (one, or chosen) part."},
        409: {"description": "The export is not COMPLETED."},
        410: {"description": "The export has expired; its files are gone."},
    },
)
def download_export(
    export_id: str,
    tenant: TenantDep,
    runtime: RuntimeDep,
    links: LinksDep,
    part: Annotated[int | None, Query(ge=0, description="Index of one part (0-based) to fetch.")] = None,
    manifest: Annotated[bool, Query(description="Always answer with the parts list, even for one part.")] = False,
) -> Response | DownloadManifest:
    """One part: a redirect to it (file storage: the file). Several parts: their list with URLs."""
    job = _tenant_job(runtime, tenant, export_id)
    now = datetime.now(timezone.utc)
    if job.status == ExportStatus.EXPIRED.value or (
        job.status == ExportStatus.COMPLETED.value and job.expires_at is not None and job.expires_at <= now
    ):
        raise HTTPException(status.HTTP_410_GONE, detail="the export has expired and its files were deleted")
    if job.status != ExportStatus.COMPLETED.value or not job.manifest:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"the export is {job.status}; it can be downloaded once COMPLETED"
        )
    parts = job.manifest["parts"]
    ttl = _url_lifetime(runtime, job, now)
    if part is not None:
        if part >= len(parts):
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"the export has {len(parts)} part(s), from 0")
        return _part_response(runtime, job, parts[part], ttl)
    if len(parts) == 1 and not manifest:
        return _part_response(runtime, job, parts[0], ttl)
    presigning = isinstance(runtime.presign_store, S3ExportStore)
    return DownloadManifest(
        export_id=job.id,
        format=job.format,
        compression=job.compression,
        row_count=job.manifest["row_count"],
        bytes=job.manifest["bytes"],
        columns=job.manifest["columns"],
        expires_at=job.expires_at,
        urls_expire_at=now + timedelta(seconds=ttl) if presigning else None,
        parts=[
            DownloadPart(
                index=p["index"],
                file=p["file"],
                rows=p["rows"],
                bytes=p["bytes"],
                sha256=p["sha256"],
                url=_part_url(runtime, job, p, ttl, links),
            )
            for p in parts
        ],
    )


def _url_lifetime(runtime: ApiRuntime, job: ExportJob, now: datetime) -> int:
    """Seconds a presigned URL may live: never past the export's expiry, nor the configured cap."""
    cap = runtime.settings.download_url_ttl_seconds
    if job.expires_at is None:
        return cap
    left = math.floor((job.expires_at - now).total_seconds())
    if left < 1:
        raise HTTPException(status.HTTP_410_GONE, detail="the export has expired and its files were deleted")
    return min(cap, left)


def _part_url(runtime: ApiRuntime, job: ExportJob, part: dict, ttl: int, links: ExportLinks) -> str:
    store = runtime.presign_store
    if isinstance(store, S3ExportStore):
        return store.presigned_url(part["key"], ttl)
    return links.download_url(job.id, part["index"])


def _part_response(runtime: ApiRuntime, job: ExportJob, part: dict, ttl: int) -> Response:
    store = runtime.presign_store
    if isinstance(store, S3ExportStore):
        url = store.presigned_url(part["key"], ttl)
        return RedirectResponse(url, status_code=status.HTTP_302_FOUND, headers={"Cache-Control": "no-store"})
    if isinstance(store, LocalExportStore):
        path = store.root / validate_key(part["key"])
        if not path.is_file():
            raise HTTPException(status.HTTP_410_GONE, detail="the export's files are gone")
        return FileResponse(path, media_type=content_type(job.format, job.compression), filename=part["file"])
    raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, detail="this storage cannot serve downloads")


@router.delete(
    "/{export_id}",
    responses={**_NOT_FOUND, 409: {"description": "The export already ended (COMPLETED, FAILED or EXPIRED)."}},
)
def cancel_export(export_id: str, tenant: TenantDep, runtime: RuntimeDep, links: LinksDep) -> ExportPublic:
    """Cancel a PENDING, QUEUED or RUNNING export: terminate its run and delete its files; the row stays,
    CANCELLED. Cancelling a CANCELLED export again only sweeps its files again."""
    job = _tenant_job(runtime, tenant, export_id)
    if job.status in ACTIVE and runtime.jobs.cancel(job.id, reason="cancelled through the API"):
        job = _tenant_job(runtime, tenant, export_id)  # with the run that holds it now
        if job.run_id and runtime.launcher is not None:
            try:
                runtime.launcher.terminate(job.run_id)
            except DagsterUnavailable as exc:  # the run still stops: its next progress report sees CANCELLED
                _log.warning("export %s: could not terminate run %s: %s", job.id, job.run_id, exc)
    else:
        job = _tenant_job(runtime, tenant, export_id)
        if job.status != ExportStatus.CANCELLED.value:
            raise HTTPException(
                status.HTTP_409_CONFLICT, detail=f"the export is {job.status}; only unfinished exports can be cancelled"
            )
    discard_export(runtime.store, export_prefix(job.tenant_id, str(job.id)))
    return ExportPublic.from_job(job, links)
