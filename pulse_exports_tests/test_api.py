"""The product API over real HTTP (uvicorn on loopback) against real PostgreSQL and real S3; runs in process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from pulse_exports.api import create_app
from pulse_exports.api.in_thread import serve_in_thread
from pulse_exports.api.settings import ApiSettings
from pulse_exports.apikeys import ApiKeyStore
from pulse_exports.cli import main as cli_main
from pulse_exports.client import PulseExportsClient, PulseExportsError
from pulse_exports.embedded import free_port
from pulse_exports.local_runs import execute_export_run, tick_export_sensor
from pulse_exports.resources import ExportStorage
from pulse_exports.sensors import STALE_QUEUED_AFTER
from pulse_exports_tests.exports_harness import ExportHarness
from pulse_exports_tests.servers import S3Endpoint

from .test_export_job import read_rows, source_telemetry

TENANT = "tenant-002"
OTHER = "tenant-001"


@dataclass
class LiveApi:
    """The API served on loopback, the export harness behind it, and one API key per tenant."""

    url: str
    settings: ApiSettings
    exports: ExportHarness
    keys: ApiKeyStore
    _secrets: dict[str, str] = field(default_factory=dict)

    def key(self, tenant: str = TENANT) -> str:
        if tenant not in self._secrets:
            self._secrets[tenant] = self.keys.create(tenant, name="test").secret
        return self._secrets[tenant]

    def http(self, tenant: str | None = TENANT) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key(tenant)}"} if tenant else {}
        return httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=30)

    def client(self, tenant: str = TENANT) -> PulseExportsClient:
        return PulseExportsClient(self.url, self.key(tenant))

    def create(self, tenant: str = TENANT, **body: Any) -> dict[str, Any]:
        with self.http(tenant) as http:
            response = http.post("/exports", json=body)
        assert response.status_code == 202, response.text
        return dict(response.json())

    def run_exports(self) -> list[bool]:
        return [r.success for r in self.exports.run_sensor_and_runs()]


def s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: S3Endpoint) -> None:
    """boto3's usual chain, as in production: the API's S3 credentials come from the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoint.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoint.secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", endpoint.region_name)


@contextmanager
def live_api(exports: ExportHarness, **settings: Any) -> Iterator[LiveApi]:
    api_settings = ApiSettings(database_url=exports.database_url, storage_url=exports.storage.url, **settings)
    with serve_in_thread(create_app(api_settings)) as url:
        yield LiveApi(url, api_settings, exports, ApiKeyStore(exports.database_url))


@pytest.fixture
def api(exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveApi]:
    s3_env(monkeypatch, s3_endpoint)
    with live_api(exports, s3_endpoint_url=s3_endpoint.url) as live:
        yield live


def presigned_lifetime(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


def insert_telemetry(database_url: str, tenant: str, rows: int) -> None:
    """More of the tenant's telemetry, so that an export runs long enough to be cancelled mid-way."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO telemetry (time, tenant_id, device_id, site_id, seq, metrics)"
            " SELECT now() - g * interval '1 second', %s, 'dev-bulk-' || (g %% 50), 'site-bulk', 10000000 + g,"
            "        jsonb_build_object('temperature', g %% 100, 'voltage', 3.3)"
            " FROM generate_series(1, %s) AS g",
            (tenant, rows),
        )


# -- create, run, download ----------------------------------------------------------------------
def test_created_export_completes_and_presigned_download_equals_the_tenants_rows(api: LiveApi) -> None:
    created = api.create(export_type="telemetry", format="csv")
    assert created["status"] == "PENDING" and created["launch"] == "sensor"
    assert created["status_url"] == f"{api.url}/api/v1/exports/{created['export_id']}"
    assert created["estimated_rows"] > 0
    assert api.run_exports() == [True]

    with api.http() as http:
        export = http.get(f"/exports/{created['export_id']}").json()
        assert export["status"] == "COMPLETED" and export["parts"] == 1
        assert export["progress"] == {
            "rows_done": export["row_count"],
            "rows_total": export["row_count"],
            "percent": 100,
        }
        assert export["download_url"] == f"{api.url}/api/v1/exports/{created['export_id']}/download"
        assert export["dagster_run_url"] is None  # no Dagster UI configured
        redirect = http.get(export["download_url"])
    assert redirect.status_code == 302 and redirect.headers["cache-control"] == "no-store"
    body = httpx.get(redirect.headers["location"]).content  # a plain client: no API key, no S3 credentials

    job = api.exports.jobs.get(created["export_id"])
    assert hashlib.sha256(body).hexdigest() == job.manifest["parts"][0]["sha256"]
    rows = read_rows(body, "csv", "none")
    expected = source_telemetry(api.exports.database_url, TENANT)
    assert sorted(int(r["seq"]) for r in rows) == sorted(expected)
    for row in rows[:50]:
        assert row["device_id"] == expected[int(row["seq"])]["device_id"]


def test_several_parts_list_presigned_urls_and_part_n_redirects(api: LiveApi) -> None:
    created = api.create(export_type="telemetry", format="ndjson", compression="gzip", options={"part_max_rows": 500})
    assert api.run_exports() == [True]
    with api.http() as http:
        listing = http.get(f"/exports/{created['export_id']}/download")
        assert listing.status_code == 200
        manifest = listing.json()
        assert len(manifest["parts"]) > 2 and [p["index"] for p in manifest["parts"]] == list(
            range(len(manifest["parts"]))
        )
        rows = 0
        for part in manifest["parts"]:
            data = httpx.get(part["url"]).content
            assert hashlib.sha256(data).hexdigest() == part["sha256"] and len(data) == part["bytes"]
            rows += len(read_rows(data, "ndjson", "gzip"))
        assert rows == manifest["row_count"] == len(source_telemetry(api.exports.database_url, TENANT))
        one = http.get(f"/exports/{created['export_id']}/download", params={"part": 1})
        assert one.status_code == 302
        assert hashlib.sha256(httpx.get(one.headers["location"]).content).hexdigest() == manifest["parts"][1]["sha256"]
        assert http.get(f"/exports/{created['export_id']}/download", params={"part": 999}).status_code == 404


def test_presigned_urls_never_outlive_the_export(api: LiveApi) -> None:
    created = api.create(export_type="devices", format="csv", expires_in=120)
    assert api.run_exports() == [True]
    job = api.exports.jobs.get(created["export_id"])
    assert 119 <= (job.expires_at - job.completed_at).total_seconds() <= 121  # expires_in, not the default week
    with api.http() as http:
        redirect = http.get(f"/exports/{created['export_id']}/download")
        assert 1 <= presigned_lifetime(redirect.headers["location"]) <= 120
        manifest = http.get(f"/exports/{created['export_id']}/download", params={"manifest": "true"}).json()
    assert all(presigned_lifetime(p["url"]) <= 120 for p in manifest["parts"])


def test_download_is_409_until_completed_and_410_once_expired(api: LiveApi) -> None:
    created = api.create(export_type="alerts", format="json")
    with api.http() as http:
        early = http.get(f"/exports/{created['export_id']}/download")
        assert early.status_code == 409 and "PENDING" in early.json()["detail"]
        assert api.run_exports() == [True]
        assert http.get(f"/exports/{created['export_id']}/download").status_code == 302
        with psycopg.connect(api.exports.database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE export_jobs SET expires_at = now() - interval '1 second' WHERE id = %s",
                (created["export_id"],),
            )
        assert http.get(f"/exports/{created['export_id']}/download").status_code == 410  # past expiry, not yet purged
        assert api.exports.run_purge().success
        assert http.get(f"/exports/{created['export_id']}").json()["status"] == "EXPIRED"
        assert http.get(f"/exports/{created['export_id']}/download").status_code == 410


def test_file_storage_download_streams_the_file_through_the_api(
    seeded_database_url: str, tmp_path: Path, exports: ExportHarness
) -> None:
    local = ExportHarness(seeded_database_url, ExportStorage(url=(tmp_path / "exports").as_uri()), exports.instance)
    with live_api(local) as live:
        created = live.create(export_type="alerts", format="csv", options={"part_max_rows": 10})
        assert live.run_exports() == [True]
        with live.http() as http:
            manifest = http.get(f"/exports/{created['export_id']}/download").json()
            assert len(manifest["parts"]) > 1 and manifest["urls_expire_at"] is None
            for part in manifest["parts"]:
                assert part["url"] == f"{live.url}/api/v1/exports/{created['export_id']}/download?part={part['index']}"
                response = http.get(part["url"])
                assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
                assert hashlib.sha256(response.content).hexdigest() == part["sha256"]
            assert httpx.get(manifest["parts"][0]["url"]).status_code == 401  # the file needs the API key too
        with live.client() as client:
            downloaded = client.download(created["export_id"], tmp_path / "dl")
    assert [p.name for p in downloaded] == [p["file"] for p in manifest["parts"]]


# -- idempotency --------------------------------------------------------------------------------
def test_twenty_concurrent_posts_with_one_idempotency_key_make_one_job_and_one_run(api: LiveApi) -> None:
    headers = {"Authorization": f"Bearer {api.key()}", "Idempotency-Key": "order-42"}
    body = {"export_type": "devices", "format": "csv"}

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"{api.url}/api/v1", headers=headers, timeout=30) as http:
            return await asyncio.gather(*(http.post("/exports", json=body) for _ in range(20)))

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [202] * 20
    assert len({r.json()["export_id"] for r in responses}) == 1
    assert sorted(r.json()["launch"] for r in responses) == ["idempotent replay"] * 19 + ["sensor"]
    with psycopg.connect(api.exports.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM export_jobs").fetchone() == (1,)
    assert api.run_exports() == [True]
    assert api.run_exports() == []  # no second run, then or later

    with api.http() as http:  # the same key for a different request is a conflict, not a silent replay
        conflict = http.post("/exports", json={**body, "format": "json"}, headers={"Idempotency-Key": "order-42"})
        assert conflict.status_code == 409
        other = http.post("/exports", json=body, headers={"Idempotency-Key": "order-43"})
        assert other.status_code == 202 and other.json()["export_id"] != responses[0].json()["export_id"]
    with api.http(OTHER) as http:  # keys are per tenant
        theirs = http.post("/exports", json=body, headers={"Idempotency-Key": "order-42"})
        assert theirs.status_code == 202 and theirs.json()["launch"] == "sensor"


# -- who may do what ----------------------------------------------------------------------------
def test_other_tenants_key_gets_404_on_status_download_and_delete(api: LiveApi) -> None:
    created = api.create(export_type="devices", format="csv")
    assert api.run_exports() == [True]
    export_id = created["export_id"]
    with api.http(OTHER) as http:
        assert http.get(f"/exports/{export_id}").status_code == 404
        assert http.get(f"/exports/{export_id}/download").status_code == 404
        assert http.delete(f"/exports/{export_id}").status_code == 404
        assert http.get("/exports").json()["items"] == []
        for unknown in (str(uuid.uuid4()), "not-a-uuid", "1 OR 1=1"):
            assert http.get(f"/exports/{unknown}").status_code == 404
    with api.http() as http:
        assert http.get(f"/exports/{export_id}").json()["status"] == "COMPLETED"  # untouched by the attempts


def test_missing_unknown_or_revoked_key_is_401(api: LiveApi) -> None:
    with api.http(tenant=None) as http:
        missing = http.get("/exports")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert http.get("/exports", headers={"Authorization": "Bearer pex_00000000_nope"}).status_code == 401
        assert http.get("/exports", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401
        assert http.post("/exports", json={"export_type": "devices"}).status_code == 401
    new = api.keys.create(TENANT, name="short-lived")
    with httpx.Client(base_url=f"{api.url}/api/v1", headers={"Authorization": f"Bearer {new.secret}"}) as http:
        assert http.get("/exports").status_code == 200
        assert api.keys.revoke(new.key.prefix) is not None
        assert http.get("/exports").status_code == 401
    with psycopg.connect(api.exports.database_url) as conn:  # only the hash is stored
        stored = conn.execute("SELECT key_hash, prefix FROM api_keys WHERE id = %s", (new.key.id,)).fetchone()
    assert stored == (hashlib.sha256(new.secret.encode()).hexdigest(), new.secret[:12]) and new.secret not in stored


INVALID_REQUESTS: list[tuple[dict[str, Any], list[Any]]] = [
    ({"export_type": "nope"}, ["body", "export_type"]),
    ({"export_type": "devices", "columns": ["device_id", "secret"]}, ["body", "columns", 1]),
    ({"export_type": "telemetry", "filters": {"time_range": "1y"}}, ["body", "filters", "time_range"]),
    ({"export_type": "telemetry", "filters": {"device_ids": ["ok", 7]}}, ["body", "filters", "device_ids", 1]),
    ({"export_type": "devices", "format": "xlsx"}, ["body", "format"]),
    ({"export_type": "devices", "expires_in": 5}, ["body", "expires_in"]),
    ({"export_type": "devices", "options": {"part_max_rows": 0}}, ["body", "options", "part_max_rows"]),
    ({"export_type": "devices", "row_limit": 0}, ["body", "row_limit"]),
    ({"export_type": "devices", "tenant_id": OTHER}, ["body", "tenant_id"]),
    ({"export_type": "devices", "callback_url": "http://127.0.0.1:9/hook"}, ["body", "callback_url"]),
    ({"format": "csv"}, ["body", "export_type"]),
]


def test_invalid_requests_are_422_naming_the_field(api: LiveApi) -> None:
    with api.http() as http:
        for body, loc in INVALID_REQUESTS:
            response = http.post("/exports", json=body)
            assert response.status_code == 422, (body, response.text)
            detail = response.json()["detail"]
            assert [e["loc"] for e in detail] == [loc], body
            assert detail[0]["msg"]
    with psycopg.connect(api.exports.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM export_jobs").fetchone() == (0,)


def test_listing_is_newest_first_with_cursor_pages_and_filters(api: LiveApi) -> None:
    made = [api.create(export_type=t, format="csv")["export_id"] for t in ("devices", "alerts", "devices", "alerts")]
    api.create(OTHER, export_type="devices", format="csv")
    with api.http() as http:
        first = http.get("/exports", params={"limit": 3}).json()
        second = http.get("/exports", params={"limit": 3, "cursor": first["next_cursor"]}).json()
        assert [e["id"] for e in first["items"] + second["items"]] == made[::-1]
        assert second["next_cursor"] is None
        devices = http.get("/exports", params={"type": "devices"}).json()["items"]
        assert [e["id"] for e in devices] == [made[2], made[0]]
        for export_id in (made[0], made[3]):
            assert http.delete(f"/exports/{export_id}").status_code == 200
        ended = http.get("/exports", params=[("status", "CANCELLED"), ("status", "FAILED")]).json()["items"]
        assert [e["id"] for e in ended] == [made[3], made[0]]
        pending = http.get("/exports", params={"status": "PENDING", "type": "devices"}).json()["items"]
        assert [e["id"] for e in pending] == [made[2]]
        assert http.get("/exports", params={"status": "DONE"}).status_code == 422
        assert http.get("/exports", params={"type": "nope"}).json()["items"] == []
        nul = http.get("/exports", params={"type": "devices\x00"})  # found by the fuzz test: was a 500
        assert nul.status_code == 422 and nul.json()["detail"][0]["loc"] == ["query", "type", 0]
        bad = http.get("/exports", params={"cursor": "bm9wZQ"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "cursor"]


# -- cancel -------------------------------------------------------------------------------------
def test_delete_of_a_running_export_cancels_it_stops_the_run_and_leaves_no_files(api: LiveApi) -> None:
    insert_telemetry(api.exports.database_url, TENANT, 300_000)
    created = api.create(export_type="telemetry", format="csv", options={"part_max_rows": 1000})
    export_id = created["export_id"]
    (request,) = tick_export_sensor(api.exports.defs, api.exports.instance)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(execute_export_run, api.exports.defs, api.exports.instance, request)
        with api.http() as http:
            deadline = time.monotonic() + 60
            while True:
                export = http.get(f"/exports/{export_id}").json()
                if export["status"] == "RUNNING" and export["progress"]["rows_done"] >= 2000:
                    break
                assert export["status"] in ("QUEUED", "RUNNING") and time.monotonic() < deadline, export
                time.sleep(0.02)
            assert api.exports.store.list_keys(f"{TENANT}/{export_id}/")  # parts were being written
            cancelled = http.delete(f"/exports/{export_id}")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
            outcome = run.result(timeout=60)
            assert not outcome.success  # the run stopped at its next progress report
            export = http.get(f"/exports/{export_id}").json()
    assert export["status"] == "CANCELLED" and export["row_count"] is None and export["download_url"] is None
    assert export["progress"]["rows_done"] < 300_000
    assert api.exports.store.list_keys(f"{TENANT}/{export_id}/") == []
    assert api.exports.store.abort_multipart_uploads(f"{TENANT}/{export_id}/") == 0


def test_delete_cancels_pending_exports_and_refuses_finished_ones(api: LiveApi) -> None:
    pending = api.create(export_type="devices", format="csv")["export_id"]
    with api.http() as http:
        first = http.delete(f"/exports/{pending}")
        assert first.status_code == 200 and first.json()["status"] == "CANCELLED"
        assert http.delete(f"/exports/{pending}").status_code == 200  # idempotent
        assert api.run_exports() == []  # the sensor no longer sees it
        done = api.create(export_type="alerts", format="csv")["export_id"]
        assert api.run_exports() == [True]
        refused = http.delete(f"/exports/{done}")
        assert refused.status_code == 409 and "COMPLETED" in refused.json()["detail"]
        assert http.get(f"/exports/{done}/download").status_code == 302  # its files are still there


# -- catalog, health, launching -----------------------------------------------------------------
def test_export_types_list_the_catalog(api: LiveApi) -> None:
    with api.http() as http:
        types = {t["name"]: t for t in http.get("/export-types").json()}
    assert set(types) == {"devices", "alerts", "telemetry"}
    assert "time_range" in types["telemetry"]["filters"] and "parquet" in types["telemetry"]["formats"]
    assert types["devices"]["columns"][0] == "device_id"


def test_health_reports_database_storage_and_dagster(api: LiveApi) -> None:
    health = httpx.get(f"{api.url}/api/v1/health")
    assert health.status_code == 200
    assert health.json()["database"]["ok"] and health.json()["storage"]["ok"]
    assert health.json()["dagster"]["ok"] is None
    with live_api(api.exports, dagster_graphql_url=f"http://127.0.0.1:{free_port()}/graphql") as down:
        health = httpx.get(f"{down.url}/api/v1/health")
    assert health.status_code == 503 and health.json()["dagster"]["ok"] is False


def test_unreachable_dagster_leaves_the_export_to_the_sensor(api: LiveApi) -> None:
    with live_api(
        api.exports,
        s3_endpoint_url=api.settings.s3_endpoint_url,
        dagster_graphql_url=f"http://127.0.0.1:{free_port()}/graphql",
    ) as down:
        created = down.create(export_type="devices", format="csv")
        assert created["launch"] == "deferred to sensor" and created["launch_error"] == "Dagster is unreachable"
        assert created["status"] == "PENDING" and created["run_id"] is None
        assert down.run_exports() == [True]
        with down.client() as client:
            assert client.wait(created["export_id"], timeout=10).status.value == "COMPLETED"


@contextmanager
def refusing_graphql(on_request: Callable[[], None]) -> Iterator[str]:
    """A stand-in for the webserver's /graphql that calls ``on_request`` and then refuses every mutation
    (``LaunchRefused``), as a webserver would for a job its code location no longer has."""

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            on_request()
            body = json.dumps(
                {
                    "data": {
                        "launchRun": {"__typename": "PythonError", "message": "refused"},
                        "addDynamicPartition": {"__typename": "PythonError", "message": "refused"},
                    }
                }
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/graphql"
    finally:
        server.shutdown()
        server.server_close()


def test_a_job_being_launched_is_left_alone_by_the_sensor_and_returned_to_it_when_refused(api: LiveApi) -> None:
    jobs = api.exports.jobs
    during: list[tuple[str, str | None, bool]] = []  # (status, run_id, picked by the sensor's query)

    def look() -> None:
        with psycopg.connect(api.exports.database_url) as conn:
            newest = conn.execute(
                "SELECT id, status, run_id FROM export_jobs WHERE tenant_id = %s ORDER BY created_at DESC LIMIT 1",
                (TENANT,),
            ).fetchone()
        assert newest is not None
        pending = {j.id for j in jobs.pending(100, stale_queued_after=STALE_QUEUED_AFTER)}  # the sensor's query
        during.append((newest[1], newest[2], newest[0] in pending))

    with (
        psycopg.connect(api.exports.database_url, autocommit=True) as listener,  # as pulse-exports daemon
        refusing_graphql(look) as graphql,
        live_api(api.exports, s3_endpoint_url=api.settings.s3_endpoint_url, dagster_graphql_url=graphql) as refused,
    ):
        listener.execute("LISTEN pulse_export_jobs")
        created = refused.create(export_type="devices", format="csv")
        woken = len(list(listener.notifies(timeout=0.5)))
    assert during and set(during) == {("QUEUED", None, False)}  # no second run requested while launching
    assert woken == 1  # created QUEUED (no wake-up), then handed back to the sensor (one)
    assert created["launch"] == "deferred to sensor" and created["launch_error"] == "Dagster refused the launch"
    job = jobs.get(created["export_id"])
    assert job is not None and (job.status, job.run_id, job.queued_at) == ("PENDING", None, None)
    assert job.id in {j.id for j in jobs.pending(100)}
    assert refused.run_exports() == [True]
    done = jobs.get(created["export_id"])
    assert done is not None and done.status == "COMPLETED"


def test_dagster_ui_link_points_at_the_run(api: LiveApi) -> None:
    with live_api(
        api.exports, s3_endpoint_url=api.settings.s3_endpoint_url, dagster_ui_url="http://dagster.internal:3000/"
    ) as ui:
        created = ui.create(export_type="devices", format="csv")
        assert ui.run_exports() == [True]
        with ui.client() as client:
            export = client.get(created["export_id"])
    assert export.run_id and export.dagster_run_url == f"http://dagster.internal:3000/runs/{export.run_id}"


def test_launcher_graphql_documents_match_dagsters_schema() -> None:
    """The mutations and queries sent over plain HTTP, checked against the installed dagster-graphql schema."""
    from dagster_graphql.schema import create_schema
    from graphql import parse, validate

    from pulse_exports import launcher

    schema = create_schema().graphql_schema
    for document in (launcher._ADD_PARTITION, launcher._LAUNCH_RUN, launcher._TERMINATE_RUN, launcher._RUN_STATUS):
        assert validate(schema, parse(document)) == []


# -- the client and the CLI ---------------------------------------------------------------------
def test_client_creates_waits_downloads_and_cancels(api: LiveApi, tmp_path: Path) -> None:
    with api.client() as client:
        created = client.create("telemetry", format="csv", compression="gzip", options={"part_max_rows": 700})
        assert api.run_exports() == [True]
        done = client.wait(created.export_id, timeout=10, interval=0.1)
        assert done.status.value == "COMPLETED" and done.parts and done.parts > 1
        files = client.download(created.export_id, tmp_path / "dl")
        rows = sum(len(read_rows(f.read_bytes(), "csv", "gzip")) for f in files)
        assert rows == done.row_count
        page = client.list(limit=10)
        assert [e.id for e in page.items] == [created.export_id]
        pending = client.create("devices")
        assert client.cancel(pending.export_id).status.value == "CANCELLED"
        with pytest.raises(PulseExportsError) as error:
            client.create("nope")
        assert error.value.status_code == 422 and error.value.detail[0]["loc"] == ["body", "export_type"]
        assert {t.name for t in client.export_types()} >= {"devices"}


def test_cli_makes_and_revokes_keys_and_goes_through_the_api(api: LiveApi, tmp_path: Path) -> None:
    db_env = {"PULSE_DATABASE_URL": api.exports.database_url}
    made = CliRunner().invoke(cli_main, ["api-key", "create", "--tenant", TENANT, "--name", "ci"], env=db_env)
    assert made.exit_code == 0, made.output
    key = json.loads(made.stdout)
    assert key["secret"].startswith(key["prefix"] + "_") and key["tenant_id"] == TENANT

    env = {"PULSE_API_URL": api.url, "PULSE_API_KEY": key["secret"], "PULSE_DATABASE_URL": ""}
    submitted = CliRunner().invoke(cli_main, ["submit", "--type", "alerts", "--format", "csv"], env=env)
    assert submitted.exit_code == 0, submitted.output
    export_id = json.loads(submitted.output)["export_id"]
    assert api.run_exports() == [True]
    status = CliRunner().invoke(cli_main, ["status", export_id], env=env)
    assert status.exit_code == 0 and json.loads(status.output)["status"] == "COMPLETED"
    downloaded = CliRunner().invoke(cli_main, ["download", export_id, "--out", str(tmp_path / "dl")], env=env)
    assert downloaded.exit_code == 0 and "sha256 ok" in downloaded.output
    assert (tmp_path / "dl" / "part-00000.csv").read_bytes().startswith(b"id,device_id")

    revoked = CliRunner().invoke(cli_main, ["api-key", "revoke", key["prefix"]], env=db_env)
    assert revoked.exit_code == 0 and key["id"] in revoked.output
    refused = CliRunner().invoke(cli_main, ["status", export_id], env=env)
    assert refused.exit_code == 1 and "401" in refused.output
    again = CliRunner().invoke(cli_main, ["api-key", "revoke", key["prefix"]], env=db_env)
    assert again.exit_code == 1


# -- fuzzing ------------------------------------------------------------------------------------
# The OpenAPI document does not depend on configuration: take it from an app that is never served.
# (Not schemathesis.pytest.from_fixture: its lazy loader sets Function._nodeid, gone in pytest 9.)
_OPENAPI = create_app(ApiSettings(database_url="postgresql://unused", storage_url="file:///unused")).openapi()
fuzzed = schemathesis.openapi.from_dict(_OPENAPI)


@fuzzed.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_fuzzed_requests_never_get_a_server_error(case: Any, api: LiveApi) -> None:
    case.call_and_validate(
        base_url=api.url, headers={"Authorization": f"Bearer {api.key()}"}, checks=[not_a_server_error]
    )


# -- the load script ----------------------------------------------------------------------------
def test_api_load_script_runs_and_reports_percentiles(pg_server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A one-second smoke of bench/api_load.py so it cannot rot; its figures are not judged here."""
    from bench.api_load import main as api_load

    args = ["--database-url", pg_server_url, "--clients", "4", "--seconds", "1", "--warmup-seconds", "0"]
    assert api_load([*args, "--workers", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] > 0 and result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
