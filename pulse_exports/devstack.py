"""``pulse-exports dev`` (``make up``): the whole system on one machine, without Docker.

The embedded defaults of the demo (PostgreSQL under ``.pulse/``, file storage, a SQLite Dagster home),
``dagster dev`` (webserver, daemon, code location) and the product API beside it, launching runs through
Dagster's GraphQL API. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx

from pulse_exports import migrations
from pulse_exports.demo import prepare_environment
from pulse_exports.processes import ServiceProcess
from pulse_exports.redact import redact
from pulse_exports.sample_data import is_seeded, seed_demo, tenant_name

LOCATION_NAME = "pulse_exports"  # the API launches into this code location (ApiSettings.dagster_location_name)
WORKSPACE = f"""\
load_from:
  - python_module:
      module_name: pulse_exports.definitions
      location_name: {LOCATION_NAME}
"""


def _dagster_cli() -> str:
    beside = Path(sys.executable).with_name("dagster")
    return str(beside) if beside.exists() else shutil.which("dagster") or "dagster"


def _wait_for_dagster(url: str, dagster: ServiceProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    query = {"query": "{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name } } } }"}
    while time.monotonic() < deadline:
        if not dagster.alive():
            raise RuntimeError(f"dagster dev exited:\n{dagster.log_tail()}")
        try:
            answer = httpx.post(f"{url}/graphql", json=query, timeout=2).json()
            if answer["data"]["repositoriesOrError"].get("nodes"):
                return
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Dagster did not answer at {url} within {timeout:.0f}s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_dev_stack(home: Path, *, api_port: int, dagster_port: int, telemetry_rows: int) -> int:
    """Start Dagster and the API on loopback and serve until interrupted; returns an exit code."""
    import uvicorn

    from pulse_exports.apikeys import ApiKeyStore

    prepare_environment(home)
    database_url = os.environ["PULSE_DATABASE_URL"]
    source_url = os.environ.get("PULSE_SOURCE_DATABASE_URL") or database_url
    migrations.upgrade(database_url)
    if not is_seeded(source_url):
        seed_demo(source_url, tenants=3, devices=600, telemetry_rows=telemetry_rows)
    workspace = home / "workspace.yaml"
    workspace.write_text(WORKSPACE)
    dagster_url = f"http://127.0.0.1:{dagster_port}"
    os.environ.update(
        PULSE_DAGSTER_GRAPHQL_URL=f"{dagster_url}/graphql",
        PULSE_DAGSTER_UI_URL=dagster_url,
        PULSE_DAGSTER_LOCATION_NAME=LOCATION_NAME,
    )
    command = [_dagster_cli(), "dev", "-w", str(workspace), "-h", "127.0.0.1", "-p", str(dagster_port)]
    dagster = ServiceProcess("dagster-dev", command, None, home).start()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)  # uvicorn installs its own once it runs
    try:
        _wait_for_dagster(dagster_url, dagster, timeout=180)
        key = ApiKeyStore(database_url).create(tenant_name(1), name="pulse-exports dev")
        api_url = f"http://127.0.0.1:{api_port}"
        print(
            f"job database:  {redact(database_url)}\n"
            f"storage:       {os.environ['PULSE_STORAGE_URL']}\n"
            f"Dagster UI:    {dagster_url}   (log: {dagster.log_path})\n"
            f"product API:   {api_url}/docs\n"
            f"API key:       {key.secret}   (tenant {key.key.tenant_id}; shown once)\n\n"
            f"  curl -s -X POST {api_url}/api/v1/exports -H 'Authorization: Bearer {key.secret}' \\\n"
            """       -H 'Content-Type: application/json' -d '{"export_type": "telemetry", "format": "parquet"}'\n\n"""
            "Ctrl-C stops the API and Dagster.",
            flush=True,
        )
        uvicorn.run("pulse_exports.api:create_app", factory=True, host="127.0.0.1", port=api_port, log_level="info")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        dagster.stop(grace=20)
