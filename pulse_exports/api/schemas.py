"""Request and response models of the product API (shared with the typed client).

One mapping from an ``export_jobs`` row to what a tenant sees: ``ExportPublic.from_job``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pulse_exports.catalog import MAX_ROW_LIMIT
from pulse_exports.formats import COMPRESSIONS, FORMATS

if TYPE_CHECKING:
    from pulse_exports.jobstore import ExportJob, ExportSpecRow


class ExportStatus(str, Enum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


LaunchOutcome = Literal["launched", "deferred to sensor", "sensor", "idempotent replay"]


class ExportBase(BaseModel):
    """What an export asks for; every value is checked against the catalog (errors name the field)."""

    export_type: str = Field(description="An export type from GET /export-types.", examples=["telemetry"])
    format: str = Field(default="csv", json_schema_extra={"enum": list(FORMATS)})
    compression: str | None = Field(
        default=None,
        description="Default: zstd for parquet, none otherwise.",
        json_schema_extra={"enum": [*COMPRESSIONS, None]},
    )
    columns: list[str] | None = Field(default=None, description="Columns to export, in order; default all.")
    filters: dict[str, Any] | None = Field(default=None, examples=[{"time_range": "24h", "device_ids": ["dev-000001"]}])
    row_limit: int | None = Field(default=None, ge=1, le=MAX_ROW_LIMIT)
    options: dict[str, Any] | None = Field(
        default=None,
        description="neutralise_formulas (CSV), part_max_rows, part_max_bytes.",
        examples=[{"part_max_rows": 1_000_000}],
    )


class ExportCreate(ExportBase):
    """The body of POST /exports. The tenant comes from the API key, never from the body."""

    model_config = ConfigDict(extra="forbid")

    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="http(s) URL told when the export ends (signed); internal addresses are refused.",
    )
    expires_in: int | None = Field(
        default=None, ge=60, le=90 * 86400, description="Seconds the files are kept after completion."
    )


class ExportCreated(BaseModel):
    """The answer to POST /exports (202)."""

    export_id: uuid.UUID
    status: ExportStatus
    status_url: str
    estimated_rows: int | None = Field(description="The query planner's estimate; null when not available.")
    launch: LaunchOutcome = Field(
        description="launched: the run was started through Dagster now; deferred to sensor: Dagster was"
        " unreachable or refused, the sensor launches it; sensor: no Dagster GraphQL URL is configured;"
        " idempotent replay: an earlier request with this Idempotency-Key made the export."
    )
    launch_error: str | None = None
    run_id: str | None = None


class ExportProgress(BaseModel):
    rows_done: int
    rows_total: int | None = Field(description="The planner's estimate until the export completes.")
    percent: float | None


@dataclass(frozen=True)
class ExportLinks:
    """The URLs an export's answer points at: the API's own base and, if set, the Dagster UI."""

    api_base: str
    dagster_ui_url: str | None = None

    def status_url(self, export_id: uuid.UUID) -> str:
        return f"{self.api_base}/exports/{export_id}"

    def download_url(self, export_id: uuid.UUID, part: int | None = None) -> str:
        suffix = f"?part={part}" if part is not None else ""
        return f"{self.api_base}/exports/{export_id}/download{suffix}"

    def run_url(self, run_id: str | None) -> str | None:
        return f"{self.dagster_ui_url.rstrip('/')}/runs/{run_id}" if self.dagster_ui_url and run_id else None


class ExportSpecPublic(BaseModel):
    """What an export or a schedule asks for, as stored: validated, with the defaults filled in."""

    id: uuid.UUID
    export_type: str
    format: str
    compression: str
    columns: list[str] | None
    filters: dict[str, Any]
    row_limit: int | None
    options: dict[str, Any]
    callback_url: str | None

    @staticmethod
    def spec_of(row: ExportSpecRow) -> dict[str, Any]:
        """These fields' values from an export_jobs or export_schedules row."""
        return {name: getattr(row, name) for name in ExportSpecPublic.model_fields}


class ExportPublic(ExportSpecPublic):
    """An export as its tenant sees it."""

    status: ExportStatus
    progress: ExportProgress
    row_count: int | None
    bytes: int | None
    parts: int | None
    error: str | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    status_url: str
    download_url: str | None = Field(description="Set once COMPLETED: redirects to the file (or lists the parts).")
    run_id: str | None
    dagster_run_url: str | None
    callback_status: Literal["pending", "delivered", "failed"] | None = Field(
        default=None, description="The callback's delivery; null without a callback_url or until the export ends."
    )
    callback_attempts: int = Field(default=0, description="Delivery attempts made so far for the latest event.")
    callback_last_error: str | None = Field(default=None, description="Why the latest attempt failed.")
    callback_delivered_at: datetime | None = None

    @classmethod
    def from_job(cls, job: ExportJob, links: ExportLinks) -> ExportPublic:
        completed = job.status == ExportStatus.COMPLETED.value
        if completed:
            percent: float | None = 100.0
        elif job.rows_total:
            percent = round(min(99.9, 100.0 * job.rows_done / job.rows_total), 1)
        else:
            percent = None
        return cls(
            **cls.spec_of(job),
            status=ExportStatus(job.status),
            progress=ExportProgress(
                rows_done=job.rows_done, rows_total=job.row_count if completed else job.rows_total, percent=percent
            ),
            row_count=job.row_count,
            bytes=job.file_size_bytes,
            parts=len(job.manifest["parts"]) if job.manifest else None,
            error=job.error,
            created_at=job.created_at,
            queued_at=job.queued_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            expires_at=job.expires_at,
            status_url=links.status_url(job.id),
            download_url=links.download_url(job.id) if completed else None,
            run_id=job.run_id,
            dagster_run_url=links.run_url(job.run_id),
            callback_status=job.callback_status,
            callback_attempts=job.callback_attempts,
            callback_last_error=job.callback_last_error,
            callback_delivered_at=job.callback_delivered_at,
        )


class ExportPage(BaseModel):
    """One page of GET /exports, newest first; pass ``next_cursor`` as ``cursor`` for the next."""

    items: list[ExportPublic]
    next_cursor: str | None


class DownloadPart(BaseModel):
    index: int
    file: str
    rows: int
    bytes: int
    sha256: str
    url: str = Field(description="A presigned S3 URL (no credentials needed) or, for file storage, this API.")


class DownloadManifest(BaseModel):
    """An export's parts with a download URL each (several parts, or ``?manifest=true``)."""

    export_id: uuid.UUID
    format: str
    compression: str
    row_count: int
    bytes: int
    columns: list[dict[str, str]]
    expires_at: datetime | None
    urls_expire_at: datetime | None = Field(description="When the presigned URLs stop working (S3 storage).")
    parts: list[DownloadPart]


class ExportTypePublic(BaseModel):
    name: str
    description: str
    columns: list[str]
    filters: list[str]
    formats: list[str]
    compressions: list[str]


class HealthCheck(BaseModel):
    ok: bool | None = Field(description="null when the dependency is not configured.")
    detail: str


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: HealthCheck
    storage: HealthCheck
    dagster: HealthCheck


class QuotaRefusal(BaseModel):
    """Why a request was refused for a tenant quota: the quota's name and its limit."""

    type: Literal["quota_exceeded"] = "quota_exceeded"
    quota: str = Field(examples=["max_active_jobs"])
    limit: int
    msg: str


class QuotaRefused(BaseModel):
    """The body of a 429: retry after the Retry-After header's seconds."""

    detail: QuotaRefusal


class CallbackSecret(BaseModel):
    """The key that signs a tenant's callbacks: X-Pulse-Signature is ``v1=`` + hex HMAC-SHA256 of
    ``"{timestamp}.{body}"`` keyed with this text (UTF-8)."""

    tenant_id: str
    secret: str
