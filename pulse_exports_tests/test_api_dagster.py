"""The API launching and terminating runs through a real dagster-webserver, with a real daemon running them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pulse_exports.apikeys import ApiKeyStore
from pulse_exports.client import PulseExportsClient
from pulse_exports.storage import ExportStore, store_from_url
from pulse_exports_tests.dagster_processes import ApiProcess, DagsterServices, wait_for
from pulse_exports_tests.servers import S3Endpoint

from .test_api import insert_telemetry
from .test_export_job import read_rows, source_telemetry

pytestmark = pytest.mark.slow

# export_jobs_sensor runs here, as in production, woken by every new PENDING job: the API inserts its job
# QUEUED and launches it, so no tick requests a second run for it ("one run per export" below holds with the
# sensor running).


@pytest.fixture
def api_key(dagster_services: DagsterServices) -> str:
    return ApiKeyStore(dagster_services.database_url).create("tenant-002", name="dagster test").secret


@pytest.fixture
def client(api_process: ApiProcess, api_key: str) -> Iterator[PulseExportsClient]:
    with PulseExportsClient(api_process.url, api_key) as api_client:
        yield api_client


@pytest.fixture
def http(api_process: ApiProcess, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{api_process.url}/api/v1", headers={"Authorization": f"Bearer {api_key}"}) as client:
        yield client


@pytest.fixture
def store(dagster_services: DagsterServices, s3_endpoint: S3Endpoint) -> ExportStore:
    return store_from_url(
        dagster_services.storage_url,
        endpoint_url=s3_endpoint.url,
        access_key_id=s3_endpoint.access_key_id,
        secret_access_key=s3_endpoint.secret_access_key,
        region_name=s3_endpoint.region_name,
    )


def post_concurrently(http: httpx.Client, body: dict[str, Any], key: str, count: int) -> list[httpx.Response]:
    headers = {**http.headers, "Idempotency-Key": key}

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=http.base_url, headers=headers, timeout=60) as concurrent:
            return await asyncio.gather(*(concurrent.post("/exports", json=body) for _ in range(count)))

    return asyncio.run(post_all())


def test_post_launches_one_run_through_graphql_that_the_daemon_runs_to_a_download(
    client: PulseExportsClient, http: httpx.Client, dagster_services: DagsterServices
) -> None:
    health = http.get("/health").json()
    assert health["dagster"]["ok"] is True and health["dagster"]["detail"].startswith("dagster ")

    started = time.monotonic()
    responses = post_concurrently(http, {"export_type": "telemetry", "format": "csv"}, "graphql-order-1", 20)
    assert [r.status_code for r in responses] == [202] * 20
    answers = [r.json() for r in responses]
    assert len({a["export_id"] for a in answers}) == 1
    launched = [a for a in answers if a["launch"] == "launched"]
    assert len(launched) == 1 and launched[0]["status"] == "QUEUED" and launched[0]["run_id"]
    assert sorted(a["launch"] for a in answers if a is not launched[0]) == ["idempotent replay"] * 19
    export_id, run_id = launched[0]["export_id"], launched[0]["run_id"]

    done = client.wait(export_id, timeout=120, interval=0.5)
    assert done.status.value == "COMPLETED", done.error
    print(f"POST to COMPLETED through GraphQL and the daemon: {time.monotonic() - started:.1f}s")
    assert done.run_id == run_id and done.dagster_run_url == f"{dagster_services.ui_url}/runs/{run_id}"

    def run_finished() -> dict[str, Any] | None:  # the export is COMPLETED a moment before its run ends
        (run,) = dagster_services.runs_for_export(export_id)  # one run for twenty requests
        return run if run["status"] not in ("QUEUED", "NOT_STARTED", "STARTING", "STARTED") else None

    run = wait_for("the run to end", run_finished, dagster_services.processes, 30)
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert run["runId"] == run_id and run["status"] == "SUCCESS"
    assert tags["dagster/partition"] == export_id and tags["pulse/tenant"] == "tenant-002"
    assert "dagster/sensor_name" not in tags  # launched by the API, not by the sensor

    redirect = http.get(f"/exports/{export_id}/download")
    assert redirect.status_code == 302
    rows = read_rows(httpx.get(redirect.headers["location"]).content, "csv", "none")
    assert sorted(int(r["seq"]) for r in rows) == sorted(source_telemetry(dagster_services.database_url, "tenant-002"))


def test_delete_of_a_running_export_terminates_its_run_and_leaves_no_files(
    client: PulseExportsClient, dagster_services: DagsterServices, store: ExportStore
) -> None:
    insert_telemetry(dagster_services.database_url, "tenant-002", 400_000)
    created = client.create("telemetry", format="csv", options={"part_max_rows": 1000})
    assert created.launch == "launched"
    prefix = f"tenant-002/{created.export_id}/"

    def running_with_parts() -> bool:
        export = client.get(created.export_id)
        assert export.status.value in ("QUEUED", "RUNNING"), export
        return export.status.value == "RUNNING" and export.progress.rows_done >= 3000

    wait_for("the export to be RUNNING with parts written", running_with_parts, dagster_services.processes, 120, 0.05)
    assert store.list_keys(prefix)
    cancelled = client.cancel(created.export_id)
    assert cancelled.status.value == "CANCELLED"

    def run_ended() -> str | None:
        (run,) = dagster_services.runs_for_export(str(created.export_id))
        return run["status"] if run["status"] in ("CANCELED", "FAILURE", "SUCCESS") else None

    assert wait_for("the run to end", run_ended, dagster_services.processes, 60) == "CANCELED"
    export = client.get(created.export_id)
    assert export.status.value == "CANCELLED" and export.progress.rows_done < 400_000
    assert wait_for("the files to be gone", lambda: store.list_keys(prefix) == [], dagster_services.processes, 10)
    assert store.abort_multipart_uploads(prefix) == 0
