"""``pulse-exports daemon``: Dagster's daemon, with its sensor and run-queue loops made short.

``dagster-daemon run`` evaluates sensors at most every 5 s (``MIN_INTERVAL_LOOP_TIME`` in
``dagster._daemon.sensor``) and looks at the run queue in 0.5 s steps (``IntervalDaemon.core_loop``), so an
export inserted straight into ``export_jobs`` waited 0-5 s for ``export_jobs_sensor`` before its run was even
queued, and every queued run waited up to 0.5 s more. This command runs the same daemons on the same instance
and workspace, with two of them replaced by subclasses that only change how long they sleep:

- ``FastSensorDaemon`` LISTENs on ``pulse_export_jobs`` (migration 0006 notifies it when a job becomes
  PENDING) and runs the sensor iteration at once on a notification, then every ``sensor_loop_seconds``
  (0.5 s) for up to 2 s, until ``export_jobs_sensor`` has ticked since the notification (if it ticked just
  before, the next iteration comes as soon as its minimum interval allows); otherwise every
  ``sensor_idle_seconds`` (5 s, Dagster's own loop). Each sensor still ticks
  no more often than its ``minimum_interval_seconds``; ``export_jobs_sensor`` asks for 1 s. So a new export
  starts within a fraction of a second, and an idle deployment does not pay for a sensor tick every second
  (~45 ms of CPU each, in the daemon and the code server). Without a database URL, or while its connection
  is down, the loop runs every ``sensor_loop_seconds``.
- ``FastQueueDaemon`` sleeps exactly until its next dequeue, so ``run_coordinator``'s
  ``dequeue_interval_seconds`` may go below 0.5 s (``FastQueuedRunCoordinator``; dagster.yaml says 0.25).
  A run queued meanwhile wakes it at once: one this process submits (a sensor's, the scheduler's, a retry),
  through ``RUN_QUEUED`` (set by ``FastQueuedRunCoordinator.submit_run``), and one the API launched, through
  ``NOTIFY pulse_runs_queued`` on the sensor daemon's LISTEN connection. Runs launched from the UI wait for
  the interval.

Its instance also holds its storage connections (``instance_storage.hold_storage_connections``): with
dagster-postgres' default of one connection per query, these loops opened ~30 PostgreSQL sessions a second.

Everything else is ``dagster-daemon run``'s: the daemon types and heartbeats (the UI's daemon status), the
scheduler, run monitoring and retries, the queue's concurrency limits. A deployment that keeps
``dagster-daemon run`` (e.g. Dagster's Helm chart) works unchanged, at Dagster's loop times.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from threading import Event
from typing import Any

import psycopg
from dagster import DagsterInstance
from dagster._core.scheduler.instigation import InstigatorType, SensorInstigatorData
from dagster._core.workspace.context import IWorkspaceProcessContext
from dagster._daemon.controller import create_daemon_of_type
from dagster._daemon.daemon import DagsterDaemon, SensorDaemon, SpanMarker
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster._daemon.sensor import execute_sensor_iteration
from dagster._daemon.utils import DaemonErrorCapture
from dagster._utils.error import serializable_error_info_from_exc_info

from pulse_exports.instance_storage import hold_storage_connections
from pulse_exports.jobstore import RUNS_QUEUED_CHANNEL
from pulse_exports.run_coordinator import RUN_QUEUED

DEFAULT_SENSOR_LOOP_SECONDS = 0.5
DEFAULT_SENSOR_IDLE_SECONDS = 5.0
HOT_SECONDS = 2.0  # after a wake-up: export_jobs_sensor may have ticked just before, and is due 1 s after that
EXPORT_SENSOR = "export_jobs_sensor"  # the sensor a NOTIFY is for (pulse_exports.sensors)
NOTIFY_CHANNEL = "pulse_export_jobs"  # migrations/0006_export_jobs_notify.sql
MIN_DEQUEUE_GAP_SECONDS = 0.05  # a burst of wake-ups still leaves this between two dequeues
SHUTDOWN_CHECK_SECONDS = 0.5  # the queue daemon waits for a queued run in steps this long: shutdown stays prompt
RECONNECT_SECONDS = 5.0


class PendingJobsListener:
    """``LISTEN pulse_export_jobs`` (and ``pulse_runs_queued``) on a connection of its own, opened on first use
    and reopened after a failure (at most every 5 s). Used by one thread."""

    def __init__(self, database_url: str, logger: logging.Logger) -> None:
        self._url = database_url
        self._logger = logger
        self._conn: psycopg.Connection[Any] | None = None
        self._next_attempt = 0.0

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a job to become PENDING. Also True (after the wait) while the connection
        is down: the caller cannot know, so it polls. A run queued by the API meanwhile sets ``RUN_QUEUED``."""
        conn = self._connection()
        if conn is None:
            time.sleep(timeout)
            return True
        try:
            for notify in conn.notifies(timeout=timeout):
                if notify.channel == NOTIFY_CHANNEL:
                    return True
                RUN_QUEUED.set()  # RUNS_QUEUED_CHANNEL: the queue daemon dequeues it now
            return False
        except psycopg.Error as exc:
            self._logger.warning("lost the LISTEN connection (%s); polling until it is back", exc)
            self.close()
            return True

    def _connection(self) -> psycopg.Connection[Any] | None:
        if self._conn is None and time.monotonic() >= self._next_attempt:
            self._next_attempt = time.monotonic() + RECONNECT_SECONDS
            try:
                self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
                self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self._conn.execute(f"LISTEN {RUNS_QUEUED_CHANNEL}")
            except psycopg.Error as exc:
                self._logger.warning("cannot LISTEN for new exports (%s); polling every loop", exc)
                self.close()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class FastSensorDaemon(SensorDaemon):
    """Dagster's sensor daemon, woken by new PENDING exports and otherwise evaluating due sensors every
    ``idle_seconds``; without ``database_url``, every ``loop_seconds``."""

    def __init__(
        self,
        settings: Any,
        loop_seconds: float = DEFAULT_SENSOR_LOOP_SECONDS,
        *,
        database_url: str | None = None,
        idle_seconds: float = DEFAULT_SENSOR_IDLE_SECONDS,
    ) -> None:
        super().__init__(settings=settings)
        if not loop_seconds > 0:
            raise ValueError(f"the sensor loop must be above 0 s, not {loop_seconds!r}")
        if not idle_seconds >= loop_seconds:
            raise ValueError(f"the idle sensor loop must be at least the sensor loop, not {idle_seconds!r}")
        self.loop_seconds = loop_seconds
        self.idle_seconds = idle_seconds
        self.database_url = database_url

    def core_loop(self, workspace_process_context: IWorkspaceProcessContext, shutdown_event: Event) -> Iterator[Any]:
        # execute_sensor_iteration_loop with our waits for its fixed 5 s; futures keep a slow
        # threaded tick from being submitted twice, as there.
        tick_futures: dict[str, Future] = {}
        listener = PendingJobsListener(self.database_url, self._logger) if self.database_url else None
        hot_until = 0.0
        woken_at: float | None = None  # wall-clock time of the last wake-up not yet answered by a tick
        try:
            while not shutdown_event.is_set():
                yield from self._iteration(workspace_process_context, tick_futures)
                ended = time.monotonic()
                wait: float | None = self.loop_seconds
                if woken_at is not None:
                    tick = _export_sensor_tick(workspace_process_context.instance)
                    wait = next_look(tick, woken_at, time.time(), self.loop_seconds)
                    if wait is None:  # answered: further ticks would find nothing new
                        hot_until, woken_at = 0.0, None
                idle = listener is not None and ended >= hot_until
                deadline = ended + (self.idle_seconds if idle or wait is None else wait)
                while not shutdown_event.is_set() and (left := deadline - time.monotonic()) > 0:
                    if listener is None:
                        shutdown_event.wait(left)
                    elif listener.wait(min(left, self.loop_seconds)):
                        hot_until, woken_at = time.monotonic() + HOT_SECONDS, time.time()
                        deadline = min(deadline, ended + self.loop_seconds)
                yield None
        finally:
            if listener is not None:
                listener.close()

    def _iteration(
        self, workspace_process_context: IWorkspaceProcessContext, tick_futures: dict[str, Future]
    ) -> Iterator[Any]:
        yield SpanMarker.START_SPAN
        try:
            yield from execute_sensor_iteration(
                workspace_process_context,
                self._logger,
                threadpool_executor=self._threadpool_executor,
                submit_threadpool_executor=self._submit_threadpool_executor,
                sensor_tick_futures=tick_futures,
                instrument_elapsed=self.instrument_elapsed,
            )
        except Exception:
            yield DaemonErrorCapture.process_exception(
                exc_info=sys.exc_info(), logger=self._logger, log_message="SensorDaemon caught an error"
            )
        yield SpanMarker.END_SPAN


def next_look(tick: tuple[float, int] | None, woken_at: float, now: float, loop_seconds: float) -> float | None:
    """After a sensor iteration that followed a wake-up at ``woken_at``: None when ``export_jobs_sensor`` has
    ticked since (``tick``: its last tick and minimum interval), else the seconds until the next iteration:
    the loop's, or less when the sensor may tick again sooner (it ticked just before the wake-up)."""
    if tick is None:
        return loop_seconds
    last, min_interval = tick
    if last >= woken_at:
        return None
    due_in = last + min_interval - now
    return min(loop_seconds, due_in + 0.01) if due_in > 0 else loop_seconds


def _export_sensor_tick(instance: DagsterInstance) -> tuple[float, int] | None:
    """When ``export_jobs_sensor`` last ticked (wall clock, as Dagster counts it for the minimum interval) and
    that interval; None when it cannot be told (no stored state yet, a storage error)."""
    try:
        states = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
    except Exception:
        return None
    for state in states:
        data = state.instigator_data
        if state.instigator_name == EXPORT_SENSOR and isinstance(data, SensorInstigatorData):
            last = max(data.last_tick_timestamp or 0.0, data.last_tick_start_timestamp or 0.0)
            return (last, data.min_interval or 0) if last else None
    return None


class FastQueueDaemon(QueuedRunCoordinatorDaemon):
    """Dagster's run-queue daemon, sleeping exactly until its next dequeue (not in 0.5 s steps), or until a run
    is queued (``RUN_QUEUED``)."""

    def core_loop(self, workspace_process_context: IWorkspaceProcessContext, shutdown_event: Event) -> Iterator[Any]:
        while not shutdown_event.is_set():
            started = time.monotonic()
            RUN_QUEUED.clear()  # a run queued from here on wakes the next dequeue, even during this one
            yield SpanMarker.START_SPAN
            try:
                yield from self.run_iteration(workspace_process_context)
            except Exception:
                error_info = serializable_error_info_from_exc_info(sys.exc_info())
                self._logger.error("Caught error:\n%s", error_info)
                yield error_info
            yield SpanMarker.END_SPAN
            deadline = started + self.interval_seconds
            while not shutdown_event.is_set() and (left := deadline - time.monotonic()) > 0:
                if RUN_QUEUED.wait(min(left, SHUTDOWN_CHECK_SECONDS)):
                    shutdown_event.wait(max(0.0, started + MIN_DEQUEUE_GAP_SECONDS - time.monotonic()))
                    break
            yield None


def pulse_daemons(
    instance: DagsterInstance,
    sensor_loop_seconds: float = DEFAULT_SENSOR_LOOP_SECONDS,
    *,
    database_url: str | None = None,
    sensor_idle_seconds: float = DEFAULT_SENSOR_IDLE_SECONDS,
) -> Sequence[DagsterDaemon]:
    """The daemons ``dagster-daemon run`` would start for this instance, the sensor and queue ones made fast.
    ``database_url`` (export_jobs' database) lets the sensor daemon wait for new exports instead of polling."""
    daemons: list[DagsterDaemon] = []
    for daemon_type in instance.get_required_daemon_types():
        if daemon_type == SensorDaemon.daemon_type():
            settings = instance.get_sensor_settings()
            daemons.append(
                FastSensorDaemon(
                    settings, sensor_loop_seconds, database_url=database_url, idle_seconds=sensor_idle_seconds
                )
            )
        elif daemon_type == QueuedRunCoordinatorDaemon.daemon_type():
            interval = instance.run_coordinator.dequeue_interval_seconds  # type: ignore[union-attr]
            daemons.append(FastQueueDaemon(interval_seconds=interval))
        else:
            daemons.append(create_daemon_of_type(daemon_type, instance))
    return daemons


def run_daemon(
    workspace_opts: Any,
    *,
    sensor_loop_seconds: float,
    database_url: str | None = None,
    sensor_idle_seconds: float = DEFAULT_SENSOR_IDLE_SECONDS,
    log_level: str = "info",
    log_format: str = "colored",
) -> None:
    """``dagster-daemon run`` with ``pulse_daemons``: until interrupted (SIGINT or SIGTERM)."""
    from dagster._cli.utils import get_instance_for_cli
    from dagster._cli.workspace.cli_target import workspace_opts_to_load_target
    from dagster._daemon.controller import DEFAULT_DAEMON_HEARTBEAT_TOLERANCE_SECONDS, daemon_controller_from_instance
    from dagster._utils.interrupts import capture_interrupts, setup_interrupt_handlers

    tolerance = int(os.environ.get("DAGSTER_DAEMON_HEARTBEAT_TOLERANCE") or DEFAULT_DAEMON_HEARTBEAT_TOLERANCE_SECONDS)
    setup_interrupt_handlers()  # SIGTERM -> KeyboardInterrupt, as dagster-daemon
    try:
        with capture_interrupts(), get_instance_for_cli() as instance:
            hold_storage_connections(instance)  # its loops query many times a second: one connection, not one each
            with daemon_controller_from_instance(
                instance,
                workspace_load_target=workspace_opts_to_load_target(workspace_opts),
                heartbeat_tolerance_seconds=tolerance,
                gen_daemons=lambda inst: pulse_daemons(
                    inst, sensor_loop_seconds, database_url=database_url, sensor_idle_seconds=sensor_idle_seconds
                ),
                log_level=log_level,
                log_format=log_format,
            ) as controller:
                controller.check_daemon_loop()
    except KeyboardInterrupt:
        return
