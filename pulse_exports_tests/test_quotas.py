"""Per-tenant quotas against real PostgreSQL and S3: API refusals (429/422) and the export run's own guard."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import ValidationError

from pulse_exports.api import create_app
from pulse_exports.api.settings import ApiSettings
from pulse_exports.quotas import QuotaConfigError, Quotas
from pulse_exports.resources import ExportSettings
from pulse_exports_tests.exports_harness import ExportHarness
from pulse_exports_tests.servers import S3Endpoint

from .test_api import LiveApi, live_api, s3_env

TENANT = "tenant-002"  # ~1,800 telemetry rows in the seed
OTHER = "tenant-001"
TELEMETRY = {"export_type": "telemetry", "format": "csv"}


@contextmanager
def quota_api(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch, **quotas: Any
) -> Iterator[LiveApi]:
    s3_env(monkeypatch, s3_endpoint)
    with live_api(exports, s3_endpoint_url=s3_endpoint.url, **quotas) as live:
        yield live


def tenant_jobs(database_url: str, tenant: str) -> list[tuple[str, str | None]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT status, error FROM export_jobs WHERE tenant_id = %s ORDER BY created_at", (tenant,)
        ).fetchall()


def with_quotas(exports: ExportHarness, **quotas: Any) -> ExportHarness:
    exports.settings = ExportSettings(**quotas)
    return exports


# -- max_active_jobs in the API -----------------------------------------------------------------
def test_active_jobs_at_the_limit_get_429_naming_the_quota_and_retry_after(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    with quota_api(exports, s3_endpoint, monkeypatch, quota_max_active_jobs=2) as api:
        first, second = api.create(**TELEMETRY), api.create(export_type="devices")
        with api.http() as http:
            refused = http.post("/exports", json=TELEMETRY)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "30"
        detail = refused.json()["detail"]
        assert detail["type"] == "quota_exceeded" and detail["quota"] == "max_active_jobs" and detail["limit"] == 2
        assert "max_active_jobs" in detail["msg"] and "2" in detail["msg"]
        assert len(tenant_jobs(exports.database_url, TENANT)) == 2  # nothing was inserted for the refusal

        api.create(OTHER, **TELEMETRY)  # the limit is per tenant
        assert api.run_exports() == [True, True, True]  # both finish: the slots are free again
        assert (
            exports.jobs.get(first["export_id"]).status == exports.jobs.get(second["export_id"]).status == "COMPLETED"
        )
        api.create(**TELEMETRY)
        api.create(**TELEMETRY)
        with api.http() as http:
            assert http.post("/exports", json=TELEMETRY).status_code == 429


def test_ten_concurrent_posts_with_limit_three_create_exactly_three(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    with quota_api(exports, s3_endpoint, monkeypatch, quota_max_active_jobs=3) as api:
        headers = {"Authorization": f"Bearer {api.key()}"}

        async def post_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=f"{api.url}/api/v1", headers=headers, timeout=60) as http:
                return await asyncio.gather(*(http.post("/exports", json=TELEMETRY) for _ in range(10)))

        responses = asyncio.run(post_all())
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] * 3 + [429] * 7, [r.text for r in responses]
    assert [status for status, _ in tenant_jobs(exports.database_url, TENANT)] == ["PENDING"] * 3


def test_repeated_idempotency_key_at_the_limit_returns_its_export(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    with quota_api(exports, s3_endpoint, monkeypatch, quota_max_active_jobs=1) as api, api.http() as http:
        first = http.post("/exports", json=TELEMETRY, headers={"Idempotency-Key": "order-1"})
        assert first.status_code == 202, first.text
        again = http.post("/exports", json=TELEMETRY, headers={"Idempotency-Key": "order-1"})
        assert again.status_code == 202, again.text
        assert again.json()["export_id"] == first.json()["export_id"] and again.json()["launch"] == "idempotent replay"
        assert http.post("/exports", json=TELEMETRY, headers={"Idempotency-Key": "order-2"}).status_code == 429
        assert (
            http.post(
                "/exports", json={**TELEMETRY, "format": "json"}, headers={"Idempotency-Key": "order-1"}
            ).status_code
            == 409
        )
    assert len(tenant_jobs(exports.database_url, TENANT)) == 1


# -- max_rows in the API ------------------------------------------------------------------------
def test_row_limit_above_max_rows_is_422_naming_row_limit(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    with quota_api(exports, s3_endpoint, monkeypatch, quota_max_rows=100) as api, api.http() as http:
        refused = http.post("/exports", json={**TELEMETRY, "row_limit": 101})
        assert refused.status_code == 422, refused.text
        [error] = refused.json()["detail"]
        assert error["loc"] == ["body", "row_limit"] and error["type"] == "quota_exceeded"
        assert error["ctx"] == {"quota": "max_rows", "limit": 100} and "max_rows" in error["msg"]
        schedule = {**TELEMETRY, "row_limit": 101, "name": "too big", "cron": "0 6 * * *"}
        refused_schedule = http.post("/export-schedules", json=schedule)
        assert refused_schedule.status_code == 422 and refused_schedule.json()["detail"][0]["loc"] == [
            "body",
            "row_limit",
        ]
        assert http.post("/exports", json={**TELEMETRY, "row_limit": 100}).status_code == 202
    assert len(tenant_jobs(exports.database_url, TENANT)) == 1


def test_estimate_far_above_max_rows_is_422_advising_row_limit(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(exports.database_url) as conn:
        estimate = exports.catalog.estimate_rows(conn, exports.catalog.validate(tenant_id=TENANT, **TELEMETRY))
    max_rows = estimate // 3
    assert max_rows >= 10, estimate
    with quota_api(exports, s3_endpoint, monkeypatch, quota_max_rows=max_rows) as api, api.http() as http:
        refused = http.post("/exports", json=TELEMETRY)
        assert refused.status_code == 422, refused.text
        [error] = refused.json()["detail"]
        assert error["loc"] == ["body", "row_limit"] and "set row_limit" in error["msg"]
        assert error["ctx"] == {"quota": "max_rows", "limit": max_rows}
        assert http.post("/exports", json={**TELEMETRY, "row_limit": max_rows}).status_code == 202
        assert http.post("/exports", json={"export_type": "devices"}).status_code == 202  # ~20 rows: well under


# -- the export run enforces max_rows and max_bytes, whoever made the job -------------------------
def test_run_over_max_rows_fails_naming_the_quota_and_leaves_no_files(exports: ExportHarness) -> None:
    with_quotas(exports, quota_max_rows=500)
    job = exports.submit(tenant_id=TENANT, options={"part_max_rows": 100}, **TELEMETRY)  # inserted directly
    assert [r.success for r in exports.run_sensor_and_runs()] == [False]
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "FAILED", done
    assert "max_rows" in done.error and "500" in done.error and "row_limit" in done.error
    assert done.manifest is None and done.rows_done <= 500
    assert exports.store.list_keys(f"{TENANT}/{job.id}/") == []


def test_run_with_exactly_max_rows_or_a_row_limit_within_it_completes(exports: ExportHarness) -> None:
    with psycopg.connect(exports.database_url) as conn:
        devices = conn.execute("SELECT count(*) FROM device_registry WHERE tenant_id = %s", (TENANT,)).fetchone()[0]
    with_quotas(exports, quota_max_rows=devices)
    exact = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    limited = exports.submit(tenant_id=TENANT, row_limit=devices, **TELEMETRY)
    assert [r.success for r in exports.run_sensor_and_runs()] == [True, True]
    assert exports.jobs.get(exact.id).row_count == devices
    assert exports.jobs.get(limited.id).row_count == devices


def test_run_over_max_bytes_fails_naming_the_quota_and_leaves_no_files(exports: ExportHarness) -> None:
    with_quotas(exports, quota_max_bytes=20_000)
    job = exports.submit(tenant_id=TENANT, options={"part_max_rows": 100}, **TELEMETRY)
    small = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    assert sorted(r.success for r in exports.run_sensor_and_runs()) == [False, True]
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "FAILED", done
    assert "max_bytes" in done.error and "20000" in done.error
    assert exports.store.list_keys(f"{TENANT}/{job.id}/") == []
    finished = exports.jobs.get(small.id)
    assert finished.status == "COMPLETED" and finished.file_size_bytes <= 20_000


def test_one_big_part_over_max_bytes_fails_too(exports: ExportHarness) -> None:
    with_quotas(exports, quota_max_bytes=5_000)
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format="parquet")  # one part, checked at close
    assert [r.success for r in exports.run_sensor_and_runs()] == [False]
    done = exports.jobs.get(job.id)
    assert done.status == "FAILED" and "max_bytes" in done.error
    assert exports.store.list_keys(f"{TENANT}/{job.id}/") == []


# -- per-tenant overrides -----------------------------------------------------------------------
def test_tenant_override_applies_to_that_tenant_only(exports: ExportHarness) -> None:
    with_quotas(exports, tenant_quotas=json.dumps({TENANT: {"max_rows": 100}}))
    theirs = exports.submit(tenant_id=TENANT, **TELEMETRY)
    others = exports.submit(tenant_id=OTHER, **TELEMETRY)
    runs = {r.export_id: r.success for r in exports.run_sensor_and_runs()}
    assert runs == {str(theirs.id): False, str(others.id): True}
    assert "max_rows" in exports.jobs.get(theirs.id).error
    assert exports.jobs.get(others.id).row_count > 100


def test_tenant_override_of_active_jobs_in_the_api(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = json.dumps({OTHER: {"max_active_jobs": 3}, "tenant-003": {"max_active_jobs": None}})
    with quota_api(exports, s3_endpoint, monkeypatch, quota_max_active_jobs=1, tenant_quotas=overrides) as api:
        api.create(**TELEMETRY)
        with api.http() as http:
            assert http.post("/exports", json=TELEMETRY).status_code == 429
        for _ in range(3):
            api.create(OTHER, **TELEMETRY)
        with api.http(OTHER) as http:
            refused = http.post("/exports", json=TELEMETRY)
            assert refused.status_code == 429 and refused.json()["detail"]["limit"] == 3
        for _ in range(5):  # null in an override: no limit for that tenant
            api.create("tenant-003", export_type="devices")


# -- configuration ------------------------------------------------------------------------------
def test_bad_quota_configuration_fails_naming_the_variable(
    exports: ExportHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"database_url": exports.database_url, "storage_url": exports.storage.url}
    monkeypatch.setenv("PULSE_TENANT_QUOTAS", '{"tenant-a": {"max_rows": 1000,}}')
    with pytest.raises(ValidationError, match="PULSE_TENANT_QUOTAS: not valid JSON"):
        create_app(ApiSettings(**settings))
    monkeypatch.setenv("PULSE_TENANT_QUOTAS", '{"tenant-a": {"max_row": 1000}}')
    with pytest.raises(ValidationError, match=r"PULSE_TENANT_QUOTAS: tenant-a\.max_row"):
        ApiSettings(**settings)
    with pytest.raises(QuotaConfigError, match=r"PULSE_TENANT_QUOTAS: tenant-a\.max_row"):
        ExportSettings().quotas()
    monkeypatch.delenv("PULSE_TENANT_QUOTAS")
    monkeypatch.setenv("PULSE_QUOTA_MAX_BYTES", "10GB")
    with pytest.raises(ValidationError, match="PULSE_QUOTA_MAX_BYTES: must be a whole number"):
        ApiSettings(**settings)
    monkeypatch.setenv("PULSE_QUOTA_MAX_BYTES", "0")
    with pytest.raises(QuotaConfigError, match="PULSE_QUOTA_MAX_BYTES"):
        Quotas.from_env()

    # A run never ignores a quota it cannot read: the job fails with the variable's name.
    monkeypatch.setenv("PULSE_QUOTA_MAX_BYTES", "not-a-number")
    job = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    assert [r.success for r in exports.run_sensor_and_runs()] == [False]
    done = exports.jobs.get(job.id)
    assert done.status == "FAILED" and "PULSE_QUOTA_MAX_BYTES" in done.error and "quota configuration" in done.error


def test_environment_quotas_reach_the_api_and_the_runs_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULSE_QUOTA_MAX_ROWS", "1000")
    monkeypatch.setenv("PULSE_QUOTA_MAX_ACTIVE_JOBS", "")  # empty: no limit
    monkeypatch.setenv("PULSE_TENANT_QUOTAS", json.dumps({"tenant-a": {"max_active_jobs": 3, "max_rows": None}}))
    api = ApiSettings(database_url="postgresql://unused", storage_url="file:///unused").quotas()
    runs = ExportSettings().quotas()
    assert api == runs
    assert api.for_tenant("tenant-a").model_dump() == {"max_active_jobs": 3, "max_rows": None, "max_bytes": None}
    assert api.for_tenant("tenant-b").model_dump() == {"max_active_jobs": None, "max_rows": 1000, "max_bytes": None}
