"""Recurring exports: every read and write of ``export_schedules``, and the due-tick logic that turns
each tick of a schedule into exactly one ``export_jobs`` row.

Exactly once: a tick's job carries the idempotency key ``schedule:<schedule id>:<tick, UTC ISO-8601>``
(unique per tenant in export_jobs; ``JobStore.create`` makes it from the tick) and is inserted in the same
transaction that advances the schedule's ``next_run_at`` while holding its row lock (``FOR UPDATE SKIP
LOCKED``). A repeated, concurrent or restarted evaluation finds the schedule locked or no longer due; were it
due again, the key returns the job already made.

Missed ticks: ticks that passed while nothing evaluated a schedule (daemon down, sensor stopped) give one
job, for the latest of them, and the schedule goes on from the next tick after now; never a burst. Ticks
that pass while a schedule is paused are skipped: resuming starts at the next tick after the resume.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any
from zoneinfo import available_timezones

import psycopg

# Dagster's own cron utilities (its vendored croniter plus the DST handling its schedules rely on), so a
# recurring export ticks exactly like a Dagster schedule with the same cron string and timezone. A private
# module: the dagster<1.14 pin in pyproject.toml keeps it stable.
from dagster._utils.schedules import (
    cron_string_iterator,
    get_latest_completed_cron_tick,
    has_out_of_range_cron_interval,
    is_valid_cron_string,
)
from psycopg import sql

from pulse_exports.catalog import Catalog, ExportRequest, ExportRequestError, _shown
from pulse_exports.db import PostgresStore, column_list, connect
from pulse_exports.jobstore import ExportJob, ExportSpecRow, JobStore, parse_id, spec_params

MAX_NAME_LENGTH = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ScheduleNameTaken(ExportRequestError):
    """The tenant already has a schedule with this name (the API answers 409)."""

    def __init__(self, name: str) -> None:
        super().__init__("name", f"a schedule named {_shown(name)} already exists")


@dataclass(frozen=True)
class ExportSchedule(ExportSpecRow):
    """One row of export_schedules."""

    name: str
    cron: str
    timezone: str
    enabled: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_export_id: uuid.UUID | None
    last_error: str | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime

    def validate(self, catalog: Catalog) -> ExportRequest:
        """The export spec checked against today's catalog (a column or type may have gone since)."""
        return catalog.validate(**self.spec())


@dataclass(frozen=True)
class ScheduledExport:
    """A job a schedule made, with the tick it was made for."""

    job: ExportJob
    scheduled_for: datetime


@dataclass(frozen=True)
class ScheduleTick:
    """What one due schedule got from an evaluation: its tick's job, or a pause with the reason."""

    schedule_id: uuid.UUID
    tenant_id: str
    scheduled_for: datetime
    export_id: uuid.UUID | None
    created: bool  # False: the tick's job existed already, or the schedule was paused instead (``error``)
    error: str | None = None


# -- cron and timezone ----------------------------------------------------------------------
def validate_cron(cron: object) -> str:
    """The cron expression (5 fields, or @hourly/@daily/...), whitespace normalised; else ExportRequestError."""
    text = " ".join(cron.split()) if isinstance(cron, str) else ""
    if not text or len(text) > 256 or not is_valid_cron_string(text) or has_out_of_range_cron_interval(text):
        raise ExportRequestError(
            "cron",
            f"{_shown(cron)} is not a cron expression: five fields (minute hour day-of-month month day-of-week),"
            " e.g. '*/15 * * * *' or '0 6 * * mon-fri'",
        )
    try:
        next_tick(text, "UTC", datetime(2000, 1, 1, tzinfo=timezone.utc))
    except ValueError:  # croniter's CroniterBadDateError: no such date in the years it searches (31 April)
        raise ExportRequestError("cron", f"{_shown(cron)} never fires (no such date)") from None
    return text


@lru_cache(maxsize=1)
def _iana_timezones() -> frozenset[str]:
    # 'localtime' is whatever the host is set to: not a name that means the same everywhere.
    return frozenset(available_timezones() - {"localtime"})


def validate_timezone(name: object) -> str:
    """An IANA timezone name (``Europe/Paris``, ``UTC``); else ExportRequestError naming ``timezone``."""
    if not isinstance(name, str) or name not in _iana_timezones():
        raise ExportRequestError("timezone", f"{_shown(name)} is not an IANA timezone, e.g. 'Europe/Paris' or 'UTC'")
    return name


def next_tick(cron: str, tz: str, after: datetime) -> datetime:
    """The first tick of ``cron`` in ``tz`` strictly after ``after``, as a UTC datetime."""
    for tick in cron_string_iterator(after.timestamp(), cron, tz):
        if tick > after:
            return tick.astimezone(timezone.utc)
    raise AssertionError("a cron iterator never ends")


def latest_tick(cron: str, tz: str, at: datetime) -> datetime:
    """The last tick of ``cron`` in ``tz`` at or before ``at``, as a UTC datetime."""
    return get_latest_completed_cron_tick(cron, at, tz).astimezone(timezone.utc)


def validate_name(name: object) -> str:
    text = name.strip() if isinstance(name, str) else ""
    if not text or len(text) > MAX_NAME_LENGTH or _CONTROL.search(text):
        raise ExportRequestError("name", f"must be 1-{MAX_NAME_LENGTH} characters, without control characters")
    return text


# -- the table ------------------------------------------------------------------------------
_COLUMNS = column_list(ExportSchedule)
_JOB_COLUMNS = column_list(ExportJob)


def _q(text: str) -> sql.Composed:
    """A query with ``{cols}`` standing for every ExportSchedule column and ``{job_cols}`` for ExportJob's."""
    return sql.SQL(text).format(cols=_COLUMNS, job_cols=_JOB_COLUMNS)  # type: ignore[arg-type]


def _schedule(row: dict[str, Any] | None) -> ExportSchedule | None:
    return ExportSchedule(**row) if row else None


class ScheduleStore(PostgresStore):
    """The export_schedules table, over short autocommit connections or a pool (the API)."""

    def create(
        self,
        request: ExportRequest,
        *,
        name: str,
        cron: str,
        timezone: str = "UTC",
        callback_url: str | None = None,
        created_by: str | None = None,
        now: datetime | None = None,
    ) -> ExportSchedule:
        """Store a schedule for a validated request; its first tick is the first after ``now`` (the
        database's clock by default). Raises ExportRequestError naming name, cron or timezone."""
        name, cron, timezone = validate_name(name), validate_cron(cron), validate_timezone(timezone)
        with self.connect() as conn:
            now = now or _db_now(conn)
            row = conn.execute(
                _q("""
                INSERT INTO export_schedules (tenant_id, export_type, format, compression, columns, filters,
                    row_limit, options, name, callback_url, cron, timezone, next_run_at, created_by)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (tenant_id, name) DO NOTHING
                RETURNING {cols}
                """),
                (*spec_params(request), name, callback_url, cron, timezone, next_tick(cron, timezone, now), created_by),
            ).fetchone()
        if row is None:
            raise ScheduleNameTaken(name)
        return ExportSchedule(**row)

    def get(self, schedule_id: str | uuid.UUID, *, tenant_id: str | None = None) -> ExportSchedule | None:
        """The schedule, or None; with ``tenant_id``, another tenant's schedule is None too."""
        parsed = parse_id(schedule_id)
        if parsed is None:
            return None
        with self.connect() as conn:
            row = conn.execute(
                _q("SELECT {cols} FROM export_schedules WHERE id = %s AND (%s::text IS NULL OR tenant_id = %s)"),
                (parsed, tenant_id, tenant_id),
            ).fetchone()
        return _schedule(row)

    def list_schedules(
        self, tenant_id: str | None = None, *, limit: int = 100, after: tuple[datetime, uuid.UUID] | None = None
    ) -> list[ExportSchedule]:
        """Schedules in creation order (a tenant's, or all), keyset-paginated by (created_at, id)."""
        with self.connect() as conn:
            rows = conn.execute(
                _q("""
                SELECT {cols} FROM export_schedules
                WHERE (%(t)s::text IS NULL OR tenant_id = %(t)s)
                  AND (%(at)s::timestamptz IS NULL OR (created_at, id) > (%(at)s, %(ai)s::uuid))
                ORDER BY created_at, id LIMIT %(lim)s
                """),
                {"t": tenant_id, "at": after[0] if after else None, "ai": after[1] if after else None, "lim": limit},
            ).fetchall()
        return [ExportSchedule(**r) for r in rows]

    def pause(self, schedule_id: str | uuid.UUID, *, tenant_id: str | None = None) -> ExportSchedule | None:
        """Stop making jobs (idempotent); None when there is no such schedule."""
        with self.connect() as conn:
            row = conn.execute(
                _q("""
                UPDATE export_schedules SET enabled = false, next_run_at = NULL, updated_at = now()
                WHERE id = %s AND (%s::text IS NULL OR tenant_id = %s)
                RETURNING {cols}
                """),
                (parse_id(schedule_id), tenant_id, tenant_id),
            ).fetchone()
        return _schedule(row)

    def resume(
        self, schedule_id: str | uuid.UUID, *, tenant_id: str | None = None, now: datetime | None = None
    ) -> ExportSchedule | None:
        """Start again at the next tick after ``now``; a running schedule is left as it is (its due tick stays
        due). Clears the error the sensor paused it with. None when there is no such schedule."""
        parsed = parse_id(schedule_id)
        if parsed is None:
            return None
        with self.connect() as conn, conn.transaction():
            now = now or _db_now(conn)
            row = conn.execute(
                _q(
                    "SELECT {cols} FROM export_schedules WHERE id = %s AND (%s::text IS NULL OR tenant_id = %s)"
                    " FOR UPDATE"
                ),
                (parsed, tenant_id, tenant_id),
            ).fetchone()
            schedule = _schedule(row)
            if schedule is None or schedule.enabled:
                return schedule
            row = conn.execute(
                _q("""
                UPDATE export_schedules SET enabled = true, next_run_at = %s, last_error = NULL, updated_at = now()
                WHERE id = %s RETURNING {cols}
                """),
                (next_tick(schedule.cron, schedule.timezone, now), parsed),
            ).fetchone()
        return _schedule(row)

    def delete(self, schedule_id: str | uuid.UUID, *, tenant_id: str | None = None) -> bool:
        """Delete the schedule; its jobs stay, with schedule_id set NULL by the foreign key."""
        with self.connect() as conn:
            cur = conn.execute(
                "DELETE FROM export_schedules WHERE id = %s AND (%s::text IS NULL OR tenant_id = %s)",
                (parse_id(schedule_id), tenant_id, tenant_id),
            )
            return cur.rowcount == 1

    def exports(
        self,
        schedule_id: str | uuid.UUID,
        *,
        tenant_id: str | None = None,
        limit: int = 50,
        before: datetime | None = None,
    ) -> list[ScheduledExport]:
        """The jobs the schedule made, latest tick first; ``before`` pages on from a tick."""
        with self.connect() as conn:
            rows = conn.execute(
                _q("""
                SELECT {job_cols}, scheduled_for AS tick FROM export_jobs
                WHERE schedule_id = %(s)s AND (%(t)s::text IS NULL OR tenant_id = %(t)s)
                  AND (%(before)s::timestamptz IS NULL OR scheduled_for < %(before)s)
                ORDER BY scheduled_for DESC, id DESC LIMIT %(lim)s
                """),
                {"s": parse_id(schedule_id), "t": tenant_id, "before": before, "lim": limit},
            ).fetchall()
        return [ScheduledExport(scheduled_for=row.pop("tick"), job=ExportJob(**row)) for row in rows]


def _db_now(conn: psycopg.Connection[dict[str, Any]]) -> datetime:
    """The database's clock: every daemon and API process then agrees on which ticks are due."""
    row = conn.execute("SELECT now() AS now").fetchone()
    assert row is not None
    return row["now"]  # type: ignore[no-any-return]


# -- the due ticks --------------------------------------------------------------------------
class _JobsInTransaction(JobStore):
    """JobStore's job creation on the caller's connection, inside the caller's transaction."""

    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        super().__init__(conn.info.dsn)
        self._conn = conn

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        yield self._conn


def enqueue_due_schedules(
    database_url: str, catalog: Catalog, now: datetime | None = None, *, limit: int = 200
) -> list[ScheduleTick]:
    """Give every due schedule (up to ``limit``, most overdue first) one PENDING job for its latest tick
    at or before ``now`` (the database's clock by default) and move it to its next tick after ``now``.

    One transaction: the jobs exist if and only if the schedules moved on. Schedules another evaluation
    holds are skipped, not waited for. A schedule whose spec, cron or timezone no longer validates is
    paused with the reason in ``last_error`` instead of failing the others.
    """
    with connect(database_url) as conn, conn.transaction():
        now = now or _db_now(conn)
        rows = conn.execute(
            _q("""
            SELECT {cols} FROM export_schedules
            WHERE enabled AND next_run_at <= %s
            ORDER BY next_run_at LIMIT %s
            FOR UPDATE SKIP LOCKED
            """),
            (now, limit),
        ).fetchall()
        jobs = _JobsInTransaction(conn)
        return [_enqueue_tick(conn, jobs, catalog, ExportSchedule(**row), now) for row in rows]


def _enqueue_tick(
    conn: psycopg.Connection[dict[str, Any]], jobs: JobStore, catalog: Catalog, schedule: ExportSchedule, now: datetime
) -> ScheduleTick:
    assert schedule.next_run_at is not None  # enabled schedules always have one (table CHECK)
    try:
        cron, tz = validate_cron(schedule.cron), validate_timezone(schedule.timezone)
        request = schedule.validate(catalog)
    except ExportRequestError as exc:
        reason = f"paused: {exc}"
        conn.execute(
            "UPDATE export_schedules SET enabled = false, next_run_at = NULL, last_error = %s, updated_at = now()"
            " WHERE id = %s",
            (reason, schedule.id),
        )
        return ScheduleTick(schedule.id, schedule.tenant_id, schedule.next_run_at, None, False, reason)
    # The latest tick at or before now: the due one, or after downtime the most recent of those missed.
    scheduled_for = max(latest_tick(cron, tz, now), schedule.next_run_at)
    # No max_active_jobs: a tick is never refused for the tenant's quota (the run still enforces row and byte quotas).
    job, created = jobs.create(
        request,
        callback_url=schedule.callback_url,
        created_by=f"schedule:{schedule.id}",
        schedule_id=schedule.id,
        scheduled_for=scheduled_for,
    )
    conn.execute(
        "UPDATE export_schedules SET next_run_at = %s, last_run_at = %s, last_export_id = %s, last_error = NULL,"
        " updated_at = now() WHERE id = %s",
        (next_tick(cron, tz, now), scheduled_for, job.id, schedule.id),
    )
    return ScheduleTick(schedule.id, schedule.tenant_id, scheduled_for, job.id, created)
