"""``pulse-exports dev`` (``make up``): the whole system on one machine, without Docker.

The embedded defaults of the demo (PostgreSQL under ``.pulse/``, file storage, a SQLite Dagster home), the
Dagster services as docker-compose runs them (one ``dagster code-server`` serving the code location to
``dagster-webserver`` and ``pulse-exports daemon`` through a ``grpc_server`` workspace) and the product API
beside them, launching runs through Dagster's GraphQL API. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from pulse_exports import migrations
from pulse_exports.demo import prepare_environment
from pulse_exports.embedded import free_port
from pulse_exports.processes import ServiceProcess
from pulse_exports.redact import redact
from pulse_exports.sample_data import is_seeded, seed_demo, tenant_name

LOCATION_NAME = "pulse_exports"  # the API launches into this code location (ApiSettings.dagster_location_name)
DEFINITIONS_MODULE = "pulse_exports.definitions"


def grpc_workspace(port: int, host: str = "127.0.0.1") -> str:
    """A workspace naming the code server on ``port``, as deploy/docker/workspace.yaml names docker-compose's."""
    return f"""\
load_from:
  - grpc_server:
      host: {host}
      port: {port}
      location_name: {LOCATION_NAME}
"""


def dagster_commands(workspace: Path, *, ui_port: int, code_port: int) -> dict[str, list[str]]:
    """argv of the code server, webserver and daemon, in start order, as docker-compose runs them. The
    webserver and daemon load the code location from the one code server (``grpc_workspace(code_port)`` in
    ``workspace``): a ``python_module`` workspace would make the daemon start its own code server, and
    another every 60 s."""
    code = ["-w", str(workspace)]
    return {
        "dagster-code-server": [_script("dagster"), "code-server", "start", "-h", "127.0.0.1", "-p", str(code_port)]
        + ["-m", DEFINITIONS_MODULE, "--location-name", LOCATION_NAME],
        "dagster-webserver": [_script("dagster-webserver"), "-h", "127.0.0.1", "-p", str(ui_port), *code],
        "dagster-daemon": [_script("pulse-exports"), "daemon", *code],
    }


def _script(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name) or name


def code_server_ready(port: int) -> bool:
    """Whether the code server on ``port`` answers with the code location's repository."""
    from dagster._grpc.client import DagsterGrpcClient

    try:
        return bool(DagsterGrpcClient(port=port, host="127.0.0.1").list_repositories())
    except Exception:  # not listening yet, or still importing the definitions
        return False


def _graphql(url: str, query: str) -> dict:
    return dict(httpx.post(f"{url}/graphql", json={"query": query}, timeout=2).json()["data"])


def location_loaded(url: str) -> bool:
    """Whether the webserver at ``url`` has loaded the code location."""
    answer = _graphql(url, "{ repositoriesOrError { ... on RepositoryConnection { nodes { location { name } } } } }")
    return any(n["location"]["name"] == LOCATION_NAME for n in answer["repositoriesOrError"].get("nodes", []))


def daemons_healthy(url: str) -> bool:
    """Whether the webserver at ``url`` sees the daemon's sensor and run-queue daemons healthy."""
    answer = _graphql(url, "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }")
    healthy = {s["daemonType"] for s in answer["instance"]["daemonHealth"]["allDaemonStatuses"] if s["healthy"]}
    return {"SENSOR", "QUEUED_RUN_COORDINATOR"} <= healthy


def _wait(what: str, check: Callable[[], bool], services: list[ServiceProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in services:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited while waiting for {what}:\n{service.log_tail()}")
        try:
            if check():
                return
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass  # not answering yet
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


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
    code_port = free_port()
    workspace = home / "workspace.yaml"
    workspace.write_text(grpc_workspace(code_port))
    dagster_url = f"http://127.0.0.1:{dagster_port}"
    os.environ.update(
        PULSE_DAGSTER_GRAPHQL_URL=f"{dagster_url}/graphql",
        PULSE_DAGSTER_UI_URL=dagster_url,
        PULSE_DAGSTER_LOCATION_NAME=LOCATION_NAME,
    )
    commands = dagster_commands(workspace, ui_port=dagster_port, code_port=code_port)
    services = [ServiceProcess(name, argv, None, home) for name, argv in commands.items()]
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)  # uvicorn installs its own once it runs
    try:
        code_server, webserver, daemon = services
        _wait("the code server", lambda: code_server_ready(code_port), [code_server.start()], 180)
        # the webserver first: both would create the SQLite storage at once and race on its migrations
        _wait("the Dagster webserver", lambda: location_loaded(dagster_url), [code_server, webserver.start()], 120)
        _wait("the Dagster daemon", lambda: daemons_healthy(dagster_url), [*services[:2], daemon.start()], 120)
        key = ApiKeyStore(database_url).create(tenant_name(1), name="pulse-exports dev")
        api_url = f"http://127.0.0.1:{api_port}"
        print(
            f"job database:  {redact(database_url)}\n"
            f"storage:       {os.environ['PULSE_STORAGE_URL']}\n"
            f"Dagster UI:    {dagster_url}   (logs: {home}/dagster-*.log)\n"
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
        for service in reversed(services):
            service.stop(grace=20)
