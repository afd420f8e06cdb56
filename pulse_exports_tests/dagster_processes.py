"""Real ``dagster-webserver`` + ``dagster-daemon`` (and the product API under uvicorn) as processes on
loopback, for tests whose behaviour belongs to them: GraphQL launches, the run queue, termination.

One set per test module: a seeded database and a bucket of its own, a temporary DAGSTER_HOME whose run,
event and schedule storage is the production ``storage:`` block of dagster.yaml (dagster-postgres, through
``DAGSTER_PG_*``) on a database of its own, and a workspace loading the module ``pulse_exports.definitions``
as ``pulse_exports``. Each process runs in its own session, so teardown can kill the whole group (code
servers and run workers too).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pulse_exports.processes import ServiceProcess
from pulse_exports_tests.servers import S3Endpoint, _free_ports

LOCATION = "pulse_exports"
REPOSITORY = "__repository__"

# The repository's production dagster.yaml: its queue limits and run retries are what the tests run under.
PRODUCTION_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def instance_yaml(overrides: dict[str, Any] | None = None, *, production_storage: bool = False) -> str:
    """The production ``concurrency`` (global and per-tenant run limits), ``run_retries``, tick ``retention``
    and queue (FastQueuedRunCoordinator: a dequeue every 0.25 s, not Dagster's 5 s), no telemetry; SQLite storage
    (Dagster's default) unless ``production_storage``: then the production ``storage:`` block, which reads
    ``DAGSTER_PG_*`` (see ``storage_env``). ``overrides`` replace top-level keys (e.g. ``run_launcher``)."""
    production = yaml.safe_load(PRODUCTION_DAGSTER_YAML.read_text())
    config = {
        **({"storage": production["storage"]} if production_storage else {}),
        "telemetry": {"enabled": False},
        "run_coordinator": production["run_coordinator"],
        "concurrency": production["concurrency"],
        "run_retries": production["run_retries"],
        "retention": production["retention"],
        **(overrides or {}),
    }
    return yaml.safe_dump(config, sort_keys=False)


# `-m pulse_exports.definitions` would name the location after the module; the API launches into "pulse_exports".
_WORKSPACE_YAML = f"""\
load_from:
  - python_module:
      module_name: pulse_exports.definitions
      location_name: {LOCATION}
"""

_REPOSITORIES = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
_DAEMONS = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
_SENSOR = """
query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { jobOriginId sensorState { selectorId status } }
    ... on Error { message }
  }
}
"""
_STOP_SENSOR = """
mutation StopSensor($origin: String, $selector: String) {
  stopSensor(jobOriginId: $origin, jobSelectorId: $selector) {
    __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on Error { message }
  }
}
"""
_RUNS = """
query ExportRuns($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) {
    __typename
    ... on Runs { results { runId status tags { key value } } }
  }
}
"""


def wait_for(
    what: str, check: Callable[[], Any], processes: list[ServiceProcess], timeout: float = 120, every: float = 0.25
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the processes' log tails."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for process in processes:
            if not process.alive():
                pytest.fail(f"{process.name} exited while waiting for {what}:\n{process.log_tail()}")
        try:
            if result := check():
                return result
        except (httpx.HTTPError, ValueError, KeyError) as exc:  # not up yet
            last_error = exc
        time.sleep(every)
    logs = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in processes)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})\n{logs}")


@dataclass
class DagsterServices:
    """A running webserver and daemon, and what the export processes were configured with."""

    home: Path
    ui_url: str
    database_url: str
    storage_url: str
    env: dict[str, str]
    webserver: ServiceProcess
    daemon: ServiceProcess

    @property
    def graphql_url(self) -> str:
        return f"{self.ui_url}/graphql"

    @property
    def processes(self) -> list[ServiceProcess]:
        return [self.webserver, self.daemon]

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(self.graphql_url, json={"query": query, "variables": variables or {}}, timeout=30)
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        return dict(body["data"])

    @contextmanager
    def instance(self) -> Iterator[Any]:
        """The services' Dagster instance, opened in this process (its storage config reads ``DAGSTER_PG_*``)."""
        import dagster as dg
        from dagster._core.instance.ref import InstanceRef

        saved = {key: os.environ.get(key) for key in self.env if key.startswith("DAGSTER_PG_")}
        os.environ.update({key: self.env[key] for key in saved})
        try:
            with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home))) as opened:
                yield opened
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def runs_for_export(self, export_id: str) -> list[dict[str, Any]]:
        tags = [{"key": "pulse/export_id", "value": export_id}]
        return list(self.graphql(_RUNS, {"tags": tags})["runsOrError"]["results"])

    def stop_sensor(self, name: str) -> None:
        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": name}
        sensor = self.graphql(_SENSOR, {"selector": selector})["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        stopped = self.graphql(
            _STOP_SENSOR, {"origin": sensor["jobOriginId"], "selector": sensor["sensorState"]["selectorId"]}
        )["stopSensor"]
        assert stopped["__typename"] == "StopSensorMutationResult", stopped
        assert stopped["instigationState"]["status"] == "STOPPED", stopped

    def _location_loaded(self) -> bool:
        result = self.graphql(_REPOSITORIES)["repositoriesOrError"]
        return any(n["location"]["name"] == LOCATION for n in result.get("nodes", []))

    def _daemons_healthy(self) -> bool:
        statuses = self.graphql(_DAEMONS)["instance"]["daemonHealth"]["allDaemonStatuses"]
        wanted = {"SENSOR", "QUEUED_RUN_COORDINATOR"}
        return wanted <= {s["daemonType"] for s in statuses if s["healthy"]}

    def start(self, timeout: float = 120, stopped_sensors: tuple[str, ...] = ()) -> None:
        """The webserver first: both would create the SQLite storage at once and race on its migrations.
        ``stopped_sensors`` are stopped before the daemon starts, so they never tick."""
        self.webserver.start()
        wait_for("the webserver to load the code location", self._location_loaded, [self.webserver], timeout)
        for name in stopped_sensors:
            self.stop_sensor(name)
        self.daemon.start()
        wait_for("the daemon's sensor and run queue", self._daemons_healthy, self.processes, timeout)


def dagster_env(home: Path, database_url: str, storage_url: str, s3: S3Endpoint) -> dict[str, str]:
    """The environment of the Dagster processes: this test's database, bucket and S3 credentials only."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DAGSTER_", "AWS_"))}
    return {
        **inherited,
        "DAGSTER_HOME": str(home),
        "PULSE_DATABASE_URL": database_url,
        "PULSE_STORAGE_URL": storage_url,
        "PULSE_S3_ENDPOINT_URL": s3.url,
        "AWS_ACCESS_KEY_ID": s3.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
        "AWS_REGION": s3.region_name,
        "AWS_DEFAULT_REGION": s3.region_name,
    }


def storage_env(database_url: str) -> dict[str, str]:
    """``DAGSTER_PG_*`` for the production ``storage:`` block, naming ``database_url``'s database."""
    from urllib.parse import urlsplit

    url = urlsplit(database_url)
    return {
        "DAGSTER_PG_USER": url.username or "postgres",
        "DAGSTER_PG_PASSWORD": url.password or "",
        "DAGSTER_PG_HOST": url.hostname or "127.0.0.1",
        "DAGSTER_PG_PORT": str(url.port or 5432),
        "DAGSTER_PG_DB": url.path.lstrip("/"),
    }


@pytest.fixture(scope="module")
def dagster_storage_url(pg_server_url: str) -> Iterator[str]:
    """An empty database for Dagster's own run, event and schedule storage (the module's webserver and daemon)."""
    from pulse_exports_tests.conftest import temporary_database

    with temporary_database(pg_server_url, "pulse_dg_") as url:
        yield url


def _dagster_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def module_database_url(pg_server_url: str, seeded_template: str) -> Iterator[str]:
    """A seeded database for the whole module: the Dagster processes are started once for it."""
    from pulse_exports_tests.conftest import temporary_database

    with temporary_database(pg_server_url, "pulse_m_", template=seeded_template) as url:
        yield url


@pytest.fixture(scope="module")
def module_storage_url(s3_endpoint: S3Endpoint) -> Iterator[str]:
    client = s3_endpoint.client()
    bucket = f"pulse-m-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/exports"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        if objects := [{"Key": item["Key"]} for item in page.get("Contents", [])]:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="module")
def dagster_services(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    module_database_url: str,
    module_storage_url: str,
    s3_endpoint: S3Endpoint,
    dagster_storage_url: str,
) -> Iterator[DagsterServices]:
    """dagster-webserver and the daemon (`pulse-exports daemon`) on loopback, sharing a temporary DAGSTER_HOME
    with the production PostgreSQL storage (a database of the module's own).

    A test module may set ``STOPPED_SENSORS`` (sensor names): they are stopped before the daemon
    starts, so they never tick (stopping them later races the daemon's first tick).
    ``DAGSTER_ENV`` (a dict) adds variables to the processes' environment, e.g. short heartbeats.
    ``DAGSTER_INSTANCE`` (a dict) replaces top-level keys of dagster.yaml, e.g. ``run_launcher``."""
    home = tmp_path_factory.mktemp("dagster_home")
    overrides = getattr(request.module, "DAGSTER_INSTANCE", None)
    (home / "dagster.yaml").write_text(instance_yaml(overrides, production_storage=True))
    (home / "workspace.yaml").write_text(_WORKSPACE_YAML)
    env = {
        **dagster_env(home, module_database_url, module_storage_url, s3_endpoint),
        **storage_env(dagster_storage_url),
        **getattr(request.module, "DAGSTER_ENV", {}),
    }
    (port,) = _free_ports(1)
    code = ["-w", str(home / "workspace.yaml")]
    webserver = ServiceProcess(
        "dagster-webserver", [_dagster_bin("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), *code], env, home
    )
    # the production daemon (docker-compose): dagster-daemon's daemons with short sensor and queue loops
    daemon = ServiceProcess("dagster-daemon", [_dagster_bin("pulse-exports"), "daemon", *code], env, home)
    services = DagsterServices(
        home, f"http://127.0.0.1:{port}", module_database_url, module_storage_url, env, webserver, daemon
    )
    try:
        services.start(stopped_sensors=tuple(getattr(request.module, "STOPPED_SENSORS", ())))
        yield services
    finally:
        daemon.stop()
        webserver.stop()


@dataclass
class ApiProcess:
    """``pulse-exports serve`` as a process."""

    url: str
    process: ServiceProcess


def post_export(api_url: str, secret: str, **body: Any) -> httpx.Response:
    """``POST /api/v1/exports`` to a running ``pulse-exports serve`` with an API key; the response as it came."""
    return httpx.post(f"{api_url}/api/v1/exports", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=60)


@pytest.fixture(scope="module")
def api_process(dagster_services: DagsterServices) -> Iterator[ApiProcess]:
    """The product API (``pulse-exports serve``) launching runs through the webserver's GraphQL API."""
    (port,) = _free_ports(1)
    env = {
        **dagster_services.env,
        "PULSE_DAGSTER_GRAPHQL_URL": dagster_services.graphql_url,
        "PULSE_DAGSTER_UI_URL": dagster_services.ui_url,
    }
    workdir = dagster_services.home.parent / "api"
    workdir.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "pulse_exports.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = ServiceProcess("pulse-exports-serve", args, env, workdir).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            "the API to answer /health",
            lambda: httpx.get(f"{url}/api/v1/health", timeout=10).status_code == 200,
            [process, *dagster_services.processes],
            timeout=60,
        )
        yield ApiProcess(url, process)
    finally:
        process.stop()
