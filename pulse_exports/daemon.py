"""``pulse-exports daemon``: Dagster's daemon, with its sensor and run-queue loops made short.

``dagster-daemon run`` evaluates sensors at most every 5 s (``MIN_INTERVAL_LOOP_TIME`` in
``dagster._daemon.sensor``) and looks at the run queue in 0.5 s steps (``IntervalDaemon.core_loop``), so an
export inserted straight into ``export_jobs`` waited 0-5 s for ``export_jobs_sensor`` before its run was even
queued, and every queued run waited up to 0.5 s more. This command runs the same daemons on the same instance
and workspace, with two of them replaced by subclasses that only change how long they sleep:

- ``FastSensorDaemon`` runs the sensor iteration every ``sensor_loop_seconds`` (0.5 s). Each sensor still
  ticks no more often than its ``minimum_interval_seconds``; ``export_jobs_sensor`` asks for 1 s.
- ``FastQueueDaemon`` sleeps exactly until its next dequeue, so ``run_coordinator``'s
  ``dequeue_interval_seconds`` may go below 0.5 s (``FastQueuedRunCoordinator``; dagster.yaml says 0.25).

Everything else is ``dagster-daemon run``'s: the daemon types and heartbeats (the UI's daemon status), the
scheduler, run monitoring and retries, the queue's concurrency limits. A deployment that keeps
``dagster-daemon run`` (e.g. Dagster's Helm chart) works unchanged, at Dagster's loop times.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from threading import Event
from typing import Any

from dagster import DagsterInstance
from dagster._core.workspace.context import IWorkspaceProcessContext
from dagster._daemon.controller import create_daemon_of_type
from dagster._daemon.daemon import DagsterDaemon, SensorDaemon, SpanMarker
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster._daemon.sensor import execute_sensor_iteration
from dagster._daemon.utils import DaemonErrorCapture
from dagster._utils.error import serializable_error_info_from_exc_info

DEFAULT_SENSOR_LOOP_SECONDS = 0.5


class FastSensorDaemon(SensorDaemon):
    """Dagster's sensor daemon, evaluating due sensors every ``loop_seconds`` instead of every 5 s."""

    def __init__(self, settings: Any, loop_seconds: float = DEFAULT_SENSOR_LOOP_SECONDS) -> None:
        super().__init__(settings=settings)
        if not loop_seconds > 0:
            raise ValueError(f"the sensor loop must be above 0 s, not {loop_seconds!r}")
        self.loop_seconds = loop_seconds

    def core_loop(self, workspace_process_context: IWorkspaceProcessContext, shutdown_event: Event) -> Iterator[Any]:
        # execute_sensor_iteration_loop with loop_seconds for its fixed 5 s; futures keep a slow
        # threaded tick from being submitted twice, as there.
        tick_futures: dict[str, Future] = {}
        while not shutdown_event.is_set():
            started = time.monotonic()
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
            shutdown_event.wait(max(0.0, self.loop_seconds - (time.monotonic() - started)))
            yield None


class FastQueueDaemon(QueuedRunCoordinatorDaemon):
    """Dagster's run-queue daemon, sleeping exactly until its next dequeue (not in 0.5 s steps)."""

    def core_loop(self, workspace_process_context: IWorkspaceProcessContext, shutdown_event: Event) -> Iterator[Any]:
        while not shutdown_event.is_set():
            started = time.monotonic()
            yield SpanMarker.START_SPAN
            try:
                yield from self.run_iteration(workspace_process_context)
            except Exception:
                error_info = serializable_error_info_from_exc_info(sys.exc_info())
                self._logger.error("Caught error:\n%s", error_info)
                yield error_info
            yield SpanMarker.END_SPAN
            shutdown_event.wait(max(0.0, self.interval_seconds - (time.monotonic() - started)))
            yield None


def pulse_daemons(
    instance: DagsterInstance, sensor_loop_seconds: float = DEFAULT_SENSOR_LOOP_SECONDS
) -> Sequence[DagsterDaemon]:
    """The daemons ``dagster-daemon run`` would start for this instance, the sensor and queue ones made fast."""
    daemons: list[DagsterDaemon] = []
    for daemon_type in instance.get_required_daemon_types():
        if daemon_type == SensorDaemon.daemon_type():
            daemons.append(FastSensorDaemon(instance.get_sensor_settings(), sensor_loop_seconds))
        elif daemon_type == QueuedRunCoordinatorDaemon.daemon_type():
            interval = instance.run_coordinator.dequeue_interval_seconds  # type: ignore[union-attr]
            daemons.append(FastQueueDaemon(interval_seconds=interval))
        else:
            daemons.append(create_daemon_of_type(daemon_type, instance))
    return daemons


def run_daemon(
    workspace_opts: Any, *, sensor_loop_seconds: float, log_level: str = "info", log_format: str = "colored"
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
            with daemon_controller_from_instance(
                instance,
                workspace_load_target=workspace_opts_to_load_target(workspace_opts),
                heartbeat_tolerance_seconds=tolerance,
                gen_daemons=lambda inst: pulse_daemons(inst, sensor_loop_seconds),
                log_level=log_level,
                log_format=log_format,
            ) as controller:
                controller.check_daemon_loop()
    except KeyboardInterrupt:
        return
