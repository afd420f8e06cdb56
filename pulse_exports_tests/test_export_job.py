"""The export pipeline end to end: export_jobs -> sensor -> Dagster run -> parts in real S3 -> job metadata."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import time
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
import zstandard

from pulse_exports.jobstore import JobStore
from pulse_exports.local_runs import execute_export_run, run_pending_exports, tick_export_sensor
from pulse_exports.resources import ExportSettings
from pulse_exports.storage import ExportStore

from .exports_harness import ExportHarness

TENANT = "tenant-002"


def read_rows(data: bytes, fmt: str, compression: str) -> list[dict[str, Any]]:
    """Decode a part with independent readers: Python's csv/json and pyarrow."""
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)).to_pylist()
    if compression == "gzip":
        data = gzip.decompress(data)
    elif compression == "zstd":
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    text = data.decode("utf-8")
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if fmt == "json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line]


def source_telemetry(database_url: str, tenant: str) -> dict[int, dict[str, Any]]:
    """The tenant's telemetry straight from PostgreSQL, keyed by seq."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT seq, device_id, site_id, metrics FROM telemetry WHERE tenant_id = %s", (tenant,)
        ).fetchall()
    return {seq: {"device_id": d, "site_id": s, "metrics": m} for seq, d, s, m in rows}


def all_rows(store: ExportStore, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for part in manifest["parts"]:
        rows.extend(read_rows(store.get_bytes(part["key"]), manifest["format"], manifest["compression"]))
    return rows


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [("csv", "none"), ("csv", "gzip"), ("json", "none"), ("ndjson", "zstd"), ("parquet", "zstd")],
)
def test_telemetry_export_equals_the_tenants_source_rows(exports: ExportHarness, fmt: str, compression: str) -> None:
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format=fmt, compression=compression)
    runs = exports.run_sensor_and_runs()
    assert [r.success for r in runs] == [True]

    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    assert done.run_id == runs[0].run_id
    manifest = json.loads(exports.store.get_bytes(f"{TENANT}/{job.id}/manifest.json"))
    assert manifest == done.manifest
    rows = all_rows(exports.store, manifest)

    expected = source_telemetry(exports.database_url, TENANT)
    assert len(expected) > 100
    assert done.row_count == len(rows) == len(expected) == manifest["row_count"] == done.rows_done
    got = {int(r["seq"]): r for r in rows}
    assert got.keys() == expected.keys()  # every row of the tenant, and no other tenant's
    for seq, source in list(expected.items())[:200]:
        row = got[seq]
        assert row["device_id"] == source["device_id"]
        for key, value in source["metrics"].items():
            assert float(row[key]) == pytest.approx(float(value))
        for key in {"pressure", "voltage"} - source["metrics"].keys():  # absent metric -> NULL
            assert row[key] in (None, "")
    assert done.file_size_bytes == sum(p["bytes"] for p in manifest["parts"])


def test_small_part_size_gives_many_parts_with_matching_sha256(exports: ExportHarness, s3_endpoint: Any) -> None:
    job = exports.submit(
        tenant_id=TENANT, export_type="telemetry", format="csv", compression="gzip", options={"part_max_rows": 500}
    )
    exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    parts = done.manifest["parts"]
    assert len(parts) == -(-done.row_count // 500) > 2
    assert [p["rows"] for p in parts[:-1]] == [500] * (len(parts) - 1)
    listed = exports.store.list_keys(f"{TENANT}/{job.id}/")
    assert sorted(listed) == sorted([p["key"] for p in parts] + [f"{TENANT}/{job.id}/manifest.json"])
    for part in parts:
        body = exports.store.get_bytes(part["key"])
        assert hashlib.sha256(body).hexdigest() == part["sha256"]
        assert len(body) == part["bytes"]
        assert len(read_rows(body, "csv", "gzip")) == part["rows"]


@pytest.mark.parametrize(
    ("late_metrics", "rssi_type"),
    [
        ({"co2": 410}, "float64"),  # the export succeeds; the check finds the key the sample lacked
        ({"rssi": "n/a"}, "string"),  # the cast to double precision fails the query itself
        ({"rssi": "12"}, "string"),  # the cast takes "12" as 12.0; the check finds a string in a number key
        ({"co2": 410, "rssi": "n/a"}, "string"),
    ],
)
def test_metric_key_or_type_beyond_the_sample_still_gets_its_column(
    exports: ExportHarness, monkeypatch: pytest.MonkeyPatch, late_metrics: dict[str, Any], rssi_type: str
) -> None:
    from pulse_exports import jobs

    monkeypatch.setattr(jobs, "METRIC_SAMPLE_ROWS", 100)
    with psycopg.connect(exports.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO telemetry (time, tenant_id, device_id, site_id, seq, metrics)"
            " VALUES (now() + interval '1 day', %s, 'dev-late', 'site-0', 900001, %s)",
            (TENANT, json.dumps(late_metrics)),
        )
        # Read through the (tenant_id, time) index, the sample is the earliest rows: the late one is
        # outside it wherever the heap put it, so the export has to notice and plan again.
        conn.execute(
            psycopg.sql.SQL("ALTER DATABASE {} SET enable_seqscan = off").format(
                psycopg.sql.Identifier(conn.info.dbname)
            )
        )
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format="csv")
    exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    messages = [e.user_message for e in exports.instance.all_logs(done.run_id)]
    assert any("planning from every row" in m for m in messages)
    rows = all_rows(exports.store, done.manifest)
    assert rows[-1].get("co2") == ("410.0" if "co2" in late_metrics else None)
    assert rows[-1]["rssi"] == str(late_metrics.get("rssi", ""))
    assert {"name": "rssi", "type": rssi_type} in done.manifest["columns"]
    assert len(rows) == len(source_telemetry(exports.database_url, TENANT))


def _sessions_and_job_updates(database_url: str) -> tuple[int, int]:
    """PostgreSQL sessions opened on the database so far, and rows of export_jobs updated. A backend reports
    its counts as it exits, a moment after its client closed it: read until two reads agree."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        last: tuple[int, int] | None = None
        for _ in range(25):
            row = conn.execute(
                "SELECT (SELECT sessions FROM pg_stat_database WHERE datname = current_database()),"
                " (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'export_jobs')"
            ).fetchone()
            assert row is not None
            if (int(row[0]), int(row[1])) == last:
                break
            last = (int(row[0]), int(row[1]))
            time.sleep(0.2)
    assert last is not None
    return last


def test_progress_reports_heartbeats_and_ownership_checks_share_one_session(exports: ExportHarness) -> None:
    exports.settings = ExportSettings(heartbeat_interval_seconds=0.01)
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format="csv", options={"part_max_rows": 50})
    before = _sessions_and_job_updates(exports.database_url)
    assert [r.success for r in exports.run_sensor_and_runs()] == [True]
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    assert len(done.manifest["parts"]) > 20  # each part: an ownership check before it is published, a progress report
    after = _sessions_and_job_updates(exports.database_url)
    sessions, updates = after[0] - before[0], after[1] - before[1]
    # Each progress report and heartbeat updates the job row: as a session each, that was 135 sessions for
    # 91 updates here. The sensor, claim, plan, source query, metric check, finish and these reads take ~16.
    assert updates > len(done.manifest["parts"]) + 10, (sessions, updates)
    assert sessions < 30 < updates, (sessions, updates)


def test_devices_export_keeps_columns_chosen_and_lists(exports: ExportHarness) -> None:
    job = exports.submit(
        tenant_id=TENANT, export_type="devices", format="ndjson", columns=["device_id", "tags", "status"]
    )
    exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    rows = all_rows(exports.store, done.manifest)
    with psycopg.connect(exports.database_url) as conn:
        expected = conn.execute(
            "SELECT r.device_id, r.tags, s.status FROM device_registry r"
            " JOIN device_state s USING (tenant_id, device_id) WHERE r.tenant_id = %s ORDER BY r.device_id",
            (TENANT,),
        ).fetchall()
    assert [(r["device_id"], r["tags"], r["status"]) for r in rows] == [tuple(e) for e in expected]
    assert list(rows[0]) == ["device_id", "tags", "status"]


def test_row_limit_and_filters_narrow_the_export(exports: ExportHarness) -> None:
    with psycopg.connect(exports.database_url) as conn:
        device = conn.execute(
            "SELECT device_id FROM device_registry WHERE tenant_id = %s LIMIT 1", (TENANT,)
        ).fetchone()
        count = conn.execute(
            "SELECT count(*) FROM telemetry WHERE tenant_id = %s AND device_id = %s", (TENANT, device[0])
        ).fetchone()
    job = exports.submit(
        tenant_id=TENANT, export_type="telemetry", format="json", filters={"device_ids": [device[0]]}, row_limit=5
    )
    exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    rows = all_rows(exports.store, done.manifest)
    assert count[0] > 5 and len(rows) == 5
    assert {r["device_id"] for r in rows} == {device[0]}
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert rows[0]["time"].endswith("+00:00")


def test_hostile_filter_values_match_nothing_and_change_nothing(exports: ExportHarness) -> None:
    hostile = ["x' OR '1'='1", "'; DROP TABLE telemetry; --", "dev-000001') OR tenant_id <> ('"]
    before = exports.table_counts()
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format="csv", filters={"device_ids": hostile})
    exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    assert done.row_count == 0
    assert exports.table_counts() == before


@pytest.mark.parametrize(
    ("fmt", "compression"), [("csv", "none"), ("json", "gzip"), ("ndjson", "none"), ("parquet", "zstd")]
)
def test_zero_matching_rows_completes_with_valid_empty_files(
    exports: ExportHarness, fmt: str, compression: str
) -> None:
    job = exports.submit(
        tenant_id=TENANT, export_type="alerts", format=fmt, compression=compression, filters={"alert_types": ["nope"]}
    )
    exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    assert done.row_count == 0 and len(done.manifest["parts"]) == 1
    body = exports.store.get_bytes(done.manifest["parts"][0]["key"])
    assert read_rows(body, fmt, compression) == []
    if fmt == "csv":
        assert body.decode().splitlines()[0].startswith("id,device_id,site_id,alert_type")
    if fmt == "parquet":
        assert "created_at" in pq.read_table(io.BytesIO(body)).schema.names


def test_failure_mid_export_leaves_failed_job_with_reason_and_no_files(exports: ExportHarness) -> None:
    exports.fail_uploads_after(2)
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format="csv", options={"part_max_rows": 500})
    runs = exports.run_sensor_and_runs()
    assert [r.success for r in runs] == [False]
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "FAILED"
    assert "extract failed" in done.error and "storage" in done.error
    assert done.manifest is None and done.completed_at is not None
    assert exports.store.list_keys(f"{TENANT}/{job.id}/") == []


def test_same_export_requested_twice_runs_the_work_once(exports: ExportHarness) -> None:
    job = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    first = tick_export_sensor(exports.defs, exports.instance)
    second = tick_export_sensor(exports.defs, exports.instance)
    assert [r.run_key for r in first] == [str(job.id)] and second == []
    assert exports.jobs.get(job.id).status == "QUEUED"
    one = execute_export_run(exports.defs, exports.instance, first[0])
    again = execute_export_run(exports.defs, exports.instance, first[0])  # a duplicate launch (API + sensor)
    assert one.success and again.success
    done = exports.jobs.get(job.id)
    assert done.status == "COMPLETED" and done.run_id == one.run_id and done.attempts == 1
    skipped = exports.instance.get_run_by_id(again.run_id)
    assert skipped is not None
    plan_steps = [
        e for e in exports.instance.all_logs(again.run_id) if e.is_dagster_event and e.step_key == "plan_export"
    ]
    assert plan_steps == [] or all(not e.dagster_event.is_step_success for e in plan_steps)


def test_sensor_tags_runs_with_tenant_export_and_type(exports: ExportHarness) -> None:
    job = exports.submit(tenant_id=TENANT, export_type="alerts", format="csv")
    (request,) = tick_export_sensor(exports.defs, exports.instance)
    assert request.partition_key == str(job.id)
    assert request.tags == {"pulse/tenant": TENANT, "pulse/export_id": str(job.id), "pulse/export_type": "alerts"}
    assert exports.instance.has_dynamic_partition("exports", str(job.id))


def test_purge_deletes_expired_files_and_marks_expired_once(exports: ExportHarness) -> None:
    keep = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    old = exports.submit(tenant_id=TENANT, export_type="alerts", format="json")
    run_pending_exports(exports.defs, exports.instance)
    with psycopg.connect(exports.database_url, autocommit=True) as conn:
        conn.execute("UPDATE export_jobs SET expires_at = now() - interval '1 minute' WHERE id = %s", (old.id,))
    assert exports.store.list_keys(f"{TENANT}/{old.id}/")

    first = exports.run_purge()
    assert first.success
    assert exports.jobs.get(old.id).status == "EXPIRED"
    assert exports.jobs.get(old.id).manifest is not None  # the row is kept for audit
    assert exports.store.list_keys(f"{TENANT}/{old.id}/") == []
    assert not exports.instance.has_dynamic_partition("exports", str(old.id))
    assert exports.jobs.get(keep.id).status == "COMPLETED"
    assert exports.store.list_keys(f"{TENANT}/{keep.id}/")

    before = exports.job_rows()
    assert exports.run_purge().success
    assert exports.job_rows() == before


def test_run_failure_outside_op_code_is_written_back(exports: ExportHarness) -> None:
    job = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    (request,) = tick_export_sensor(exports.defs, exports.instance)
    exports.simulate_crashed_run(request)
    done = JobStore(exports.database_url).get(job.id)
    assert done.status == "FAILED" and "Dagster run" in done.error
