"""pulse_exports as the product runs it with the warm run launcher: real services, the API's GraphQL launch.

A ``WarmStack`` is one deployment on loopback, started once per (database, store) and stopped with the
benchmark: ``dagster-webserver`` and ``pulse-exports daemon`` over a temporary ``DAGSTER_HOME`` (run and
event storage in a fresh PostgreSQL database on the benchmark's server, as in production; the production
``concurrency`` limits and ``run_retries``, ``FastQueuedRunCoordinator`` dequeuing every 0.25 s and at once
for the runs the API or the sensor queue,
``run_launcher`` = ``WarmRunLauncher`` preloading ``pulse_exports.definitions`` and botocore's S3
models), one ``dagster code-server`` serving the code location to both, as docker-compose does
(``devstack.dagster_commands``), and the product API (``pulse-exports serve``) launching through the
webserver's GraphQL API. ``export_jobs_sensor`` runs as in production, woken by each new PENDING row and
every 5 s besides (its ticks cost the daemon and code server ~45 ms of CPU each); it cannot race the in-process
ticks of the sensor-model contenders for their rows, because a stack is paused while any other contender runs.

One measurement: ``POST /api/v1/exports`` (the API creates the job and launches its run through
GraphQL), or for a sensor contender an ``export_jobs`` row inserted for the sensor, then ``export_jobs`` is
polled every 20 ms until COMPLETED, while another thread finds the run's forked worker (run tag
``pulse/worker_pid``) and samples its memory until it exits.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.measure import vm_hwm
from pulse_exports.devstack import code_server_ready, daemons_healthy, dagster_commands, grpc_workspace, location_loaded
from pulse_exports.processes import ServiceProcess, signal_group

REPO = Path(__file__).resolve().parent.parent
CODE_SERVER = "dagster-code-server"  # the service pause() leaves running (devstack.dagster_commands names it)
REPOSITORY = "__repository__"
KEY_NAME = "pulse bench"  # the API keys the stacks make; _prepare_database deletes their exports
POLL_SECONDS = 0.02
WARMUP_ROWS = 1_000
WARM_LAUNCHER = {
    "module": "pulse_exports.warm_launcher",
    "class": "WarmRunLauncher",
    "config": {"preload": ["pulse_exports.definitions", "pulse_exports.storage:preload_s3"]},
}


_JOB = (
    "SELECT status, rows_done, started_at, heartbeat_at, completed_at, run_id, row_count, file_size_bytes, error"
    " FROM export_jobs WHERE id = %s"
)


class StackFailed(RuntimeError):
    pass


def instance_yaml(storage_url: str | None = None) -> str:
    """The repository's dagster.yaml: its queue limits and retries, the warm launcher, 0.5 s dequeues, and its
    run/event storage in PostgreSQL at ``storage_url`` like production (SQLite under DAGSTER_HOME without)."""
    production = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config = {
        **({"storage": {"postgres": {"postgres_url": storage_url}}} if storage_url else {}),
        "telemetry": {"enabled": False},
        "run_coordinator": production["run_coordinator"],
        "run_launcher": WARM_LAUNCHER,
        "concurrency": production["concurrency"],
        "run_retries": production["run_retries"],
        "run_monitoring": production["run_monitoring"],
    }
    return yaml.safe_dump(config, sort_keys=False)


def _storage_database(database_url: str, name: str) -> str:
    """A new database ``name`` on ``database_url``'s server for Dagster's storage; its SQLAlchemy URL."""
    from pulse_exports.demo import ensure_database

    # the driver dagster-postgres is written for (dagster.yaml's `scheme`): SQLAlchemy 2.1 would pick psycopg 3
    return ensure_database(database_url, name).replace("postgresql://", "postgresql+psycopg2://", 1)


def _drop_database(database_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except psycopg.Error:  # cleanup: the server may be gone already
        pass


class Service(ServiceProcess):
    """A ServiceProcess whose stop also kills the descendants that left its group (the warm launcher's
    zygote and its run workers call setsid)."""

    def stop(self, grace: float = 10) -> None:
        import psutil

        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True) if self.process else []
        except psutil.Error:
            descendants = []
        super().stop(grace)
        _, alive = psutil.wait_procs(descendants, timeout=5)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass


@dataclass
class WarmStack:
    """webserver + daemon (warm launcher) + API for one database and one store."""

    database_url: str
    storage_url: str
    s3: Any | None  # servers.S3Endpoint for s3:// stores
    tenant: str = "tenant-001"
    home: Path = field(init=False)
    services: list[Service] = field(default_factory=list, init=False)
    api_url: str = ""
    graphql_url: str = ""
    warmed: bool = False
    paused: bool = False
    _key_id: str | None = None
    _client: Any = None
    _instance: Any = None
    _workers: set[int] = field(default_factory=set, init=False)  # forked run workers seen (stopped on close)
    _storage_db: str | None = None  # Dagster's run and event storage: a database of its own on the same server

    def start(self, timeout: float = 240) -> None:
        from pulse_exports.apikeys import ApiKeyStore
        from pulse_exports.client import PulseExportsClient
        from pulse_exports_tests.servers import _free_ports

        self.home = Path(tempfile.mkdtemp(prefix="pulse-bench-warm-"))
        self._storage_db = f"pulse_bench_dagster_{self.home.name.rsplit('-', 1)[-1].lower()}"
        (self.home / "dagster.yaml").write_text(instance_yaml(_storage_database(self.database_url, self._storage_db)))
        env = self._env()
        ui_port, api_port, code_port = _free_ports(3)
        (self.home / "workspace.yaml").write_text(grpc_workspace(code_port))
        ui_url, self.api_url = f"http://127.0.0.1:{ui_port}", f"http://127.0.0.1:{api_port}"
        self.graphql_url = f"{ui_url}/graphql"
        # One code server for the webserver and the daemon, as in production. With a python_module
        # workspace the daemon reloads every 60 s by starting a new code server, which imports the
        # definitions again (~2 s of CPU a minute, taken from whichever contender is running).
        commands = dagster_commands(self.home / "workspace.yaml", ui_port=ui_port, code_port=code_port)
        code_server, webserver, daemon = (Service(name, argv, env, self.home) for name, argv in commands.items())
        api_env = {**env, "PULSE_DAGSTER_GRAPHQL_URL": self.graphql_url, "PULSE_DAGSTER_UI_URL": ui_url}
        serve = [sys.executable, "-m", "pulse_exports.cli", "serve", "--host", "127.0.0.1", "--port", str(api_port)]
        api = Service("pulse-exports-serve", serve, api_env, self.home)
        self.services.append(code_server.start())
        self._wait("the code server to load the definitions", lambda: code_server_ready(code_port), timeout)
        # The webserver first: both would create Dagster's storage tables at once and race on its migrations.
        self.services.append(webserver.start())
        self._wait("the webserver to load the code location", lambda: location_loaded(ui_url), timeout)
        self.services.append(daemon.start())
        self._wait("the daemon's sensors and run queue", lambda: daemons_healthy(ui_url), timeout)
        self.services.append(api.start())
        self._wait("the API", lambda: httpx.get(f"{self.api_url}/api/v1/health", timeout=10).status_code == 200, 60)
        key = ApiKeyStore(self.database_url).create(self.tenant, name=KEY_NAME)
        self._key_id = str(key.key.id)
        self._client = PulseExportsClient(self.api_url, key.secret, timeout=60)

    def _env(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DAGSTER_", "AWS_"))}
        env = {
            **inherited,
            "DAGSTER_HOME": str(self.home),
            "PULSE_DATABASE_URL": self.database_url,
            "PULSE_STORAGE_URL": self.storage_url,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        }
        if self.s3 is not None:
            env |= {
                "PULSE_S3_ENDPOINT_URL": self.s3.url,
                "AWS_ACCESS_KEY_ID": self.s3.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.s3.secret_access_key,
                "AWS_REGION": self.s3.region_name,
                "AWS_DEFAULT_REGION": self.s3.region_name,
            }
        return env

    def _wait(self, what: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive(what)
            try:
                if check():
                    return
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # not up yet (data: null too)
                last = exc
            time.sleep(0.25)
        raise StackFailed(f"timed out after {timeout}s waiting for {what} ({last!r})\n{self.logs()}")

    def check_alive(self, what: str) -> None:
        for service in self.services:
            if not service.alive():
                raise StackFailed(f"{service.name} exited while waiting for {what}:\n{service.log_tail()}")

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log_tail(1500)}" for s in self.services)

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(self.graphql_url, json={"query": query, "variables": variables or {}}, timeout=30)
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise ValueError(body["errors"])
        return dict(body["data"])

    def run_tags(self, run_id: str) -> dict[str, str]:
        """The run's tags, read from the stack's SQLite run storage in this process (no webserver work)."""
        import dagster as dg
        from dagster._core.instance.ref import InstanceRef

        if self._instance is None:
            self._instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home)))
        run = self._instance.get_run_by_id(run_id)
        return dict(run.tags) if run is not None else {}

    def run_events(self, run_id: str) -> dict[str, float]:
        """When the run's first events of each type were written (``time.time()`` clock)."""
        self.run_tags(run_id)  # opens the instance
        firsts: dict[str, float] = {}
        for record in self._instance.all_logs(run_id):
            if record.dagster_event is not None:
                firsts.setdefault(record.dagster_event.event_type_value, record.timestamp)
        return firsts

    def export(
        self, fmt: str, compression: str | None, row_limit: int | None, *, via: str = "api", timeout: float = 1800
    ) -> dict[str, Any]:
        """Submit one export and follow it to COMPLETED; returns the figures (see module doc).

        ``via="api"``: POST /api/v1/exports, which launches the run through GraphQL. ``via="sensor"``: insert
        the ``export_jobs`` row as any producer may, for the daemon's ``export_jobs_sensor``."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row) as conn:
            memory = WorkerMemory(self)
            submitted = time.time()
            if via == "sensor":
                export_id = self._insert_job(fmt, compression, row_limit)
            else:
                created = self._client.create("telemetry", format=fmt, compression=compression, row_limit=row_limit)
                if created.launch != "launched":
                    raise StackFailed(f"the API did not launch the run: {created.launch} ({created.launch_error})")
                export_id = created.export_id
            answered = time.time()
            memory.start()
            try:
                marks = self._follow(conn, export_id, memory, timeout)
            finally:
                memory.finish(timeout=60)
        if memory.pid is not None:
            self._workers.add(memory.pid)
        first_row = min(marks["first_progress_db"], marks["first_progress_seen"])
        events = self.run_events(marks["run_id"])

        def event(name: str) -> float | None:
            return events[name] - submitted if name in events else None

        return {
            "export_id": str(export_id),
            "seconds": marks["completed_seen"] - submitted,
            "completed_db_seconds": marks["completed_db"] - submitted,
            "post_seconds": answered - submitted,
            "dequeued_seconds": event("PIPELINE_STARTING"),  # the daemon took it off the queue and launched it
            "run_start_seconds": event("PIPELINE_START"),  # the forked worker started the run
            "claim_seconds": marks["started_db"] - submitted,
            "first_row_seconds": first_row - submitted,
            "worker_exit_seconds": (memory.exited_at - submitted) if memory.exited_at else None,
            "peak_rss": memory.vm_hwm,
            "peak_private": memory.private,
            "zygote_rss": memory.zygote_rss,
            "worker_pid": memory.pid,
            "bytes": int(marks["file_size_bytes"] or 0),
            "rows": int(marks["row_count"] or 0),
        }

    def _insert_job(self, fmt: str, compression: str | None, row_limit: int | None) -> Any:
        """A PENDING export_jobs row, validated by the catalog as the API would (no launch)."""
        from pulse_exports.catalog import Catalog
        from pulse_exports.jobstore import JobStore

        request = Catalog.load().validate(
            tenant_id=self.tenant, export_type="telemetry", format=fmt, compression=compression, row_limit=row_limit
        )
        job, _ = JobStore(self.database_url).create(request, created_by="bench")
        return job.id

    def _follow(self, conn: Any, export_id: Any, memory: WorkerMemory, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        marks: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = conn.execute(_JOB, (export_id,)).fetchone()
            seen = time.time()
            if job["run_id"] and memory.run_id is None:
                memory.run_id = job["run_id"]
            if job["rows_done"] and "first_progress_db" not in marks:
                # The writer reports progress right after its first batch; heartbeat_at is that UPDATE's time
                # unless a later progress report or heartbeat came before this poll (then it is an upper bound).
                marks["first_progress_db"] = job["heartbeat_at"].timestamp()
                marks["first_progress_seen"] = seen
            if job["status"] == "COMPLETED":
                if "first_progress_db" not in marks:  # done between two polls
                    marks["first_progress_db"] = marks["first_progress_seen"] = job["heartbeat_at"].timestamp()
                return {
                    **marks,
                    "completed_seen": seen,
                    "completed_db": job["completed_at"].timestamp(),
                    "started_db": job["started_at"].timestamp(),
                    "run_id": job["run_id"],
                    "row_count": job["row_count"],
                    "file_size_bytes": job["file_size_bytes"],
                }
            if job["status"] in ("FAILED", "CANCELLED", "EXPIRED"):
                raise StackFailed(f"export {export_id} ended {job['status']}: {job['error']}")
            self.check_alive(f"export {export_id}")
            time.sleep(POLL_SECONDS)
        raise StackFailed(f"export {export_id} not COMPLETED after {timeout}s\n{self.logs()}")

    def pause(self) -> None:
        """SIGSTOP the webserver, the daemon (its zygote too) and the API while a contender that does not
        use this stack is measured: one deployment runs at a time, as in production. The code server
        stays up: it is idle between requests, and its own child would miss its heartbeats."""
        if not self.paused:
            self._signal_services(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> bool:
        """SIGCONT what ``pause`` stopped; whether it was paused."""
        if not self.paused:
            return False
        self._signal_services(signal.SIGCONT)
        self.paused = False
        return True

    def _signal_services(self, signum: int) -> None:
        import psutil

        for service in self.services:
            if service.name == CODE_SERVER or service.process is None:
                continue
            try:
                root = psutil.Process(service.process.pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                try:
                    process.send_signal(signum)
                except psutil.Error:
                    pass

    def close(self) -> None:
        """Stop the API, the daemon (its zygote exits with it) and the webserver, then any run worker left."""
        import shutil

        from pulse_exports.warm_launcher import process_start

        self.resume()  # a stopped process would leave SIGTERM pending until the stop's SIGKILL
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._instance is not None:
            self._instance.dispose()
            self._instance = None
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        for pid in self._workers:  # forked workers are in their own sessions; only an interrupted run is left
            if process_start(pid) is not None:
                signal_group(pid, signal.SIGKILL)
        if self._key_id is not None:
            from pulse_exports.apikeys import ApiKeyStore

            try:
                ApiKeyStore(self.database_url).revoke(self._key_id)
            except Exception:  # cleanup: the database may be gone already
                pass
        shutil.rmtree(self.home, ignore_errors=True)
        if self._storage_db is not None:
            _drop_database(self.database_url, self._storage_db)
            self._storage_db = None


class WorkerMemory(threading.Thread):
    """Finds the run's forked worker from its ``pulse/worker_pid`` tag and samples its memory until it exits.

    ``vm_hwm``: the worker's VmHWM (kernel high-water mark of its resident set, read every 20 ms; the last
    read is within 20 ms of its exit). A forked child's resident set includes the pages it shares with the
    zygote (Dagster, Polars, pyarrow, connectorx, our code: imported once, copy-on-write), so this is the
    same measure as a spawned worker's VmHWM, not the memory each extra run adds. ``private``: the largest
    Private_Clean + Private_Dirty of ``/proc/<pid>/smaps_rollup`` seen (every 100 ms): the pages only this
    worker holds, what each further concurrent run costs. ``zygote_rss``: the zygote's VmRSS, once.
    """

    def __init__(self, stack: WarmStack) -> None:
        super().__init__(daemon=True, name="bench-worker-memory")
        self.stack = stack
        self.run_id: str | None = None
        self.pid: int | None = None
        self.vm_hwm = 0
        self.private = 0
        self.zygote_rss = 0
        self.exited_at: float | None = None
        self.error: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        from pulse_exports.warm_launcher import PID_TAG, START_TAG, process_start

        start = None
        ticks = 0
        while not self._halt.is_set():
            if self.pid is None:
                if self.run_id is not None:
                    try:
                        tags = self.stack.run_tags(self.run_id)
                    except Exception as exc:  # SQLite busy while the daemon writes: try again
                        self.error = repr(exc)
                        tags = {}
                    if PID_TAG in tags:
                        self.pid, start = int(tags[PID_TAG]), tags.get(START_TAG)
                        self.zygote_rss = _zygote_rss(self.pid)
                self._halt.wait(POLL_SECONDS)
                continue
            hwm = vm_hwm(self.pid)
            if ticks % 5 == 0:
                self.private = max(self.private, _private_bytes(self.pid))
            ticks += 1
            now_start = process_start(self.pid)
            if not hwm or now_start is None or (start and now_start != start):
                self.exited_at = time.time()
                return
            self.vm_hwm = max(self.vm_hwm, hwm)
            self._halt.wait(POLL_SECONDS)

    def finish(self, timeout: float) -> None:
        """Wait for the worker to exit (so the next contender runs alone), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            if self.pid is None and time.monotonic() > deadline - timeout + 10:
                break  # its pid never showed up: nothing to wait for
            self.join(0.1)
        self._halt.set()
        if self.is_alive():
            self.join(5)


def _private_bytes(pid: int) -> int:
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return total


def _zygote_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{ppid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        pass
    return 0
