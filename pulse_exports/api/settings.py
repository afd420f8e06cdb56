"""The API's configuration: one validated object read from the PULSE_* environment."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    @property
    def source_url(self) -> str:
        return self.source_database_url or self.database_url
