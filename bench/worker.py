"""The work of the Python contenders, each run as ``python -m bench.worker ...`` in its own process.

- ``naive``: what many teams write first: fetch every row with psycopg, flatten the metrics jsonb in
  Python, write with ``csv.DictWriter``.
- ``pulse-run``: the Dagster run worker of one export: ``local_runs.execute_export_run`` against the
  real Dagster instance in ``$DAGSTER_HOME``, as the daemon's run launcher would start it. It
  prints when the first Arrow batch reached the writer (the "first row extracted" figure).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench.measure import vm_hwm

NAIVE_BASE_COLUMNS = ("time", "device_id", "site_id", "seq")


def naive_export(database_url: str, tenant_id: str, row_limit: int | None, out: str) -> int:
    """Fetch all, then write: rows gather in a Python list and memory grows with the export."""
    import psycopg
    from psycopg.rows import dict_row

    query = "SELECT time, device_id, site_id, seq, metrics FROM telemetry WHERE tenant_id = %s"
    query += " ORDER BY time, device_id, seq"
    if row_limit is not None:
        query += " LIMIT %s"
    params: tuple[Any, ...] = (tenant_id, row_limit) if row_limit is not None else (tenant_id,)
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        rows = conn.execute(query, params).fetchall()
    keys = sorted({key for row in rows for key in row["metrics"]})
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*NAIVE_BASE_COLUMNS, *keys])
        writer.writeheader()
        for row in rows:
            metrics = row.pop("metrics")
            row["time"] = row["time"].isoformat()
            row.update(metrics)
            writer.writerow(row)
    return len(rows)


def _first_batch_clock(marks: dict[str, float]) -> None:
    """Wrap the job's stream_query so the first batch it yields records the wall-clock time."""
    import pyarrow as pa

    from pulse_exports import jobs

    original = jobs.stream_query

    def timed(*args: Any, **kwargs: Any) -> pa.RecordBatchReader:
        reader = original(*args, **kwargs)

        def batches() -> Iterator[pa.RecordBatch]:
            for batch in reader:
                if "first_batch_at" not in marks and batch.num_rows:
                    marks["first_batch_at"] = time.time()
                yield batch

        return pa.RecordBatchReader.from_batches(reader.schema, batches())

    jobs.stream_query = timed  # type: ignore[assignment]


def pulse_run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = time.time()
    import dagster as dg

    from pulse_exports.definitions import build_definitions
    from pulse_exports.jobs import TAG_EXPORT_ID, TAG_EXPORT_TYPE, TAG_TENANT
    from pulse_exports.local_runs import execute_export_run
    from pulse_exports.resources import ExportStorage, PulseDatabase

    marks: dict[str, float] = {"process_started_at": started_at}
    _first_batch_clock(marks)
    storage = ExportStorage(
        url=args.storage_url,
        endpoint_url=args.s3_endpoint,
        access_key_id=args.s3_access_key,
        secret_access_key=args.s3_secret_key,
        region_name="us-east-1" if args.s3_endpoint else None,
    )
    defs = build_definitions(database=PulseDatabase(url=args.database_url), storage=storage)
    tags = {TAG_TENANT: args.tenant, TAG_EXPORT_ID: args.export_id, TAG_EXPORT_TYPE: "telemetry"}
    request = dg.RunRequest(run_key=args.export_id, partition_key=args.export_id, tags=tags)
    with dg.DagsterInstance.get() as instance:
        marks["run_started_at"] = time.time()
        run = execute_export_run(defs, instance, request)
        marks["run_finished_at"] = time.time()  # the job is COMPLETED (or FAILED) by now
    return {"run_id": run.run_id, "success": run.success, **marks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    naive = sub.add_parser("naive")
    naive.add_argument("--database-url", required=True)
    naive.add_argument("--tenant", required=True)
    naive.add_argument("--row-limit", type=int)
    naive.add_argument("--out", required=True)
    run = sub.add_parser("pulse-run")
    run.add_argument("--database-url", required=True)
    run.add_argument("--export-id", required=True)
    run.add_argument("--tenant", required=True)
    run.add_argument("--storage-url", required=True)
    run.add_argument("--s3-endpoint")
    run.add_argument("--s3-access-key")
    run.add_argument("--s3-secret-key")
    args = parser.parse_args(argv)
    if args.command == "naive":
        result: dict[str, Any] = {"rows": naive_export(args.database_url, args.tenant, args.row_limit, args.out)}
    else:
        result = pulse_run(args)
    result["vm_hwm"] = vm_hwm()
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
