-- Signed callbacks: delivery state on export_jobs and the per-tenant signing secret.
ALTER TABLE export_jobs
    ADD COLUMN callback_status       text CHECK (callback_status IN ('pending', 'delivered', 'failed')),
    ADD COLUMN callback_attempts     integer NOT NULL DEFAULT 0,
    ADD COLUMN callback_next_at      timestamptz,
    ADD COLUMN callback_last_error   text,
    ADD COLUMN callback_delivered_at timestamptz;

-- The callbacks sensor picks due deliveries by time.
CREATE INDEX export_jobs_callbacks_due ON export_jobs (callback_next_at) WHERE callback_status = 'pending';

-- A job with a callback_url that reaches COMPLETED, FAILED or CANCELLED gets a pending callback,
-- whichever path wrote the status (the run, the failure/cancel sensors, the API, an operator's UPDATE).
-- A job that leaves that state before delivery (re-queued, or expired) takes its pending event with it.
CREATE FUNCTION export_jobs_schedule_callback() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.callback_url IS NULL OR (TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status) THEN
        RETURN NEW;
    END IF;
    IF NEW.status IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN
        NEW.callback_status := 'pending';
        NEW.callback_next_at := now();
        NEW.callback_attempts := 0;
        NEW.callback_last_error := NULL;
        NEW.callback_delivered_at := NULL;
    ELSIF NEW.callback_status = 'pending' AND NEW.status = 'EXPIRED' THEN
        NEW.callback_status := 'failed';
        NEW.callback_next_at := NULL;
        NEW.callback_last_error := 'the export expired before its callback was delivered';
    ELSIF NEW.callback_status = 'pending' THEN
        NEW.callback_status := NULL;
        NEW.callback_next_at := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER export_jobs_callback BEFORE INSERT OR UPDATE OF status ON export_jobs
    FOR EACH ROW EXECUTE FUNCTION export_jobs_schedule_callback();

-- The HMAC-SHA256 key that signs a tenant's callbacks; created on first use, rotatable.
CREATE TABLE tenant_secrets (
    tenant_id       text PRIMARY KEY,
    callback_secret text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    rotated_at      timestamptz
);

ALTER TABLE tenant_secrets ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_secrets FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_secrets_tenant_isolation ON tenant_secrets
    USING (coalesce(current_setting('pulse.tenant_id', true), '') IN ('', tenant_id))
    WITH CHECK (coalesce(current_setting('pulse.tenant_id', true), '') IN ('', tenant_id));
