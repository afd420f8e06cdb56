-- Recurring exports: a tenant's export spec with a cron expression in an IANA timezone. The
-- export_schedules_sensor turns each due tick into one export_jobs row (see pulse_exports/recurring.py).
CREATE TABLE export_schedules (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       text        NOT NULL,
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    -- the export spec, as validated by the catalog; options carry expires_in (the files' retention)
    export_type     text        NOT NULL,
    format          text        NOT NULL CHECK (format IN ('csv', 'json', 'ndjson', 'parquet')),
    compression     text        NOT NULL CHECK (compression IN ('none', 'gzip', 'zstd')),
    columns         text[],
    filters         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    row_limit       bigint      CHECK (row_limit IS NULL OR row_limit > 0),
    options         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    callback_url    text,
    cron            text        NOT NULL,
    timezone        text        NOT NULL DEFAULT 'UTC',
    enabled         boolean     NOT NULL DEFAULT true,
    next_run_at     timestamptz,            -- the next tick (UTC instant); NULL while paused
    last_run_at     timestamptz,            -- the tick of the latest job made
    last_export_id  uuid,                   -- that job (no FK: job rows are never deleted, and the cycle is not worth it)
    last_error      text,                   -- why the schedule was paused by the sensor (spec no longer valid)
    created_by      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT export_schedules_name UNIQUE (tenant_id, name),
    CONSTRAINT export_schedules_enabled_has_next CHECK (NOT enabled OR next_run_at IS NOT NULL)
);

-- The sensor finds due schedules by time.
CREATE INDEX export_schedules_due ON export_schedules (next_run_at) WHERE enabled;

ALTER TABLE export_schedules ENABLE ROW LEVEL SECURITY;
ALTER TABLE export_schedules FORCE ROW LEVEL SECURITY;
CREATE POLICY export_schedules_tenant_isolation ON export_schedules
    USING (coalesce(current_setting('pulse.tenant_id', true), '') IN ('', tenant_id))
    WITH CHECK (coalesce(current_setting('pulse.tenant_id', true), '') IN ('', tenant_id));

-- Each job a schedule made names it and its tick; deleting the schedule keeps the jobs.
-- The tick is also in the job's idempotency key, so (tenant_id, idempotency_key) makes one job per tick.
ALTER TABLE export_jobs
    ADD COLUMN schedule_id   uuid REFERENCES export_schedules (id) ON DELETE SET NULL,
    ADD COLUMN scheduled_for timestamptz;

CREATE INDEX export_jobs_schedule ON export_jobs (schedule_id, scheduled_for DESC) WHERE schedule_id IS NOT NULL;
