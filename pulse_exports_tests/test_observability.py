"""Observability: /metrics against real export_jobs rows, JSON logs of the API and of export runs, run metadata."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import httpx
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pulse_exports.apikeys import ApiKeyStore
from pulse_exports.logs import formatter, log_context
from pulse_exports_tests.dagster_processes import ServiceProcess, post_export, wait_for
from pulse_exports_tests.export_fixtures import s3_storage
from pulse_exports_tests.exports_harness import ExportHarness
from pulse_exports_tests.servers import S3Endpoint, _free_ports
from pulse_exports_tests.test_api import LiveApi, live_api, s3_env

REPO = Path(__file__).resolve().parents[1]
TENANT = "tenant-002"
OTHER = "tenant-001"


def scrape(url: str, token: str | None = None) -> dict[str, list[Sample]]:
    """GET /metrics, parsed by prometheus_client's own parser: samples by metric family name."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def values(samples: list[Sample], name: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label pairs: value} of the samples named ``name`` (default: all)."""
    return {tuple(sorted(s.labels.items())): s.value for s in samples if name is None or s.name == name}


def set_state(database_url: str, export_id: uuid.UUID, assignments: str) -> None:
    """Put a job in a state as the pipeline would leave it (``assignments`` is a fixed SQL SET list)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE export_jobs SET {assignments} WHERE id = %s", (export_id,))  # noqa: S608 - test literals


def db_rows(database_url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture
def api(exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveApi]:
    s3_env(monkeypatch, s3_endpoint)
    with live_api(exports, s3_endpoint_url=s3_endpoint.url) as live:
        yield live


# --- /metrics ----------------------------------------------------------------------------------------


def test_metrics_report_export_jobs_by_status_queue_age_rows_bytes_and_durations(api: LiveApi) -> None:
    exports = api.exports
    created = api.create(export_type="devices", format="csv")  # a real export, run end to end
    assert api.run_exports() == [True]
    completed = exports.jobs.get(created["export_id"])
    assert completed is not None and completed.status == "COMPLETED" and completed.row_count

    def alerts_job() -> uuid.UUID:
        return exports.submit(tenant_id=TENANT, export_type="alerts", format="csv").id

    url = exports.database_url
    set_state(url, alerts_job(), "created_at = now() - interval '2 hours'")  # stays PENDING
    set_state(url, alerts_job(), "status = 'QUEUED', queued_at = now(), created_at = now() - interval '10 minutes'")
    set_state(
        url,
        alerts_job(),
        "status = 'RUNNING', started_at = now() - interval '5 minutes', heartbeat_at = now() - interval '90 seconds'",
    )
    # Exactly 60 s: counted in the le="60.0" bucket, not below it.
    set_state(
        url,
        alerts_job(),
        "status = 'COMPLETED', row_count = 40, file_size_bytes = 4000, completed_at = now(),"
        " started_at = now() - interval '60 seconds', callback_status = 'delivered'",
    )
    set_state(
        url,
        alerts_job(),
        "status = 'EXPIRED', row_count = 2, file_size_bytes = 200, completed_at = now() - interval '1 day',"
        " started_at = now() - interval '1 day 10 seconds'",
    )
    set_state(url, alerts_job(), "status = 'FAILED', error = 'x', completed_at = now(), callback_status = 'failed'")
    set_state(url, alerts_job(), "status = 'CANCELLED', completed_at = now()")

    metrics = scrape(api.url)

    assert values(metrics["pulse_exports_jobstore_up"]) == {(): 1.0}
    in_db = {
        (("export_type", t), ("status", s)): float(n)
        for s, t, n in db_rows(url, "SELECT status, export_type, count(*) FROM export_jobs GROUP BY 1, 2")
    }
    jobs = values(metrics["pulse_exports_jobs"])
    assert {k: v for k, v in jobs.items() if v} == in_db
    assert len(jobs) == 2 * 7  # every status of both types, zeros included
    assert jobs[(("export_type", "alerts"), ("status", "PENDING"))] == 1

    ages = values(metrics["pulse_exports_queue_oldest_age_seconds"])
    assert 7200 <= ages[(("status", "PENDING"),)] < 7200 + 600
    assert 600 <= ages[(("status", "QUEUED"),)] < 600 + 600
    assert 90 <= values(metrics["pulse_exports_running_oldest_heartbeat_age_seconds"])[()] < 90 + 600

    rows = values(metrics["pulse_exports_exported_rows"], "pulse_exports_exported_rows_total")
    size = values(metrics["pulse_exports_exported_bytes"], "pulse_exports_exported_bytes_total")
    assert rows == {(("export_type", "alerts"),): 42.0, (("export_type", "devices"),): float(completed.row_count)}
    assert size == {
        (("export_type", "alerts"),): 4200.0,
        (("export_type", "devices"),): float(completed.file_size_bytes),
    }

    assert values(metrics["pulse_exports_callbacks"]) == {
        (("status", "delivered"),): 1.0,
        (("status", "failed"),): 1.0,
        (("status", "pending"),): 0.0,
    }

    durations = metrics["pulse_exports_export_duration_seconds"]
    buckets = {
        s.labels["le"]: s.value for s in durations if s.name.endswith("_bucket") and s.labels["export_type"] == "alerts"
    }
    assert (buckets["5.0"], buckets["15.0"], buckets["30.0"], buckets["60.0"], buckets["+Inf"]) == (0, 1, 1, 2, 2)
    count = values(durations, "pulse_exports_export_duration_seconds_count")
    total = values(durations, "pulse_exports_export_duration_seconds_sum")
    assert count == {(("export_type", "alerts"),): 2.0, (("export_type", "devices"),): 1.0}
    assert total[(("export_type", "alerts"),)] == pytest.approx(70, abs=0.01)
    assert completed.started_at and completed.completed_at
    real = (completed.completed_at - completed.started_at).total_seconds()
    assert total[(("export_type", "devices"),)] == pytest.approx(real, abs=0.01)

    # No tenant label by default: one series per tenant is opt-in.
    assert not any("tenant" in s.labels for samples in metrics.values() for s in samples)


def test_metrics_are_labelled_by_tenant_only_when_asked(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_env(monkeypatch, s3_endpoint)
    for tenant in (TENANT, TENANT, OTHER):
        exports.submit(tenant_id=tenant, export_type="devices", format="csv")
    with live_api(exports, s3_endpoint_url=s3_endpoint.url, metrics_tenant_labels=True) as live:
        jobs = values(scrape(live.url)["pulse_exports_jobs"])
    pending = {k: v for k, v in jobs.items() if ("status", "PENDING") in k}
    assert pending == {
        (("export_type", "devices"), ("status", "PENDING"), ("tenant", OTHER)): 1.0,
        (("export_type", "devices"), ("status", "PENDING"), ("tenant", TENANT)): 2.0,
    }


def test_metrics_need_the_metrics_token_when_one_is_set_and_stay_out_of_the_openapi_schema(
    exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_env(monkeypatch, s3_endpoint)
    token = "scrape-" + uuid.uuid4().hex
    with live_api(exports, s3_endpoint_url=s3_endpoint.url, metrics_token=token) as live:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {live.key()}"}):
            refused = httpx.get(f"{live.url}/metrics", headers=headers, timeout=30)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"] == "Bearer"
            assert token not in refused.text
        assert "pulse_exports_jobs" in scrape(live.url, token)
        openmetrics = httpx.get(
            f"{live.url}/metrics",
            headers={"Authorization": f"Bearer {token}", "Accept": "application/openmetrics-text; version=1.0.0"},
            timeout=30,
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.rstrip().endswith("# EOF")
        schema = httpx.get(f"{live.url}/openapi.json", timeout=30).json()
    assert "/metrics" not in schema["paths"]


# --- logs --------------------------------------------------------------------------------------------


@contextmanager
def json_log_lines() -> Iterator[list[dict[str, Any]]]:
    """Every INFO+ record of the process rendered by pulse_exports.logs as JSON, parsed, while the block runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("json"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        lines.extend(json.loads(line) for line in stream.getvalue().splitlines())


def test_api_logs_a_json_line_per_request_with_its_tenant_and_export_id(api: LiveApi) -> None:
    secret = api.key(TENANT)
    unknown = str(uuid.uuid4())
    with json_log_lines() as lines:
        created = api.create(export_type="devices", format="csv")
        with api.http() as http:
            assert http.get(f"/exports/{created['export_id']}").status_code == 200
            assert http.get(f"/exports/{unknown}").status_code == 404
        with api.http(None) as anonymous:
            assert anonymous.get("/exports").status_code == 401
    access = [line for line in lines if line["logger"] == "pulse_exports.api.access"]
    by_request = {(line["method"], line["path"]): line for line in access}
    export_id = created["export_id"]

    post = by_request[("POST", "/api/v1/exports")]
    assert (post["status"], post["tenant"], post["export_id"], post["level"]) == (202, TENANT, export_id, "info")
    assert post["message"] == "POST /api/v1/exports 202" and post["duration_ms"] >= 0 and post["timestamp"]
    get = by_request[("GET", f"/api/v1/exports/{export_id}")]
    assert (get["status"], get["tenant"], get["export_id"]) == (200, TENANT, export_id)
    missing = by_request[("GET", f"/api/v1/exports/{unknown}")]
    assert (missing["status"], missing["tenant"]) == (404, TENANT) and "export_id" not in missing
    anonymous_line = by_request[("GET", "/api/v1/exports")]
    assert anonymous_line["status"] == 401 and "tenant" not in anonymous_line

    everything = json.dumps(lines)
    assert secret not in everything and "Bearer" not in everything


def test_log_lines_redact_credentials_and_render_as_text_on_request() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("pulse_exports.test_observability")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with log_context(export_id="e-1", tenant="tenant-9"):
            handler.setFormatter(formatter("json"))
            logger.info("source at postgresql://pulse:hunter2@db:5432/pulse failed")
            handler.setFormatter(formatter("text"))
            logger.info("as text")
    finally:
        logger.removeHandler(handler)
    as_json, as_text = stream.getvalue().splitlines()
    record = json.loads(as_json)
    assert record["message"] == "source at postgresql://pulse:***@db:5432/pulse failed"
    assert (record["export_id"], record["tenant"]) == ("e-1", "tenant-9")
    assert "hunter2" not in stream.getvalue()
    assert "as text" in as_text and "export_id=e-1" in as_text and "tenant=tenant-9" in as_text
    with pytest.raises(ValueError, match="PULSE_LOG_FORMAT"):
        formatter("xml")


def test_serve_writes_json_log_lines_to_stderr(seeded_database_url: str, tmp_path: Path) -> None:
    """`pulse-exports serve` as operators run it: PULSE_LOG_FORMAT=json, every line one JSON object."""
    (port,) = _free_ports(1)
    env = {
        **os.environ,
        "PULSE_DATABASE_URL": seeded_database_url,
        "PULSE_STORAGE_URL": (tmp_path / "exports").as_uri(),
        "PULSE_LOG_FORMAT": "json",
    }
    args = [sys.executable, "-m", "pulse_exports.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = ServiceProcess("serve", args, env, tmp_path).start()
    url = f"http://127.0.0.1:{port}"
    secret = ApiKeyStore(seeded_database_url).create(TENANT, name="logs").secret
    try:
        wait_for("the API", lambda: httpx.get(f"{url}/api/v1/health", timeout=10).status_code, [process], timeout=90)
        response = post_export(url, secret, export_type="devices", format="csv")
        assert response.status_code == 202, response.text
    finally:
        process.stop()
    text = process.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # fails on any non-JSON line
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines too
    post = [line for line in lines if line.get("path") == "/api/v1/exports"]
    assert len(post) == 1 and post[0]["tenant"] == TENANT and post[0]["export_id"] == response.json()["export_id"]
    assert secret not in text


# --- export runs: logs and metadata ------------------------------------------------------------------


@pytest.fixture
def logging_instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance with dagster.yaml's python_logs section, as production runs have it."""
    python_logs = yaml.safe_load((REPO / "dagster.yaml").read_text())["python_logs"]
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides={"python_logs": python_logs}) as instance:
        yield instance


def test_export_run_logs_json_lines_with_export_id_tenant_and_step(
    seeded_database_url: str,
    s3_endpoint: S3Endpoint,
    s3_storage_url: str,
    logging_instance: dg.DagsterInstance,
    capfd: pytest.CaptureFixture[str],
) -> None:
    harness = ExportHarness(seeded_database_url, s3_storage(s3_endpoint, s3_storage_url), logging_instance)
    job = harness.submit(tenant_id=TENANT, export_type="devices", format="csv")
    capfd.readouterr()
    (run,) = harness.run_sensor_and_runs()
    err = capfd.readouterr().err
    assert run.success

    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    of_run = [r for r in records if r.get("run_id") == run.run_id]
    assert of_run, err[-3000:]
    assert all((r["export_id"], r["tenant"], r["export_type"]) == (str(job.id), TENANT, "devices") for r in of_run)
    claimed = [r for r in of_run if r["message"].startswith(f"claimed export {job.id}")]
    assert claimed and claimed[0]["step_key"] == "claim_export" and claimed[0]["level"] == "info"
    assert {"STEP_SUCCESS", "RUN_SUCCESS"} <= {r.get("dagster_event") for r in of_run}
    assert s3_endpoint.secret_access_key not in err
    password = urlsplit(seeded_database_url).password
    assert not password or password not in err


def test_export_run_records_rows_bytes_parts_throughput_and_duration_as_typed_metadata(exports: ExportHarness) -> None:
    job = exports.submit(tenant_id=TENANT, export_type="devices", format="csv", options={"part_max_rows": 6})
    (run,) = exports.run_sensor_and_runs()
    assert run.success
    done = exports.jobs.get(job.id)
    assert done is not None and done.manifest and done.started_at and done.completed_at

    outputs = exports.instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT).records
    (finish,) = [r.event_log_entry.dagster_event for r in outputs if r.event_log_entry.step_key == "finish_export"]
    assert finish is not None and finish.step_output_data is not None
    metadata = finish.step_output_data.metadata

    assert isinstance(metadata["rows"], dg.IntMetadataValue) and metadata["rows"].value == done.row_count
    assert isinstance(metadata["bytes"], dg.IntMetadataValue) and metadata["bytes"].value == done.file_size_bytes
    assert isinstance(metadata["parts"], dg.IntMetadataValue)
    assert metadata["parts"].value == len(done.manifest["parts"]) > 1
    for key in ("rows_per_second", "mib_per_second", "write_seconds", "duration_seconds"):
        assert isinstance(metadata[key], dg.FloatMetadataValue), key
    write_seconds = metadata["write_seconds"].value
    assert write_seconds > 0
    # (the values are rounded: write_seconds to ms, mib_per_second to 0.001)
    assert metadata["rows_per_second"].value == pytest.approx(done.row_count / write_seconds, rel=0.05)
    mib_per_second = done.file_size_bytes / 2**20 / write_seconds
    assert metadata["mib_per_second"].value == pytest.approx(mib_per_second, rel=0.05, abs=0.002)
    claim_to_complete = (done.completed_at - done.started_at).total_seconds()
    assert write_seconds <= metadata["duration_seconds"].value < claim_to_complete + 30
    assert metadata["tenant"].value == TENANT and metadata["export_id"].value == str(job.id)
