"""`pulse-exports dev` (`make up`): Dagster and the product API together, launching runs through GraphQL."""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import psycopg
import pytest

from pulse_exports.client import PulseExportsClient
from pulse_exports_tests.servers import _free_ports

pytestmark = pytest.mark.slow


def _wait_for_key(process: subprocess.Popen[str], log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"API key:\s+(pex_\S+)", log.read_text())
        if match:
            return match.group(1)
        assert process.poll() is None, f"pulse-exports dev exited {process.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no API key printed within {timeout}s:\n{log.read_text()[-3000:]}")


def _wait_until_healthy(url: str, timeout: float) -> None:
    """uvicorn starts just after the key is printed; /health is 200 once database, storage and Dagster answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.get(url, timeout=5)
            if answer.status_code == 200:
                return
        except httpx.TransportError as exc:
            answer = exc  # type: ignore[assignment]
        assert time.monotonic() < deadline, answer
        time.sleep(0.3)


def test_dev_stack_launches_an_api_export_through_dagster_and_stops_everything(fresh_database_url, tmp_path):
    api_port, dagster_port = _free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DAGSTER_", "AWS_"))}
    env.update(PULSE_DATABASE_URL=fresh_database_url, PULSE_STORAGE_URL=(tmp_path / "exports").as_uri())
    log = tmp_path / "dev.log"
    command = [sys.executable, "-m", "pulse_exports.cli", "dev", "--home", str(tmp_path / "home")]
    command += ["--api-port", str(api_port), "--dagster-port", str(dagster_port), "--telemetry-rows", "3000"]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        key = _wait_for_key(process, log, timeout=240)
        _wait_until_healthy(f"http://127.0.0.1:{api_port}/api/v1/health", timeout=60)
        with PulseExportsClient(f"http://127.0.0.1:{api_port}", key) as client:
            created = client.create("telemetry", format="csv", compression="gzip")
            assert (created.launch, created.run_id is not None) == ("launched", True)  # GraphQL, not the sensor
            done = client.wait(created.export_id, timeout=180, interval=0.5)
            assert done.status.value == "COMPLETED", done.error
            assert done.dagster_run_url == f"http://127.0.0.1:{dagster_port}/runs/{created.run_id}"
            (part,) = client.download(done.id, tmp_path / "download")
        rows = list(csv.DictReader(io.StringIO(gzip.decompress(part.read_bytes()).decode())))
        with psycopg.connect(fresh_database_url) as conn:
            (expected,) = conn.execute("SELECT count(*) FROM telemetry WHERE tenant_id = 'tenant-001'").fetchone()
        assert len(rows) == expected > 0

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        for port in (api_port, dagster_port):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
        assert not _running_with(str(tmp_path)), "every Dagster process stopped with the stack"
        with dg.DagsterInstance.from_config(str(tmp_path / "home" / "dagster_home")) as instance:
            run = instance.get_run_by_id(str(created.run_id))
            assert run is not None and run.tags.get("pulse/worker_pid"), "forked by the warm launcher"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _kill_leftovers(str(tmp_path))


def _running_with(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _kill_leftovers(marker: str) -> None:
    """SIGKILL the process groups of anything still running with this test's folder on its command line."""
    for pid in _running_with(marker):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except OSError:
            continue
