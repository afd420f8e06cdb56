"""Every read and write of ``export_jobs``: creation, the atomic claim, progress and outcomes."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from pulse_exports.catalog import ExportRequest
from pulse_exports.db import PostgresStore, column_list
from pulse_exports.quotas import QuotaExceeded

ACTIVE = ("PENDING", "QUEUED", "RUNNING")
# First key of the per-tenant advisory lock that makes "count active jobs, then insert" atomic
# (the second key is hashtext(tenant_id); two tenants sharing a hash only wait for each other).
_ACTIVE_JOBS_LOCK = 0x7073_6171  # "psaq"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "EXPIRED")
MAX_ERROR_LENGTH = 2000
# NOTIFY channel for a run the API has just queued in Dagster; `pulse-exports daemon` LISTENs on it.
RUNS_QUEUED_CHANNEL = "pulse_runs_queued"


@dataclass(frozen=True)
class ExportSpecRow:
    """The columns export_jobs and export_schedules share: whose row it is and the export it asks for, as
    the catalog validated it when the row was written."""

    id: uuid.UUID
    tenant_id: str
    export_type: str
    format: str
    compression: str
    columns: list[str] | None
    filters: dict[str, Any]
    row_limit: int | None
    options: dict[str, Any]
    callback_url: str | None

    def spec(self) -> dict[str, Any]:
        """The stored request as keyword arguments of ``Catalog.validate`` and ``ExportRequest``."""
        return {
            "tenant_id": self.tenant_id,
            "export_type": self.export_type,
            "format": self.format,
            "compression": self.compression,
            "columns": self.columns,
            "filters": self.filters,
            "row_limit": self.row_limit,
            "options": self.options,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (ids and times as strings)."""
        return json_ready(self)


def spec_params(request: ExportRequest) -> tuple[Any, ...]:
    """Query parameters for the spec columns (tenant_id, export_type, format, compression, columns, filters,
    row_limit, options), in that order."""
    return (
        request.tenant_id,
        request.export_type,
        request.format,
        request.compression,
        list(request.columns) if request.columns else None,
        Jsonb(dict(request.filters)),
        request.row_limit,
        Jsonb(dict(request.options)),
    )


def schedule_idempotency_key(schedule_id: uuid.UUID, scheduled_for: datetime) -> str:
    """The idempotency key of a schedule's job for one tick: the same however often the tick is evaluated."""
    return f"schedule:{schedule_id}:{scheduled_for.astimezone(timezone.utc).isoformat()}"


@dataclass(frozen=True)
class ExportJob(ExportSpecRow):
    """One row of export_jobs."""

    status: str
    rows_done: int
    rows_total: int | None
    run_id: str | None
    storage_location: str | None
    manifest: dict[str, Any] | None
    file_size_bytes: int | None
    row_count: int | None
    error: str | None
    created_by: str | None
    idempotency_key: str | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    heartbeat_at: datetime | None
    attempts: int
    # where the callback's delivery stands (migrations/0003); status None: no callback_url, or not ended yet
    callback_status: str | None
    callback_attempts: int
    callback_last_error: str | None
    callback_delivered_at: datetime | None

    @property
    def request(self) -> ExportRequest:
        return ExportRequest(**{**self.spec(), "columns": tuple(self.columns) if self.columns else None})


def json_ready(row: Any) -> dict[str, Any]:
    """A dataclass row as plain JSON-ready data (ids and times as strings)."""
    out: dict[str, Any] = {}
    for f in fields(row):
        value = getattr(row, f.name)
        out[f.name] = (
            value.isoformat() if isinstance(value, datetime) else str(value) if isinstance(value, uuid.UUID) else value
        )
    return out


_COLUMNS = column_list(ExportJob)


def _q(text: str) -> sql.Composed:
    """A query over export_jobs with ``{cols}`` standing for every ExportJob column."""
    return sql.SQL(text).format(cols=_COLUMNS)  # type: ignore[arg-type]


def _job(row: dict[str, Any] | None) -> ExportJob | None:
    return ExportJob(**row) if row else None


def parse_id(value: str | uuid.UUID) -> uuid.UUID | None:
    """The UUID in ``value``, or None when it is not one (so callers answer 'not found')."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class JobStore(PostgresStore):
    """The export_jobs table, reached through short autocommit connections."""

    # -- creation and reads ---------------------------------------------------------------
    def create(
        self,
        request: ExportRequest,
        *,
        callback_url: str | None = None,
        created_by: str | None = None,
        idempotency_key: str | None = None,
        max_active_jobs: int | None = None,
        schedule_id: uuid.UUID | None = None,
        scheduled_for: datetime | None = None,
        queued: bool = False,
    ) -> tuple[ExportJob, bool]:
        """Insert a PENDING job; with an idempotency key already used by this tenant, return that
        job instead. Returns (job, created). Safe under concurrent requests with one key.

        ``queued`` inserts it QUEUED instead: the caller launches its run itself (the API's GraphQL launch), so
        export_jobs_sensor, woken by every new PENDING row, leaves it alone (``release_to_sensor`` hands it back).

        With ``max_active_jobs``, raise QuotaExceeded when the tenant already has that many PENDING,
        QUEUED or RUNNING jobs (a repeated idempotency key still returns its job). A transaction-level
        advisory lock per tenant serialises count and insert, so concurrent requests cannot overshoot.

        ``schedule_id`` and ``scheduled_for`` (given together) link the job to the schedule tick that made
        it; its idempotency key is then the tick's (``schedule_idempotency_key``), so a tick makes one job."""
        if schedule_id is not None and scheduled_for is not None and idempotency_key is None:
            idempotency_key = schedule_idempotency_key(schedule_id, scheduled_for)
        elif schedule_id is not None or scheduled_for is not None:
            raise ValueError("schedule_id and scheduled_for go together, and bring their own idempotency key")
        insert = (request, callback_url, created_by, idempotency_key, schedule_id, scheduled_for, queued)
        if max_active_jobs is None:
            with self.connect() as conn:
                return self._insert(conn, *insert)
        with self.connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_ACTIVE_JOBS_LOCK, request.tenant_id))
            existing = self._by_idempotency_key(conn, request.tenant_id, idempotency_key) if idempotency_key else None
            if existing is not None:
                return existing, False
            row = conn.execute(
                "SELECT count(*) AS n FROM (SELECT 1 FROM export_jobs WHERE tenant_id = %s"
                " AND status IN ('PENDING', 'QUEUED', 'RUNNING') LIMIT %s) AS active",
                (request.tenant_id, max_active_jobs),
            ).fetchone()
            active = int(row["n"]) if row else 0
            if active >= max_active_jobs:
                raise QuotaExceeded.for_active_jobs(max_active_jobs, active)
            return self._insert(conn, *insert)

    def find_by_idempotency_key(self, tenant_id: str, idempotency_key: str) -> ExportJob | None:
        """The tenant's job made with this idempotency key, if any."""
        with self.connect() as conn:
            return self._by_idempotency_key(conn, tenant_id, idempotency_key)

    @staticmethod
    def _by_idempotency_key(
        conn: psycopg.Connection[dict[str, Any]], tenant_id: str, idempotency_key: str | None
    ) -> ExportJob | None:
        row = conn.execute(
            _q("SELECT {cols} FROM export_jobs WHERE tenant_id = %s AND idempotency_key = %s"),
            (tenant_id, idempotency_key),
        ).fetchone()
        return _job(row)

    @classmethod
    def _insert(
        cls,
        conn: psycopg.Connection[dict[str, Any]],
        request: ExportRequest,
        callback_url: str | None,
        created_by: str | None,
        idempotency_key: str | None,
        schedule_id: uuid.UUID | None,
        scheduled_for: datetime | None,
        queued: bool,
    ) -> tuple[ExportJob, bool]:
        row = conn.execute(
            _q("""
            INSERT INTO export_jobs (tenant_id, export_type, format, compression, columns, filters, row_limit,
                                     options, callback_url, created_by, idempotency_key, schedule_id, scheduled_for,
                                     status, queued_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                    CASE WHEN %s THEN 'QUEUED' ELSE 'PENDING' END, CASE WHEN %s THEN now() END)
            ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
            RETURNING {cols}
            """),
            (
                *spec_params(request),
                callback_url,
                created_by,
                idempotency_key,
                schedule_id,
                scheduled_for,
                queued,
                queued,
            ),
        ).fetchone()
        if row:
            return ExportJob(**row), True
        job = cls._by_idempotency_key(conn, request.tenant_id, idempotency_key)
        assert job is not None, "idempotency conflict without a row"
        return job, False

    def get(self, job_id: str | uuid.UUID, *, tenant_id: str | None = None) -> ExportJob | None:
        """The job, or None; with ``tenant_id``, another tenant's job is None too."""
        parsed = parse_id(job_id)
        if parsed is None:
            return None
        with self.connect() as conn:
            row = conn.execute(
                _q("SELECT {cols} FROM export_jobs WHERE id = %s AND (%s::text IS NULL OR tenant_id = %s)"),
                (parsed, tenant_id, tenant_id),
            ).fetchone()
        return _job(row)

    def list_for_tenant(
        self,
        tenant_id: str,
        *,
        limit: int = 50,
        before: tuple[datetime, uuid.UUID] | None = None,
        statuses: Sequence[str] = (),
        export_types: Sequence[str] = (),
    ) -> list[ExportJob]:
        """The tenant's jobs, newest first, keyset-paginated by (created_at, id)."""
        with self.connect() as conn:
            rows = conn.execute(
                _q("""
                SELECT {cols} FROM export_jobs
                WHERE tenant_id = %(t)s
                  AND (%(bt)s::timestamptz IS NULL OR (created_at, id) < (%(bt)s, %(bi)s::uuid))
                  AND (cardinality(%(st)s::text[]) = 0 OR status = ANY(%(st)s::text[]))
                  AND (cardinality(%(et)s::text[]) = 0 OR export_type = ANY(%(et)s::text[]))
                ORDER BY created_at DESC, id DESC LIMIT %(lim)s
                """),
                {
                    "t": tenant_id,
                    "bt": before[0] if before else None,
                    "bi": before[1] if before else None,
                    "st": list(statuses),
                    "et": list(export_types),
                    "lim": limit,
                },
            ).fetchall()
        return [ExportJob(**r) for r in rows]

    # -- the sensor -----------------------------------------------------------------------
    def pending(self, limit: int, *, stale_queued_after: timedelta | None = None) -> list[ExportJob]:
        """PENDING jobs oldest first, then QUEUED ones whose launch may have been lost."""
        with self.connect() as conn:
            rows = conn.execute(
                _q("SELECT {cols} FROM export_jobs WHERE status = 'PENDING' ORDER BY created_at LIMIT %s"),
                (limit,),
            ).fetchall()
            if stale_queued_after is not None and len(rows) < limit:
                rows += conn.execute(
                    _q("""SELECT {cols} FROM export_jobs
                        WHERE status = 'QUEUED' AND run_id IS NULL AND queued_at < now() - %s
                        ORDER BY queued_at LIMIT %s"""),
                    (stale_queued_after, limit - len(rows)),
                ).fetchall()
        return [ExportJob(**r) for r in rows]

    def mark_queued(self, job_ids: Sequence[uuid.UUID]) -> int:
        with self.connect() as conn:
            cur = conn.execute(
                "UPDATE export_jobs SET status = 'QUEUED', queued_at = now()"
                " WHERE id = ANY(%s) AND status IN ('PENDING', 'QUEUED')",
                (list(job_ids),),
            )
            return cur.rowcount

    # -- the run --------------------------------------------------------------------------
    def claim(self, job_id: str | uuid.UUID, run_id: str, *, parent_run_id: str | None = None) -> ExportJob | None:
        """Atomically move a PENDING/QUEUED job to RUNNING for this run. A second run for the
        same export gets None (the row lock makes the two updates serial). A Dagster retry of a
        crashed run (``parent_run_id``) takes over the job its parent left RUNNING."""
        with self.connect() as conn:
            row = conn.execute(
                _q("""
                UPDATE export_jobs
                SET status = 'RUNNING', run_id = %(run)s, started_at = now(), heartbeat_at = now(),
                    attempts = attempts + 1, error = NULL, rows_done = 0
                WHERE id = %(id)s
                  AND (status IN ('PENDING', 'QUEUED')
                       OR (%(parent)s::text IS NOT NULL AND status = 'RUNNING' AND run_id = %(parent)s))
                RETURNING {cols}
                """),
                {"run": run_id, "id": parse_id(job_id), "parent": parent_run_id},
            ).fetchone()
        return _job(row)

    def heartbeat(self, job_id: uuid.UUID, run_id: str) -> bool:
        """Refresh heartbeat_at; False when the job is no longer this run's (cancelled, taken over)."""
        with self.connect() as conn:
            cur = conn.execute(
                "UPDATE export_jobs SET heartbeat_at = now() WHERE id = %s AND run_id = %s AND status = 'RUNNING'",
                (job_id, run_id),
            )
            return cur.rowcount == 1

    def owns(self, job_id: uuid.UUID, run_id: str) -> bool:
        """Whether the job is still this run's, whatever its status; False once another run has taken it over."""
        with self.connect() as conn:
            row = conn.execute("SELECT run_id FROM export_jobs WHERE id = %s", (job_id,)).fetchone()
        return row is not None and row["run_id"] == run_id

    def stale_running(self, older_than: timedelta, limit: int = 100) -> list[ExportJob]:
        """RUNNING jobs whose worker has not written a heartbeat for ``older_than``."""
        with self.connect() as conn:
            rows = conn.execute(
                _q("""SELECT {cols} FROM export_jobs
                    WHERE status = 'RUNNING' AND heartbeat_at < now() - %s ORDER BY heartbeat_at LIMIT %s"""),
                (older_than, limit),
            ).fetchall()
        return [ExportJob(**r) for r in rows]

    def note(self, job_id: uuid.UUID, run_id: str, message: str) -> None:
        """Record a message on a RUNNING job without changing its status (e.g. a pending retry)."""
        with self.connect() as conn:
            conn.execute(
                "UPDATE export_jobs SET error = %s WHERE id = %s AND run_id = %s AND status = 'RUNNING'",
                (message[:MAX_ERROR_LENGTH], job_id, run_id),
            )

    def set_estimate(self, job_id: uuid.UUID, rows_total: int) -> None:
        with self.connect() as conn:
            conn.execute("UPDATE export_jobs SET rows_total = %s WHERE id = %s", (rows_total, job_id))

    def record_progress(self, job_id: uuid.UUID, run_id: str, rows_done: int) -> bool:
        """Write rows_done (and the heartbeat); False when the job is no longer this run's."""
        with self.connect() as conn:
            cur = conn.execute(
                "UPDATE export_jobs SET rows_done = %s, heartbeat_at = now()"
                " WHERE id = %s AND run_id = %s AND status = 'RUNNING'",
                (rows_done, job_id, run_id),
            )
            return cur.rowcount == 1

    def complete(
        self,
        job_id: uuid.UUID,
        run_id: str,
        *,
        storage_location: str,
        manifest: dict[str, Any],
        row_count: int,
        file_size_bytes: int,
        retention: timedelta,
    ) -> bool:
        """RUNNING -> COMPLETED once the manifest is stored."""
        with self.connect() as conn:
            cur = conn.execute(
                """
                UPDATE export_jobs
                SET status = 'COMPLETED', storage_location = %s, manifest = %s, row_count = %s,
                    rows_done = %s, file_size_bytes = %s, completed_at = now(), heartbeat_at = now(),
                    expires_at = now() + %s, error = NULL
                WHERE id = %s AND run_id = %s AND status = 'RUNNING'
                """,
                (storage_location, Jsonb(manifest), row_count, row_count, file_size_bytes, retention, job_id, run_id),
            )
            return cur.rowcount == 1

    def fail(self, job_id: uuid.UUID, reason: str, *, run_id: str | None = None) -> bool:
        """Mark an unfinished job FAILED with a reason; with ``run_id``, only if it is that run's
        (or not yet claimed). Terminal jobs are left as they are."""
        with self.connect() as conn:
            cur = conn.execute(
                """
                UPDATE export_jobs SET status = 'FAILED', error = %s, completed_at = now()
                WHERE id = %s AND status IN ('PENDING', 'QUEUED', 'RUNNING')
                  AND (%s::text IS NULL OR run_id IS NULL OR run_id = %s)
                """,
                (reason[:MAX_ERROR_LENGTH], job_id, run_id, run_id),
            )
            return cur.rowcount == 1

    def cancel(self, job_id: uuid.UUID, *, run_id: str | None = None, reason: str | None = None) -> bool:
        with self.connect() as conn:
            cur = conn.execute(
                """
                UPDATE export_jobs SET status = 'CANCELLED', completed_at = now(), error = coalesce(%s, error)
                WHERE id = %s AND status IN ('PENDING', 'QUEUED', 'RUNNING')
                  AND (%s::text IS NULL OR run_id IS NULL OR run_id = %s)
                """,
                (reason, job_id, run_id, run_id),
            )
            return cur.rowcount == 1

    # -- the purge ------------------------------------------------------------------------
    def expired(self, limit: int = 500) -> list[ExportJob]:
        with self.connect() as conn:
            rows = conn.execute(
                _q("""SELECT {cols} FROM export_jobs
                    WHERE status = 'COMPLETED' AND expires_at <= now() ORDER BY expires_at LIMIT %s"""),
                (limit,),
            ).fetchall()
        return [ExportJob(**r) for r in rows]

    def mark_expired(self, job_id: uuid.UUID) -> bool:
        with self.connect() as conn:
            cur = conn.execute(
                "UPDATE export_jobs SET status = 'EXPIRED' WHERE id = %s AND status = 'COMPLETED'", (job_id,)
            )
            return cur.rowcount == 1

    # -- the product API ------------------------------------------------------------------
    def release_to_sensor(self, job_id: uuid.UUID) -> bool:
        """QUEUED without a run -> PENDING: the API's launch failed, so ``export_jobs_sensor`` takes the job.
        (The API creates the jobs it launches QUEUED, ``create(queued=True)``, so the sensor leaves them alone.)"""
        with self.connect() as conn:
            cur = conn.execute(
                "UPDATE export_jobs SET status = 'PENDING', queued_at = NULL"
                " WHERE id = %s AND status = 'QUEUED' AND run_id IS NULL",
                (job_id,),
            )
            return cur.rowcount == 1

    def mark_launched(self, job_id: uuid.UUID, run_id: str) -> bool:
        """PENDING/QUEUED -> QUEUED with the run the API launched through GraphQL, so a cancel can
        terminate it before it starts. The claim overwrites run_id with the run that does the work.

        Then ``NOTIFY pulse_runs_queued``: ``pulse-exports daemon`` dequeues the run at once
        instead of at its next look at the queue."""
        with self.connect() as conn:
            cur = conn.execute(
                "UPDATE export_jobs SET status = 'QUEUED', queued_at = coalesce(queued_at, now()), run_id = %s"
                " WHERE id = %s AND status IN ('PENDING', 'QUEUED')",
                (run_id, job_id),
            )
            conn.execute("SELECT pg_notify(%s, '')", (RUNS_QUEUED_CHANNEL,))
            return cur.rowcount == 1

    # -- callbacks ------------------------------------------------------------------------
    def claim_due_callbacks(self, limit: int, *, lease: timedelta, now: datetime | None = None) -> list[DueCallback]:
        """Take up to ``limit`` due pending callbacks for one attempt each: the attempt is counted and the
        row pushed ``lease`` into the future in one statement, so concurrent senders never take one twice."""
        with self.connect() as conn:
            rows = conn.execute(
                _q("""
                UPDATE export_jobs
                SET callback_attempts = callback_attempts + 1,
                    callback_next_at = coalesce(%(now)s::timestamptz, now()) + %(lease)s
                WHERE id IN (
                    SELECT id FROM export_jobs
                    WHERE callback_status = 'pending' AND callback_next_at <= coalesce(%(now)s::timestamptz, now())
                      AND status IN ('COMPLETED', 'FAILED', 'CANCELLED')
                    ORDER BY callback_next_at LIMIT %(limit)s
                    FOR UPDATE SKIP LOCKED
                )
                RETURNING {cols}
                """),
                {"now": now, "lease": lease, "limit": limit},
            ).fetchall()
        return [DueCallback(attempt=row["callback_attempts"], job=ExportJob(**row)) for row in rows]

    def record_callback_delivered(self, job_id: uuid.UUID, attempt: int) -> bool:
        """pending -> delivered, if ``attempt`` is still the latest (a sender whose lease ran out writes nothing)."""
        with self.connect() as conn:
            cur = conn.execute(
                "UPDATE export_jobs SET callback_status = 'delivered', callback_delivered_at = now(),"
                " callback_next_at = NULL, callback_last_error = NULL"
                " WHERE id = %s AND callback_status = 'pending' AND callback_attempts = %s",
                (job_id, attempt),
            )
            return cur.rowcount == 1

    def record_callback_failure(
        self, job_id: uuid.UUID, attempt: int, error: str, *, retry_in: timedelta | None, now: datetime | None = None
    ) -> bool:
        """A failed attempt: due again ``retry_in`` from now, or with None, callback_status = failed for good."""
        with self.connect() as conn:
            cur = conn.execute(
                """
                UPDATE export_jobs
                SET callback_status = CASE WHEN %(retry)s::interval IS NULL THEN 'failed' ELSE 'pending' END,
                    callback_next_at = coalesce(%(now)s::timestamptz, now()) + %(retry)s::interval,
                    callback_last_error = %(error)s
                WHERE id = %(id)s AND callback_status = 'pending' AND callback_attempts = %(attempt)s
                """,
                {"retry": retry_in, "now": now, "error": error[:MAX_ERROR_LENGTH], "id": job_id, "attempt": attempt},
            )
            return cur.rowcount == 1

    def callback_state(self, job_id: str | uuid.UUID) -> CallbackState | None:
        with self.connect() as conn:
            row = conn.execute(
                "SELECT callback_status AS status, callback_attempts AS attempts, callback_next_at AS next_at,"
                " callback_last_error AS last_error, callback_delivered_at AS delivered_at"
                " FROM export_jobs WHERE id = %s",
                (parse_id(job_id),),
            ).fetchone()
        return CallbackState(**row) if row else None

    def callback_secret(self, tenant_id: str) -> str:
        """The tenant's callback signing secret, created (random, 32 bytes) on first use."""
        with self.connect() as conn:
            conn.execute(
                "INSERT INTO tenant_secrets (tenant_id, callback_secret) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (tenant_id, secrets.token_urlsafe(32)),
            )
            row = conn.execute(
                "SELECT callback_secret FROM tenant_secrets WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()
        assert row is not None, "tenant secret vanished after insert"
        return str(row["callback_secret"])

    def rotate_callback_secret(self, tenant_id: str) -> str:
        """Replace the tenant's secret; deliveries from now on are signed with the new one."""
        with self.connect() as conn:
            row = conn.execute(
                "INSERT INTO tenant_secrets (tenant_id, callback_secret) VALUES (%s, %s)"
                " ON CONFLICT (tenant_id) DO UPDATE SET callback_secret = EXCLUDED.callback_secret, rotated_at = now()"
                " RETURNING callback_secret",
                (tenant_id, secrets.token_urlsafe(32)),
            ).fetchone()
        assert row is not None
        return str(row["callback_secret"])

    # -- metrics --------------------------------------------------------------------------
    def statistics(self, duration_bounds: Sequence[float], *, by_tenant: bool = False) -> JobStatistics:
        """Aggregates of the whole table for the metrics endpoint, in two single-pass statements.

        Durations (completed_at - started_at of finished exports) come as counts per bucket: bucket i
        holds the durations d with bounds[i-1] < d <= bounds[i], bucket len(bounds) those above the last.
        """
        bounds = sorted(set(duration_bounds))
        with self.connect() as conn, conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '10s'")  # a slow scrape fails; it never piles up
            groups = conn.execute(
                """
                SELECT status, export_type, CASE WHEN %(by_tenant)s THEN tenant_id END AS tenant_id,
                       count(*) AS jobs,
                       coalesce(sum(row_count) FILTER (WHERE status IN ('COMPLETED', 'EXPIRED')), 0) AS rows_exported,
                       coalesce(sum(file_size_bytes) FILTER (WHERE status IN ('COMPLETED', 'EXPIRED')), 0)
                           AS bytes_exported,
                       count(*) FILTER (WHERE callback_status = 'pending') AS callbacks_pending,
                       count(*) FILTER (WHERE callback_status = 'delivered') AS callbacks_delivered,
                       count(*) FILTER (WHERE callback_status = 'failed') AS callbacks_failed,
                       extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds,
                       extract(epoch FROM now() - min(heartbeat_at))::float8 AS oldest_heartbeat_age_seconds
                FROM export_jobs GROUP BY 1, 2, 3
                """,
                {"by_tenant": by_tenant},
            ).fetchall()
            durations = conn.execute(
                """
                SELECT export_type, width_bucket(d, %(b)s::float8[]) - (d = ANY(%(b)s::float8[]))::int AS bucket,
                       count(*) AS jobs, sum(d) AS seconds
                FROM (SELECT export_type, extract(epoch FROM completed_at - started_at)::float8 AS d FROM export_jobs
                      WHERE status IN ('COMPLETED', 'EXPIRED') AND completed_at >= started_at) AS finished
                GROUP BY 1, 2
                """,
                {"b": bounds},
            ).fetchall()
        return JobStatistics(
            groups=[JobGroup(**row) for row in groups],
            duration_bounds=bounds,
            durations=[DurationBucket(**row) for row in durations],
        )


class PooledJobStore(JobStore):
    """A JobStore whose connections come from a pool (the API answers many short requests)."""

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__(pool.conninfo, pool)


def manifest_json(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8")


@dataclass(frozen=True)
class DueCallback:
    """A claimed callback delivery: the job as it ended and the number of this attempt (1-based)."""

    job: ExportJob
    attempt: int


@dataclass(frozen=True)
class CallbackState:
    """Where a job's callback delivery stands (status None: the job has no callback_url or has not ended)."""

    status: str | None
    attempts: int
    next_at: datetime | None
    last_error: str | None
    delivered_at: datetime | None


@dataclass(frozen=True)
class JobGroup:
    """export_jobs rows of one status and export type (and tenant, when asked), aggregated."""

    status: str
    export_type: str
    tenant_id: str | None
    jobs: int
    rows_exported: int
    bytes_exported: int
    callbacks_pending: int
    callbacks_delivered: int
    callbacks_failed: int
    oldest_age_seconds: float  # since the oldest row's created_at
    oldest_heartbeat_age_seconds: float | None


@dataclass(frozen=True)
class DurationBucket:
    """Finished exports of one type whose duration falls in one bucket (see JobStore.statistics)."""

    export_type: str
    bucket: int
    jobs: int
    seconds: float


@dataclass(frozen=True)
class JobStatistics:
    """The whole table at one instant, for the metrics endpoint."""

    groups: list[JobGroup]
    duration_bounds: list[float]
    durations: list[DurationBucket]
