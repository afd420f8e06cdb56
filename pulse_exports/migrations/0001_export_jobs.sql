-- The export_jobs table: everything the product needs to know about one export request.
CREATE TABLE export_jobs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id        text        NOT NULL,
    export_type      text        NOT NULL,
    format           text        NOT NULL CHECK (format IN ('csv', 'json', 'ndjson', 'parquet')),
    compression      text        NOT NULL DEFAULT 'none' CHECK (compression IN ('none', 'gzip', 'zstd')),
    columns          text[],
    filters          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    row_limit        bigint      CHECK (row_limit IS NULL OR row_limit > 0),
    options          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status           text        NOT NULL DEFAULT 'PENDING' CHECK (status IN
                         ('PENDING', 'QUEUED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED', 'EXPIRED')),
    rows_done        bigint      NOT NULL DEFAULT 0,
    rows_total       bigint,
    run_id           text,
    storage_location text,
    manifest         jsonb,
    file_size_bytes  bigint,
    row_count        bigint,
    error            text,
    callback_url     text,
    created_by       text,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    queued_at        timestamptz,
    started_at       timestamptz,
    completed_at     timestamptz,
    expires_at       timestamptz,
    heartbeat_at     timestamptz,
    attempts         integer     NOT NULL DEFAULT 0,
    CONSTRAINT export_jobs_idempotency UNIQUE (tenant_id, idempotency_key)
);

-- The sensor picks PENDING rows oldest first.
CREATE INDEX export_jobs_pending ON export_jobs (created_at) WHERE status = 'PENDING';
-- Tenant listings, newest first.
CREATE INDEX export_jobs_tenant_created ON export_jobs (tenant_id, created_at DESC, id DESC);
-- The purge schedule finds expired, still-present exports.
CREATE INDEX export_jobs_expiry ON export_jobs (expires_at) WHERE status = 'COMPLETED';

-- Row-level security: a session that sets pulse.tenant_id sees only that tenant's rows.
-- The pipeline's service role leaves it unset and sees all (it scopes every query itself).
ALTER TABLE export_jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE export_jobs FORCE ROW LEVEL SECURITY;
CREATE POLICY export_jobs_tenant_isolation ON export_jobs
    USING (coalesce(current_setting('pulse.tenant_id', true), '') IN ('', tenant_id))
    WITH CHECK (coalesce(current_setting('pulse.tenant_id', true), '') IN ('', tenant_id));
