"""/export-schedules: a tenant's recurring exports (create, list, get, pause, resume, delete) and the
exports each one made. The export_schedules_sensor makes one export per tick (see pulse_exports.recurring)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status
from pydantic import BaseModel, Field

from pulse_exports.api.deps import LinksDep, RuntimeDep, TenantDep
from pulse_exports.api.exports import _invalid, check_row_limit, validated_request
from pulse_exports.api.pagination import PageCursor, PageLimit, created_and_id, decode_cursor, next_page
from pulse_exports.api.schemas import ExportCreate, ExportLinks, ExportPublic, ExportSpecPublic
from pulse_exports.catalog import ExportRequestError
from pulse_exports.recurring import ExportSchedule, ScheduledExport, ScheduleNameTaken, ScheduleStore

router = APIRouter(prefix="/export-schedules", tags=["export schedules"])

_NOT_FOUND = {404: {"description": "No such schedule for this tenant (unknown, malformed or another tenant's id)."}}


class ExportScheduleCreate(ExportCreate):
    """The body of POST /export-schedules: an export request plus when to repeat it."""

    name: str = Field(min_length=1, max_length=128, description="Unique per tenant.", examples=["daily telemetry"])
    cron: str = Field(
        max_length=256,
        description="Five fields (minute hour day-of-month month day-of-week), read in `timezone`.",
        examples=["0 6 * * mon-fri"],
    )
    timezone: str = Field(default="UTC", max_length=64, description="An IANA timezone.", examples=["Europe/Paris"])


class ExportSchedulePublic(ExportSpecPublic):
    """A schedule as its tenant sees it."""

    name: str
    cron: str
    timezone: str
    enabled: bool
    next_run_at: datetime | None = Field(description="The next tick; null while paused.")
    last_run_at: datetime | None = Field(description="The tick of the latest export made.")
    last_export_id: uuid.UUID | None
    last_error: str | None = Field(description="Why the service paused the schedule (its spec no longer validates).")
    created_at: datetime
    updated_at: datetime
    exports_url: str

    @classmethod
    def from_schedule(cls, schedule: ExportSchedule, links: ExportLinks) -> ExportSchedulePublic:
        data = {name: getattr(schedule, name) for name in cls.model_fields if name != "exports_url"}
        return cls(**data, exports_url=f"{links.api_base}{router.prefix}/{schedule.id}/exports")


class ExportSchedulePage(BaseModel):
    """One page of GET /export-schedules, oldest first; pass ``next_cursor`` as ``cursor`` for the next."""

    items: list[ExportSchedulePublic]
    next_cursor: str | None


class ScheduledExportPublic(ExportPublic):
    """An export a schedule made, with the tick it was made for."""

    scheduled_for: datetime

    @classmethod
    def from_scheduled(cls, scheduled: ScheduledExport, links: ExportLinks) -> ScheduledExportPublic:
        public = ExportPublic.from_job(scheduled.job, links)
        return cls(**dict(public), scheduled_for=scheduled.scheduled_for)


class ScheduledExportPage(BaseModel):
    """One page of a schedule's exports, latest tick first."""

    items: list[ScheduledExportPublic]
    next_cursor: str | None


async def schedule_store(runtime: RuntimeDep) -> ScheduleStore:
    return ScheduleStore(runtime.settings.database_url, runtime.pool)


SchedulesDep = Annotated[ScheduleStore, Depends(schedule_store)]


def _found(schedule: ExportSchedule | None) -> ExportSchedule:
    """The tenant's schedule; None (unknown, malformed or another tenant's id) is 404."""
    if schedule is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="schedule not found")
    return schedule


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "The tenant already has a schedule with this name."}},
)
def create_schedule(
    body: ExportScheduleCreate,
    tenant: TenantDep,
    runtime: RuntimeDep,
    schedules: SchedulesDep,
    links: LinksDep,
    response: Response,
) -> ExportSchedulePublic:
    """Create a schedule; its first export is made at the next tick after now."""
    request, callback_url = validated_request(body, tenant, runtime)
    try:
        check_row_limit(runtime.quotas.for_tenant(tenant.id), request.row_limit)  # every tick would fail
        schedule = schedules.create(
            request,
            name=body.name,
            cron=body.cron,
            timezone=body.timezone,
            callback_url=callback_url,
            created_by=f"api-key:{tenant.api_key_id}",
        )
    except ScheduleNameTaken as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=exc.message) from None
    except ExportRequestError as exc:
        raise _invalid(exc, expires_in_given=body.expires_in is not None) from None
    public = ExportSchedulePublic.from_schedule(schedule, links)
    response.headers["Location"] = f"{links.api_base}{router.prefix}/{schedule.id}"
    return public


@router.get("")
def list_schedules(
    tenant: TenantDep,
    schedules: SchedulesDep,
    links: LinksDep,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
) -> ExportSchedulePage:
    """The tenant's schedules, oldest first."""
    after = decode_cursor(cursor, created_and_id) if cursor else None
    found = schedules.list_schedules(tenant.id, limit=limit + 1, after=after)
    page, next_cursor = next_page(found, limit, lambda s: (s.created_at.isoformat(), str(s.id)))
    return ExportSchedulePage(
        items=[ExportSchedulePublic.from_schedule(s, links) for s in page], next_cursor=next_cursor
    )


@router.get("/{schedule_id}", responses=_NOT_FOUND)
def get_schedule(schedule_id: str, tenant: TenantDep, schedules: SchedulesDep, links: LinksDep) -> ExportSchedulePublic:
    """One schedule: its spec, cron, timezone, state and next tick."""
    return ExportSchedulePublic.from_schedule(_found(schedules.get(schedule_id, tenant_id=tenant.id)), links)


@router.post("/{schedule_id}/pause", responses=_NOT_FOUND)
def pause_schedule(
    schedule_id: str, tenant: TenantDep, schedules: SchedulesDep, links: LinksDep
) -> ExportSchedulePublic:
    """Stop making exports (idempotent); ticks while paused are skipped."""
    return ExportSchedulePublic.from_schedule(_found(schedules.pause(schedule_id, tenant_id=tenant.id)), links)


@router.post("/{schedule_id}/resume", responses=_NOT_FOUND)
def resume_schedule(
    schedule_id: str, tenant: TenantDep, schedules: SchedulesDep, links: LinksDep
) -> ExportSchedulePublic:
    """Make exports again from the next tick after now (idempotent); clears ``last_error``."""
    return ExportSchedulePublic.from_schedule(_found(schedules.resume(schedule_id, tenant_id=tenant.id)), links)


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND)
def delete_schedule(schedule_id: str, tenant: TenantDep, schedules: SchedulesDep) -> None:
    """Delete the schedule. The exports it made stay, listed under /exports (no longer under it)."""
    if not schedules.delete(schedule_id, tenant_id=tenant.id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="schedule not found")


@router.get("/{schedule_id}/exports", responses=_NOT_FOUND)
def list_schedule_exports(
    schedule_id: str,
    tenant: TenantDep,
    schedules: SchedulesDep,
    links: LinksDep,
    limit: PageLimit = 50,
    cursor: PageCursor = None,
) -> ScheduledExportPage:
    """The exports this schedule made, latest tick first."""
    schedule = _found(schedules.get(schedule_id, tenant_id=tenant.id))
    before = decode_cursor(cursor, lambda p: datetime.fromisoformat(p[0])) if cursor else None
    found = schedules.exports(schedule.id, tenant_id=tenant.id, limit=limit + 1, before=before)
    page, next_cursor = next_page(found, limit, lambda e: (e.scheduled_for.isoformat(),))
    return ScheduledExportPage(
        items=[ScheduledExportPublic.from_scheduled(e, links) for e in page], next_cursor=next_cursor
    )
