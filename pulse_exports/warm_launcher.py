"""A Dagster run launcher that forks run workers from a warm, pre-imported process (opt-in, dagster.yaml).

Dagster's ``DefaultRunLauncher`` asks the code server to start each run in a new *spawned* Python
process, which imports Dagster, Polars, pyarrow, connectorx and the code location again: ~1.5 s before
a run's first step. ``WarmRunLauncher`` instead starts, on its first launch, one helper process (the
"zygote": ``python -c 'from pulse_exports.warm_launcher import zygote_main; zygote_main()'``) that
imports Dagster's run-worker code, the modules the instance config names and the ``preload`` modules
once, then waits on a socket. For each run it forks; the child leaves the zygote's session
(``setsid``, so it survives a restart of the daemon and is signalled as a group) and runs the run
exactly as ``dagster api execute_run`` does (``_execute_run_command_body``: instance from the daemon's
ref, job reconstructed from the run's ``job_code_origin``, ``core_execute_run``), with Dagster's run
cancellation thread watching for CANCELING, and with its storage connections held for the run
(``instance_storage``). The zygote freezes what the preload built (``gc.freeze``), so no worker's garbage
collector walks it. The zygote answers with the child's pid, which the launcher
stores as run tags (``pulse/worker_pid``, ``pulse/worker_host``, ``pulse/worker_start``) for
``terminate`` (SIGTERM to the worker's group: Dagster's interrupt handling marks the run CANCELED) and
``check_run_worker_health`` (RUNNING while that process lives, else FAILED, so run monitoring fails a
SIGKILLed worker's run on its own). A zygote that died, or whose preloaded code changed on disk, is
replaced on the next launch.

Only for deployments where the process that launches runs (``dagster-daemon`` with the queued run
coordinator) has the code location's Python environment and code, and its run workers may run beside
it: the single image of our Dockerfile / docker-compose and ``make up``. Runs then execute in the
daemon's container, not the code server's. Linux (``/proc``) for the worker's start time; the zygote
stays single-threaded, so ``preload`` modules must not start threads or open connections on import.
A ``preload`` entry ``module:function`` also calls that function, with no arguments, once the module
is imported (``pulse_exports.storage:preload_s3`` parses botocore's S3 models, which every S3 run's
client would otherwise read again); the same rules hold for it.

    run_launcher:
      module: pulse_exports.warm_launcher
      class: WarmRunLauncher
      config: {preload: ["pulse_exports.definitions", "pulse_exports.storage:preload_s3"]}
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import Array, Field
from dagster._config.config_schema import UserConfigSchema
from dagster._core.errors import DagsterLaunchFailedError
from dagster._core.events import EngineEventData
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import ConfigurableClass, serialize_value
from dagster._serdes.config_class import ConfigurableClassData

_log = logging.getLogger(__name__)

PID_TAG = "pulse/worker_pid"
HOST_TAG = "pulse/worker_host"
START_TAG = "pulse/worker_start"  # the process's start time in clock ticks since boot: a reused pid differs

_ZYGOTE_CODE = "from pulse_exports.warm_launcher import zygote_main; zygote_main()"


# --- the run worker's identity ---------------------------------------------------------------------


def _host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> str | None:
    """The process's start time (``/proc/<pid>/stat`` field 22), or None if it is gone or a zombie.
    Without ``/proc`` (not Linux): ``""`` while ``kill(pid, 0)`` succeeds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and ")"
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    except ProcessLookupError:
        return None
    state, start = fields[0], fields[19]
    return None if state in (b"Z", b"X") else start.decode()


@dataclass(frozen=True)
class Worker:
    """Where a run's worker runs, from its run tags."""

    host: str
    pid: int
    start: str

    @classmethod
    def of(cls, run: DagsterRun) -> Worker | None:
        tags = run.tags
        if PID_TAG not in tags:
            return None
        return cls(tags.get(HOST_TAG, ""), int(tags[PID_TAG]), tags.get(START_TAG, ""))

    def tags(self) -> dict[str, str]:
        return {PID_TAG: str(self.pid), HOST_TAG: self.host, START_TAG: self.start}

    @property
    def local(self) -> bool:
        return self.host == _host()

    def alive(self) -> bool:
        """This very process (not a later one with the same pid) still runs. Only meaningful if local."""
        start = process_start(self.pid)
        return start is not None and (start == self.start or not self.start or not start)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


# --- the launcher ---------------------------------------------------------------------------------


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Launches each run in a process forked from a warm zygote that has imported ``preload`` already.

    For the single-image deployment only (see the module docstring): the daemon must run in the code
    location's Python environment. Terminate and health checks signal / look up the worker's pid, so
    they work from processes on the worker's host; elsewhere (a webserver in another container) a
    terminate marks the run CANCELING and the worker's cancellation thread stops it.
    """

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        preload: Sequence[str] = (),
        start_timeout_seconds: float = 120,
    ) -> None:
        self._inst_data = inst_data
        self.preload = list(preload)
        self.start_timeout_seconds = start_timeout_seconds
        self._zygote: _ZygoteClient | None = None
        self._lock = threading.Lock()  # the queued-run daemon may launch from several threads
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        return {
            "preload": Field(
                Array(str),
                is_required=False,
                default_value=[],
                description=(
                    "Modules the zygote imports once (e.g. the code location's definitions module); "
                    "`module:function` also calls that function once after the import."
                ),
            ),
            "start_timeout_seconds": Field(
                float, is_required=False, default_value=120.0, description="How long the zygote may take to import."
            ),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]) -> WarmRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        if run.job_code_origin is None:
            raise DagsterLaunchFailedError(f"Run {run.run_id} has no job code origin to reconstruct the job from.")
        executable = run.job_code_origin.executable_path
        if executable and os.path.realpath(executable) != os.path.realpath(sys.executable):
            self._instance.report_engine_event(
                f"The code location runs {executable}; the warm launcher forks its workers from {sys.executable}.",
                run,
                cls=self.__class__,
            )
        asked = time.perf_counter()
        with self._lock:
            reply = self._fork(run.run_id)
        worker = Worker(_host(), int(reply["pid"]), str(reply["start"]))
        self._instance.add_run_tags(run.run_id, worker.tags())
        self._instance.report_engine_event(
            f"Forked the run worker ({worker}) from the warm launcher's zygote (pid {reply['zygote']}) "
            f"in {1000 * (time.perf_counter() - asked):.0f} ms.",
            run,
            EngineEventData({"pid": str(worker.pid), "zygote_pid": str(reply["zygote"])}),
            cls=self.__class__,
        )

    def _fork(self, run_id: str) -> dict[str, Any]:
        """One fork request; a dead or stale zygote is replaced once (no fork happened in either case)."""
        for attempt in (1, 2):
            if self._zygote is None or not self._zygote.alive():
                self._replace_zygote()
            zygote = self._zygote
            assert zygote is not None
            try:
                reply = zygote.request({"run_id": run_id}, timeout=30)
            except _ZygoteGone as gone:
                self._discard_zygote()
                if gone.before_request and attempt == 1:
                    continue
                raise DagsterLaunchFailedError(f"The warm launcher's zygote failed: {gone}") from gone
            if reply.get("stale"):
                _log.info("Preloaded code changed on disk (%s): starting a new zygote", reply["stale"])
                self._discard_zygote()
                continue
            if "error" in reply:
                raise DagsterLaunchFailedError(f"The warm launcher's zygote could not fork: {reply['error']}")
            return reply
        raise DagsterLaunchFailedError("The warm launcher's zygote was replaced twice in one launch.")

    def _replace_zygote(self) -> None:
        self._discard_zygote()
        self._zygote = _ZygoteClient.start(self.preload, serialize_value(self._instance.get_ref()))
        try:
            ready, frozen = self._zygote.ready(self.start_timeout_seconds)
        except _ZygoteGone as gone:
            self._discard_zygote()
            raise DagsterLaunchFailedError(f"The warm launcher's zygote did not start: {gone}") from gone
        pid = self._zygote.pid
        _log.info("Warm run launcher: zygote pid %s ready in %.2fs (%d objects frozen)", pid, ready, frozen)

    def _discard_zygote(self) -> None:
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()

    def terminate(self, run_id: str) -> bool:
        if not self.has_instance:
            return False
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        worker = Worker.of(run)
        if worker is None or not worker.local:
            # not forked yet, or on another host: the worker's cancellation thread sees CANCELING
            where = "no worker recorded yet" if worker is None else f"the worker is {worker}, not on {_host()}"
            self._instance.report_engine_event(
                f"Run marked CANCELING ({where}): its run worker stops when it next checks the run's status.",
                run,
                cls=self.__class__,
            )
            return True
        if not worker.alive():
            self._instance.report_run_canceled(run, f"The run worker ({worker}) was no longer running.")
            return False
        try:
            os.killpg(worker.pid, signal.SIGTERM)  # the worker leads its own process group (setsid)
        except ProcessLookupError:
            return False
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        worker = Worker.of(run)
        if worker is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, f"Run {run.run_id} has no {PID_TAG} tag.")
        if not worker.local:
            return CheckRunHealthResult(
                WorkerStatus.UNKNOWN, f"The run worker is {worker}; this process runs on {_host()}."
            )
        if worker.alive():
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(worker.pid))
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"The run worker ({worker}) is no longer running: it exited or was killed (e.g. SIGKILL, out of memory).",
            run_worker_id=str(worker.pid),
        )

    def get_run_worker_debug_info(self, run: DagsterRun, include_container_logs: bool | None = True) -> str | None:
        worker = Worker.of(run)
        return None if worker is None else f"Warm run launcher worker: {worker}, started at tick {worker.start}."

    def dispose(self) -> None:
        with self._lock:
            self._discard_zygote()


# --- the launcher's side of the zygote ------------------------------------------------------------


class _ZygoteGone(Exception):
    def __init__(self, message: str, before_request: bool) -> None:
        super().__init__(message)
        self.before_request = before_request


class _ZygoteClient:
    """The zygote process and the launcher's end of its socket (one JSON line per message)."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self.sock = sock
        self._reader = sock.makefile("rb")

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, preload: Sequence[str], instance_ref: str) -> _ZygoteClient:
        ours, theirs = socket.socketpair()  # both ends non-inheritable: the daemon's other children don't hold them
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE_CODE, str(theirs.fileno()), *preload],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,  # stdout/stderr: the daemon's, like the code server's runs
                start_new_session=True,  # a Ctrl-C or SIGTERM to the daemon's group leaves it (and its runs) alone
            )
        finally:
            theirs.close()
        client = cls(process, ours)
        client._send({"instance_ref": instance_ref})
        return client

    def alive(self) -> bool:
        return self.process.poll() is None

    def ready(self, timeout: float) -> tuple[float, int]:
        """Seconds the preload took, and how many objects it left frozen (out of the collector's reach)."""
        reply = self._receive(timeout)
        if "error" in reply:
            raise _ZygoteGone(reply["error"], before_request=True)
        return float(reply["ready"]), int(reply["frozen"])

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            self._send(message)
        except OSError as exc:
            raise _ZygoteGone(f"could not send to pid {self.pid}: {exc}", before_request=True) from exc
        return self._receive(timeout)

    def _send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def _receive(self, timeout: float) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        try:
            line = self._reader.readline()
        except OSError as exc:  # TimeoutError included
            raise _ZygoteGone(f"no answer from pid {self.pid}: {exc!r}", before_request=False) from exc
        if not line:
            raise _ZygoteGone(f"pid {self.pid} exited (code {self.process.poll()})", before_request=False)
        return dict(json.loads(line))

    def close(self) -> None:
        """Closing the socket makes the zygote exit (its run workers keep running)."""
        self._reader.close()
        self.sock.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


# --- the zygote -----------------------------------------------------------------------------------


def zygote_main() -> None:
    """Entry point of the zygote: ``argv`` = socket fd, preload modules. Serves fork requests until EOF."""
    fd, preload = int(sys.argv[1]), sys.argv[2:]
    sock = socket.socket(fileno=fd)
    reader, writer = sock.makefile("rb"), sock.makefile("wb")

    def answer(message: dict[str, Any]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")
        writer.flush()

    started = time.perf_counter()
    try:
        instance_ref = json.loads(reader.readline())["instance_ref"]
        watched = _preload(preload, instance_ref)
    except Exception as exc:  # an import error in preload: the launcher reports it with the run
        answer({"error": f"preload failed: {exc!r}"})
        return
    if threading.active_count() > 1:  # forking a process with threads can deadlock its children
        names = [thread.name for thread in threading.enumerate()]
        answer({"error": f"the preload started threads {names}: the zygote must stay single-threaded"})
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # run workers are reaped by the kernel: no zombies
    # What the preload built lives as long as the zygote: move it out of the collector's reach. Otherwise the
    # first full collection in every worker walks all of it (~0.2-0.35 s with the GIL held, at the start of
    # the extract) and, writing to each object's header, copies ~55 MiB of shared pages into the worker.
    gc.collect()
    gc.freeze()
    answer({"ready": time.perf_counter() - started, "frozen": gc.get_freeze_count()})

    for line in reader:
        run_id = json.loads(line)["run_id"]
        if stale := _changed(watched):
            answer({"stale": stale})
            return
        sys.stdout.flush()  # or every child writes the zygote's buffered output again
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            reader.close()
            writer.close()
            sock.close()
            _worker_main(run_id, instance_ref)  # never returns
        answer({"pid": pid, "start": process_start(pid) or "", "zygote": os.getpid()})


def _preload(modules: Sequence[str], instance_ref: str) -> dict[str, float]:
    """Import what every run worker imports; answer the source files (and mtimes) of the preloaded packages."""
    import dagster._cli.api  # noqa: F401  (the run worker's own code)
    from dagster import Definitions
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes import deserialize_value

    ref = deserialize_value(instance_ref, InstanceRef)
    for data in ref:  # the storage, compute log manager, coordinator... classes the instance will load
        if isinstance(data, ConfigurableClassData):
            importlib.import_module(data.module_name)
    names = []
    for entry in modules:
        name, _, function = entry.partition(":")
        names.append(name)
        module = importlib.import_module(name)
        if function:
            getattr(module, function)()
        for value in vars(module).values():
            if isinstance(value, Definitions):
                value.get_repository_def()  # cached on the object: each child skips building it
    packages = tuple({name.split(".")[0] for name in names})
    files = [
        module.__file__
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in packages and getattr(module, "__file__", None)
    ]
    return {path: os.stat(path).st_mtime for path in files if path and os.path.exists(path)}


def _changed(watched: Mapping[str, float]) -> str | None:
    for path, mtime in watched.items():
        try:
            if os.stat(path).st_mtime != mtime:
                return path
        except FileNotFoundError:
            return path
    return None


def _worker_main(run_id: str, instance_ref: str) -> None:
    """The forked child: its own session, Dagster's signal handling, then the run as ``execute_run`` does."""
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = run_worker(run_id, instance_ref)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_worker(run_id: str, instance_ref: str) -> int:
    """Execute the run like ``dagster api execute_run`` (same functions), plus Dagster's cancellation thread."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._cli.utils import get_instance_for_cli
    from dagster._core.execution.run_cancellation_thread import start_run_cancellation_thread
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes import deserialize_value
    from dagster._utils.interrupts import capture_interrupts, setup_interrupt_handlers

    from pulse_exports.instance_storage import hold_storage_connections

    setup_interrupt_handlers()  # SIGTERM -> SIGINT, as in Dagster's gRPC server and daemon
    with capture_interrupts():
        with get_instance_for_cli(instance_ref=deserialize_value(instance_ref, InstanceRef)) as instance:
            hold_storage_connections(instance)  # every event of the run is a write: one connection, not one each
            # before RUN_START, so run monitoring never sees a STARTED run without them (the launcher's may lag)
            instance.add_run_tags(run_id, Worker(_host(), os.getpid(), process_start(os.getpid()) or "").tags())
            # _execute_run_command_body starts it only for instances that ask; a terminate from another host needs it
            watcher = (
                None if instance.should_start_background_run_thread else start_run_cancellation_thread(instance, run_id)
            )
            try:
                return _execute_run_command_body(run_id, instance, lambda _event: None, set_exit_code_on_failure=False)
            finally:
                if watcher is not None:
                    thread, shutdown = watcher
                    shutdown.set()
                    thread.join(timeout=15)
