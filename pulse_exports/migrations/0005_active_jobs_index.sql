-- The max_active_jobs quota counts a tenant's unfinished jobs on every POST /exports: this partial
-- index keeps that count to the few unfinished rows, however many finished ones the tenant has.
CREATE INDEX export_jobs_tenant_active ON export_jobs (tenant_id) WHERE status IN ('PENDING', 'QUEUED', 'RUNNING');
