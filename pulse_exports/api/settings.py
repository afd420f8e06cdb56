"""The API's configuration: one validated object read from the PULSE_* environment."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pulse_exports.quotas import LIMIT_VARIABLES, Quotas, parse_limit, parse_tenant_quotas


class ApiSettings(BaseSettings):
    """Where the job database, the export store and Dagster are, and how the API presents links."""

    model_config = SettingsConfigDict(env_prefix="PULSE_", extra="ignore")

    database_url: str = Field(description="PULSE_DATABASE_URL: the database with export_jobs and api_keys.")
    source_database_url: str | None = Field(
        default=None, description="PULSE_SOURCE_DATABASE_URL: where rows are exported from (estimates)."
    )
    storage_url: str = Field(description="PULSE_STORAGE_URL: s3://bucket/prefix or file:///path.")
    s3_endpoint_url: str | None = Field(default=None, description="PULSE_S3_ENDPOINT_URL (else AWS_ENDPOINT_URL).")
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="PULSE_S3_PUBLIC_ENDPOINT_URL: the S3 endpoint users reach, when it differs from the API's"
        " (presigned URLs sign the host, so they are made against this one).",
    )
    export_tables: str | None = Field(default=None, description="PULSE_EXPORT_TABLES: operator tables (JSON).")
    dagster_graphql_url: str | None = Field(
        default=None,
        description="PULSE_DAGSTER_GRAPHQL_URL, e.g. http://dagster:3000/graphql; unset: the sensor launches runs.",
    )
    dagster_ui_url: str | None = Field(default=None, description="PULSE_DAGSTER_UI_URL: run links in export status.")
    dagster_location_name: str = "pulse_exports"
    dagster_repository_name: str = "__repository__"
    dagster_timeout_seconds: float = Field(default=5.0, gt=0)
    api_public_url: str | None = Field(
        default=None, description="PULSE_API_PUBLIC_URL: the API's base URL in links; unset: the request's own."
    )
    download_url_ttl_seconds: int = Field(
        default=3600, ge=1, le=7 * 86400, description="Longest life of a presigned download URL (SigV4: 7 days)."
    )
    callback_allowlist: str | None = Field(
        default=None, description="PULSE_CALLBACK_ALLOWLIST: internal hosts/CIDRs callbacks may reach."
    )
    db_pool_size: int = Field(
        default=8, ge=1, description="PULSE_DB_POOL_SIZE: pooled connections, and threads for sync endpoints."
    )
    estimate_rows: bool = Field(default=True, description="Answer POST /exports with the planner's row estimate.")
    metrics_token: SecretStr | None = Field(
        default=None, description="PULSE_METRICS_TOKEN: bearer token /metrics requires; unset: /metrics is open."
    )
    metrics_tenant_labels: bool = Field(
        default=False,
        description="PULSE_METRICS_TENANT_LABELS: label job counts, rows and bytes by tenant (one series per tenant).",
    )
    quota_max_active_jobs: int | None = Field(
        default=None, description="PULSE_QUOTA_MAX_ACTIVE_JOBS: a tenant's unfinished exports at once; unset: no limit."
    )
    quota_max_rows: int | None = Field(default=None, description="PULSE_QUOTA_MAX_ROWS: rows of one export.")
    quota_max_bytes: int | None = Field(default=None, description="PULSE_QUOTA_MAX_BYTES: bytes of one export.")
    tenant_quotas: str | None = Field(
        default=None,
        description='PULSE_TENANT_QUOTAS: per-tenant overrides, e.g. {"tenant-a": {"max_active_jobs": 3}}.',
    )

    # Bad quota configuration stops the API at startup, with a message naming the variable.
    @field_validator("quota_max_active_jobs", "quota_max_rows", "quota_max_bytes", mode="before")
    @classmethod
    def _quota_limit(cls, value: Any, info: ValidationInfo) -> int | None:
        assert info.field_name is not None
        return parse_limit(LIMIT_VARIABLES[info.field_name.removeprefix("quota_")], value)

    @field_validator("tenant_quotas")
    @classmethod
    def _tenant_quotas(cls, value: str | None) -> str | None:
        parse_tenant_quotas(value)
        return value

    def quotas(self) -> Quotas:
        return Quotas.from_env(
            {},
            max_active_jobs=self.quota_max_active_jobs,
            max_rows=self.quota_max_rows,
            max_bytes=self.quota_max_bytes,
            tenant_quotas=self.tenant_quotas,
        )

    @property
    def source_url(self) -> str:
        return self.source_database_url or self.database_url
