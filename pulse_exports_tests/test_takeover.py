"""An export taken over by another run: the old run publishes nothing more, and a manifest never vouches
for a part that is not the file its run wrote."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pulse_exports.catalog import Catalog
from pulse_exports.pipeline import ExportCancelled, PartLimits, PartsChanged, verify_parts, write_export
from pulse_exports.storage import ExportStore, LocalExportStore
from pulse_exports_tests.servers import S3Endpoint
from pulse_exports_tests.test_storage import s3_store_from_url, unfinished_uploads

from .exports_harness import ExportHarness

TENANT = "tenant-002"
EXPORT_ID = "0b7e6a56-0000-4000-8000-000000000001"


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ExportStore:
    if request.param == "local":
        return LocalExportStore(tmp_path / "exports")
    endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
    return s3_store_from_url(request.getfixturevalue("s3_storage_url"), endpoint)


def _reader(batches: int, rows: int) -> pa.RecordBatchReader:
    schema = pa.schema([("n", pa.int64()), ("label", pa.string())])
    chunks = (
        pa.record_batch([pa.array(range(b * rows, (b + 1) * rows)), pa.array([f"row {b}"] * rows)], schema=schema)
        for b in range(batches)
    )
    return pa.RecordBatchReader.from_batches(schema, chunks)


def test_a_run_that_lost_the_export_publishes_no_further_part(any_store: ExportStore, request) -> None:
    request_ = Catalog.load().validate(tenant_id=TENANT, export_type="devices", format="csv")
    checks: list[bool] = []

    def owns() -> bool:  # the export is taken over while the run writes its second part
        checks.append(len(checks) == 0)
        return checks[-1]

    with pytest.raises(ExportCancelled, match="taken over"):
        write_export(
            _reader(batches=3, rows=100),
            export_id=EXPORT_ID,
            request=request_,
            store=any_store,
            limits=PartLimits(max_rows=100),
            owns_export=owns,
        )
    prefix = f"{TENANT}/{EXPORT_ID}/"
    # part 0 went up while the run owned the export; part 1 was refused and not deleted by the old run
    # (the files under the prefix are the new run's now)
    assert any_store.list_keys(prefix) == [f"{prefix}part-00000.csv"]
    assert any_store.get_bytes(f"{prefix}part-00000.csv").count(b"\n") == 101  # header + 100 rows
    if request.node.callspec.params["any_store"] == "s3":
        assert unfinished_uploads(request.getfixturevalue("s3_endpoint").client(), any_store.bucket) == []


def test_verify_parts_names_a_missing_or_changed_part(tmp_path: Path) -> None:
    store = LocalExportStore(tmp_path / "exports")
    store.put_bytes("t/e/part-00000.csv", b"a\r\n1\r\n")
    store.put_bytes("t/e/part-00001.csv", b"a\r\n2\r\n")
    parts = [{"key": "t/e/part-00000.csv", "bytes": 6}, {"key": "t/e/part-00001.csv", "bytes": 6}]
    verify_parts(store, parts)
    store.put_bytes("t/e/part-00001.csv", b"a\r\n22\r\n")
    with pytest.raises(PartsChanged, match=r"part t/e/part-00001.csv has 7 bytes .* not the 6 this run wrote"):
        verify_parts(store, parts)
    store.delete_prefix("t/e/part-00000")
    with pytest.raises(PartsChanged, match="part t/e/part-00000.csv is missing"):
        verify_parts(store, parts)


def test_a_part_overwritten_before_the_manifest_fails_the_export_and_leaves_no_files(exports: ExportHarness) -> None:
    exports.overwrite_parts_after_publish()
    job = exports.submit(tenant_id=TENANT, export_type="devices", format="csv")
    runs = exports.run_sensor_and_runs()
    assert [r.success for r in runs] == [False]
    done = exports.jobs.get(job.id)
    assert done is not None and done.status == "FAILED" and done.manifest is None
    assert done.error.startswith("finish failed") and "PartsChanged" in done.error and "part-00000.csv" in done.error
    assert exports.store.list_keys(f"{TENANT}/{job.id}/") == []
