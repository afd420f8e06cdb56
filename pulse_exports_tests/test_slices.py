"""Big time-ordered exports read by several backends at once: same rows, same order, parts per slice."""

from __future__ import annotations

import json

import psycopg
import pytest

from pulse_exports.catalog import Catalog
from pulse_exports.pipeline import SLICE_SESSION_OPTIONS, stream_query
from pulse_exports.resources import ExportSettings

from .exports_harness import ExportHarness
from .test_export_job import all_rows

TENANT = "tenant-002"
SLICED = ExportSettings(extract_slices=3, min_slice_rows=10)


def _source_order(database_url: str) -> list[int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT seq FROM telemetry WHERE tenant_id = %s ORDER BY time, device_id, seq", (TENANT,)
        ).fetchall()
    return [seq for (seq,) in rows]


def test_slices_cover_every_row_once_in_order(seeded_database_url: str) -> None:
    catalog = Catalog.load()
    request = catalog.validate(tenant_id=TENANT, export_type="telemetry", format="csv")
    with psycopg.connect(seeded_database_url) as conn:
        plan = catalog.plan(conn, request, slices=3, min_slice_rows=10)
        assert len(plan.slice_queries) == 3
        sliced = [row for query in plan.slice_queries for row in conn.execute(query).fetchall()]
        whole = conn.execute(plan.query).fetchall()
        assert sliced == whole and len(whole) > 100  # the slices, one after another, are the query
        assert all(conn.execute(q).fetchall() for q in plan.slice_queries)  # time-uniform data: none is empty
        # too few rows per slice, a row limit, or a type not ordered by time: one query
        assert catalog.plan(conn, request, slices=3, min_slice_rows=10**9).slice_queries == ()
        limited = catalog.validate(tenant_id=TENANT, export_type="telemetry", format="csv", row_limit=50)
        assert catalog.plan(conn, limited, slices=1).slice_queries == ()
        devices = catalog.validate(tenant_id=TENANT, export_type="devices", format="csv")
        assert catalog.plan(conn, devices, slices=3, min_slice_rows=1).slice_queries == ()


@pytest.mark.parametrize(("fmt", "compression"), [("csv", "gzip"), ("parquet", "zstd")])
def test_sliced_export_has_every_row_in_order_in_parts_named_per_slice(
    exports: ExportHarness, fmt: str, compression: str
) -> None:
    exports.settings = SLICED
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format=fmt, compression=compression)
    (run,) = exports.run_sensor_and_runs()
    assert run.success
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "COMPLETED", done and done.error
    manifest = json.loads(exports.store.get_bytes(f"{TENANT}/{job.id}/manifest.json"))
    ext = "csv.gz" if fmt == "csv" else "parquet"
    assert [p["key"].rsplit("/", 1)[1] for p in manifest["parts"]] == [
        f"part-00000.{ext}",
        f"part-10000.{ext}",
        f"part-20000.{ext}",
    ]
    assert [p["index"] for p in manifest["parts"]] == [0, 1, 2]
    assert sorted(exports.store.list_keys(f"{TENANT}/{job.id}/")) == sorted(
        [p["key"] for p in manifest["parts"]] + [f"{TENANT}/{job.id}/manifest.json"]
    )
    rows = all_rows(exports.store, manifest)
    assert [int(r["seq"]) for r in rows] == _source_order(exports.database_url)
    assert done.row_count == manifest["row_count"] == len(rows) == sum(p["rows"] for p in manifest["parts"])


def test_sliced_export_rolls_parts_within_each_slice(exports: ExportHarness) -> None:
    exports.settings = ExportSettings(extract_slices=2, min_slice_rows=10)
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format="ndjson", options={"part_max_rows": 300})
    (run,) = exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert run.success and done is not None and done.status == "COMPLETED", done and done.error
    names = [p["key"].rsplit("/", 1)[1] for p in done.manifest["parts"]]
    assert names[0] == "part-00000.ndjson" and "part-00001.ndjson" in names and "part-10000.ndjson" in names
    assert names == sorted(names)
    assert all(p["rows"] <= 300 for p in done.manifest["parts"])
    assert [int(r["seq"]) for r in all_rows(exports.store, done.manifest)] == _source_order(exports.database_url)


def test_a_failing_slice_fails_the_export_and_leaves_no_files(exports: ExportHarness) -> None:
    exports.settings = SLICED
    exports.fail_uploads_after(1)  # one slice's part goes up, the next upload fails
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format="csv")
    (run,) = exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert not run.success and done is not None and done.status == "FAILED"
    assert "storage" in done.error and "InjectedStorageFault" in done.error  # the real error, not a sibling's stop
    assert exports.store.list_keys(f"{TENANT}/{job.id}/") == []


def test_row_quota_counts_all_slices_together(exports: ExportHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    with psycopg.connect(exports.database_url) as conn:
        (total,) = conn.execute("SELECT count(*) FROM telemetry WHERE tenant_id = %s", (TENANT,)).fetchone()
    # each slice alone is under the quota; together they are over it
    monkeypatch.setenv("PULSE_QUOTA_MAX_ROWS", str(total - 1))
    exports.settings = SLICED
    job = exports.submit(tenant_id=TENANT, export_type="telemetry", format="csv")
    (run,) = exports.run_sensor_and_runs()
    done = exports.jobs.get(job.id)
    assert not run.success and done is not None and done.status == "FAILED"
    assert "max_rows" in done.error
    assert exports.store.list_keys(f"{TENANT}/{job.id}/") == []


def test_slice_connections_walk_the_index_instead_of_sorting(seeded_database_url: str) -> None:
    query = "SELECT current_setting('enable_sort') AS sort, current_setting('max_parallel_workers_per_gather') AS w"
    url = seeded_database_url + "?sslmode=disable"  # options join the URL's other parameters
    (batch,) = list(stream_query(url, query, session_options=SLICE_SESSION_OPTIONS))
    assert batch.to_pylist() == [{"sort": "off", "w": "0"}]
    (plain,) = list(stream_query(seeded_database_url, query))
    assert plain.to_pylist() == [{"sort": "on", "w": plain.to_pylist()[0]["w"]}]
