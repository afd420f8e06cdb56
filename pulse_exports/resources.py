"""Dagster resources: the job database (and source), the export store and run settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

import dagster as dg
import psycopg
from pydantic import Field

from pulse_exports.callbacks import CallbackPolicy
from pulse_exports.catalog import Catalog, OperatorTable
from pulse_exports.db import ConnectionSource
from pulse_exports.jobstore import JobStore
from pulse_exports.quotas import Quotas
from pulse_exports.storage import ExportStore, store_from_url


class PulseDatabase(dg.ConfigurableResource):
    """The PostgreSQL that holds export_jobs, and the source database the rows come from."""

    url: str = Field(description="PULSE_DATABASE_URL: the database with export_jobs.")
    source_url: str | None = Field(default=None, description="PULSE_SOURCE_DATABASE_URL; unset means the job database.")
    export_tables: str | None = Field(
        default=None, description="PULSE_EXPORT_TABLES: a JSON list of operator tables; unset reads the env."
    )

    def jobs(self, connections: ConnectionSource | None = None) -> JobStore:
        """The export_jobs store: a short connection per call, or ``connections``' (e.g. a ``HeldConnection``)."""
        return JobStore(self.url, connections)

    def source(self) -> str:
        return self.source_url or os.environ.get("PULSE_SOURCE_DATABASE_URL") or self.url

    def catalog(self) -> Catalog:
        """The catalog, with operator tables resolved against the source database's columns."""
        tables = OperatorTable.parse_all(
            self.export_tables if self.export_tables is not None else os.environ.get("PULSE_EXPORT_TABLES")
        )
        if not tables:
            return Catalog.load()
        with psycopg.connect(self.source()) as conn:
            return Catalog.load(conn, tables)


class ExportStorage(dg.ConfigurableResource):
    """Where export files go: ``s3://bucket/prefix`` or ``file:///path``.

    Endpoint and credentials left unset come from the environment at use
    (PULSE_S3_ENDPOINT_URL / AWS_ENDPOINT_URL, and boto3's usual AWS_* variables).
    """

    url: str = Field(description="PULSE_STORAGE_URL")
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region_name: str | None = None

    def get_store(self) -> ExportStore:
        return store_from_url(
            self.url,
            endpoint_url=self.endpoint_url,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            region_name=self.region_name,
        )


class ExportSettings(dg.ConfigurableResource):
    """Knobs of the export runs; per-request options override the part sizes."""

    part_max_rows: int = 5_000_000
    part_max_bytes: int = 512 * 1024**2
    # rows per Arrow batch, shared by the slices of a sliced export (two slices read 16k each): what is in
    # flight, so it bounds the run's memory. A Parquet row group is one batch.
    batch_rows: int = 32_768
    retention_hours: int = 7 * 24
    sensor_batch_size: int = 200
    heartbeat_interval_seconds: float = 15.0
    heartbeat_timeout_seconds: float = 120.0  # a RUNNING job silent this long has lost its worker
    workdir: str | None = Field(default=None, description="Local scratch for parts before upload.")
    extract_slices: int = Field(
        default=2,
        ge=1,
        description="Time-ordered exports this big are read by this many backends at once, each writing its own"
        " parts (1: one stream). Two keep a 2-core machine busy: PostgreSQL's work per row is the bottleneck.",
    )
    min_slice_rows: int = Field(default=500_000, ge=1, description="Fewest estimated rows per slice.")
    # Quotas: a field left unset reads the variable the API reads too (PULSE_QUOTA_*, PULSE_TENANT_QUOTAS).
    quota_max_active_jobs: int | None = Field(default=None, description="Unset: PULSE_QUOTA_MAX_ACTIVE_JOBS.")
    quota_max_rows: int | None = Field(default=None, description="Unset: PULSE_QUOTA_MAX_ROWS.")
    quota_max_bytes: int | None = Field(default=None, description="Unset: PULSE_QUOTA_MAX_BYTES.")
    tenant_quotas: str | None = Field(default=None, description="Unset: PULSE_TENANT_QUOTAS (JSON overrides).")

    @property
    def retention(self) -> timedelta:
        return timedelta(hours=self.retention_hours)

    def quotas(self) -> Quotas:
        """The quotas runs enforce; raises QuotaConfigError naming a variable that cannot be used."""
        return Quotas.from_env(
            max_active_jobs=self.quota_max_active_jobs,
            max_rows=self.quota_max_rows,
            max_bytes=self.quota_max_bytes,
            tenant_quotas=self.tenant_quotas,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ExportSettings:
        """The defaults, each overridable by ``PULSE_EXPORT_<FIELD>``, e.g. PULSE_EXPORT_HEARTBEAT_TIMEOUT_SECONDS=300.
        The quota fields are left unset: they read their own PULSE_QUOTA_* variables at use."""
        env = os.environ if environ is None else environ
        own = ("quota_", "tenant_quotas")
        names = {name: f"PULSE_EXPORT_{name.upper()}" for name in cls.model_fields if not name.startswith(own)}
        return cls(**{name: env[var] for name, var in names.items() if env.get(var)})


class CallbackSettings(dg.ConfigurableResource):
    """Signed callback delivery; a field left unset reads PULSE_CALLBACK_<FIELD> (see callbacks.CallbackPolicy)."""

    allowlist: str | None = Field(default=None, description="PULSE_CALLBACK_ALLOWLIST: hostnames and/or CIDRs.")
    api_public_url: str | None = Field(default=None, description="PULSE_API_PUBLIC_URL: base of download links.")
    max_attempts: int | None = Field(default=None, description="Attempts per event (default 8).")
    max_age_seconds: float | None = Field(default=None, description="Give up this long after the job ended (3600).")
    backoff_base_seconds: float | None = None
    backoff_cap_seconds: float | None = None
    connect_timeout_seconds: float | None = None
    timeout_seconds: float | None = Field(default=None, description="Deadline of one attempt (default 10).")
    batch_size: int | None = None
    concurrency: int | None = None
    ca_bundle: str | None = Field(default=None, description="PEM file of CAs for https receivers (default certifi).")

    def policy(self) -> CallbackPolicy:
        return CallbackPolicy.from_env(**self.model_dump())
