"""The pulse-exports command line: db upgrade, seed-demo, submit, status, download, purge and demo."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner

from pulse_exports import migrations
from pulse_exports.cli import main
from pulse_exports.definitions import build_definitions
from pulse_exports.embedded import EmbeddedPostgres
from pulse_exports.local_runs import run_pending_exports
from pulse_exports.resources import ExportStorage, PulseDatabase


@pytest.fixture
def cli_env(seeded_database_url: str, tmp_path: Path) -> dict[str, str]:
    return {"PULSE_DATABASE_URL": seeded_database_url, "PULSE_STORAGE_URL": (tmp_path / "exports").as_uri()}


def invoke(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_db_upgrade_is_idempotent(fresh_database_url: str) -> None:
    env = {"PULSE_DATABASE_URL": fresh_database_url}
    code, out = invoke(env, "db", "upgrade")
    latest = migrations.available()[-1][0]
    assert code == 0 and f"applied {len(migrations.available())} migration(s)" in out
    code, out = invoke(env, "db", "upgrade")
    assert code == 0 and f"applied 0 migration(s); at version {latest}" in out


def test_seed_demo_fills_the_sample_tables(fresh_database_url: str) -> None:
    code, out = invoke(
        {"PULSE_DATABASE_URL": fresh_database_url},
        "seed-demo", "--tenants", "4", "--devices", "40", "--telemetry-rows", "1000",
    )  # fmt: skip
    assert code == 0, out
    with psycopg.connect(fresh_database_url) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM device_registry),"
            " (SELECT count(*) FROM telemetry), (SELECT count(*) FROM telemetry WHERE tenant_id = 'tenant-001')"
        ).fetchone()
    assert counts == (4, 40, 1000, 400)


def test_submit_prints_a_pending_job_and_status_reads_it(cli_env: dict[str, str]) -> None:
    code, out = invoke(
        cli_env, "submit", "--tenant", "tenant-001", "--type", "alerts", "--format", "ndjson",
        "--filters", '{"severities": ["critical"]}', "--columns", "id,severity", "--row-limit", "10",
    )  # fmt: skip
    assert code == 0, out
    job = json.loads(out)
    assert job["status"] == "PENDING" and job["columns"] == ["id", "severity"] and job["row_limit"] == 10
    code, out = invoke(cli_env, "status", job["id"])
    assert code == 0 and json.loads(out)["id"] == job["id"]
    code, out = invoke(cli_env, "status", job["id"], "--tenant", "tenant-002")
    assert code == 1 and "not found" in out


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--type", "nope"], "export_type"),
        (["--type", "devices", "--columns", "device_id,secret"], "columns[1]"),
        (["--type", "telemetry", "--filters", '{"time_range": "1y"}'], "filters.time_range"),
    ],
)
def test_submit_rejects_bad_requests_naming_the_field(cli_env: dict[str, str], args: list[str], field: str) -> None:
    code, out = invoke(cli_env, "submit", "--tenant", "tenant-001", *args)
    assert code == 2 and f"invalid request: {field}:" in out
    with psycopg.connect(cli_env["PULSE_DATABASE_URL"]) as conn:
        assert conn.execute("SELECT count(*) FROM export_jobs").fetchone() == (0,)


def test_download_fetches_parts_and_checks_sha256(
    cli_env: dict[str, str], tmp_path: Path, dagster_instance: dg.DagsterInstance
) -> None:
    _, out = invoke(
        cli_env, "submit", "--tenant", "tenant-003", "--type", "telemetry", "--compression", "gzip",
        "--option", "part_max_rows=400",
    )  # fmt: skip
    export_id = json.loads(out)["id"]
    defs = build_definitions(
        PulseDatabase(url=cli_env["PULSE_DATABASE_URL"]), ExportStorage(url=cli_env["PULSE_STORAGE_URL"])
    )
    assert [r.success for r in run_pending_exports(defs, dagster_instance)] == [True]

    code, out = invoke(cli_env, "download", export_id, "--out", str(tmp_path / "dl"))
    assert code == 0, out
    manifest = json.loads((tmp_path / "dl" / "manifest.json").read_text())
    assert len(manifest["parts"]) > 1 and out.count("sha256 ok") == len(manifest["parts"])
    rows = 0
    for part in manifest["parts"]:
        with gzip.open(tmp_path / "dl" / part["file"], "rt", newline="") as f:
            rows += len(list(csv.DictReader(f)))
    assert rows == manifest["row_count"] > 0

    # A part altered in storage is caught, and the bad file is not left behind.
    stored = tmp_path / "exports" / manifest["parts"][0]["key"]
    stored.write_bytes(stored.read_bytes() + b"x")
    code, out = invoke(cli_env, "download", export_id, "--out", str(tmp_path / "dl2"))
    assert code == 1 and "does not match the manifest" in out
    assert not (tmp_path / "dl2" / manifest["parts"][0]["file"]).exists()


def test_download_of_unfinished_export_is_refused(cli_env: dict[str, str], tmp_path: Path) -> None:
    _, out = invoke(cli_env, "submit", "--tenant", "tenant-001", "--type", "devices")
    code, out = invoke(cli_env, "download", json.loads(out)["id"], "--out", str(tmp_path / "x"))
    assert code == 1 and "PENDING, not COMPLETED" in out


def test_missing_configuration_names_the_variable() -> None:
    code, out = invoke({"PULSE_DATABASE_URL": ""}, "status", "00000000-0000-0000-0000-000000000000")
    assert code == 2 and "PULSE_DATABASE_URL" in out


def test_demo_runs_two_exports_on_embedded_defaults(tmp_path: Path) -> None:
    """The README's first command, minus the install: embedded PostgreSQL, seed, two Dagster runs."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DAGSTER_"))}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pulse_exports.cli", "demo", "--home", str(home), "--telemetry-rows", "5000"],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Warning" not in done.stderr, done.stderr  # the README's first command shows no library noise
        lines = [line for line in done.stdout.splitlines() if line.startswith(("telemetry ", "devices "))]
        assert len(lines) == 2 and all(" COMPLETED " in line for line in lines)
        assert "rows=2000 " in lines[0]  # tenant-001 holds 40% of the 5,000 rows
        files = sorted(p.name for p in (home / "exports" / "tenant-001").rglob("*") if p.is_file())
        assert files == ["manifest.json"] * 3 + ["part-00000.csv.gz", "part-00000.ndjson", "part-00000.parquet"]
        # the product API's leg: POST, GET until COMPLETED, download (sha256-checked by the client)
        api_rows = re.search(r"GET  /api/v1/exports/\{id\} -> COMPLETED rows=(\d+)", done.stdout)
        assert "POST /api/v1/exports -> PENDING" in done.stdout and api_rows, done.stdout
        (downloaded,) = (home / "api-download").rglob("part-00000.ndjson")
        assert len(downloaded.read_text().splitlines()) == int(api_rows.group(1)) > 0
        again = subprocess.run(
            [sys.executable, "-m", "pulse_exports.cli", "demo", "--home", str(home)],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert again.returncode == 0 and "sample data" not in again.stdout  # reuses server and data
    finally:
        EmbeddedPostgres(home / "pg").stop()
