"""Dagster's run queue, dequeuing several times a second.

``QueuedRunCoordinator`` takes ``dequeue_interval_seconds`` as whole seconds (5 by default), and every
run the API launches through GraphQL waits in the queue for up to that long before the daemon starts it:
on average half the interval, which alone was half of the < 1 s "POST to first row" budget. This
subclass accepts a fractional interval (dagster.yaml: 0.25 s). ``dagster-daemon run``'s loop sleeps in
0.5 s steps between iterations (``IntervalDaemon.core_loop``), so under it 0.5 s is the shortest interval
that takes effect; ``pulse-exports daemon`` (``pulse_exports.daemon.FastQueueDaemon``) sleeps exactly the
interval. An iteration is one query of the queued runs, cheap at that rate. Everything else (the tenant
limits under ``concurrency:``) is Dagster's unchanged.

Under ``pulse-exports daemon`` a queued run need not wait for the next dequeue: ``submit_run`` sets
``RUN_QUEUED`` in the process that queued it (the daemon itself, for the runs its sensors request), and the
API's launches reach the daemon as ``NOTIFY pulse_runs_queued`` (``JobStore.mark_launched``); either wakes
``FastQueueDaemon`` at once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from dagster import DagsterRun, Field, QueuedRunCoordinator
from dagster._config.config_schema import UserConfigSchema
from dagster._core.run_coordinator import SubmitRunContext
from dagster._serdes.config_class import ConfigurableClassData

DEFAULT_DEQUEUE_INTERVAL_SECONDS = 0.5
# Set when this process queues a run, or when pulse-exports daemon hears that another one did; FastQueueDaemon
# clears it before each dequeue.
RUN_QUEUED = threading.Event()


class FastQueuedRunCoordinator(QueuedRunCoordinator):
    """``QueuedRunCoordinator`` whose ``dequeue_interval_seconds`` may be a fraction (default 0.5 s)."""

    def __init__(self, *args: Any, dequeue_interval_seconds: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        interval = DEFAULT_DEQUEUE_INTERVAL_SECONDS if dequeue_interval_seconds is None else dequeue_interval_seconds
        if not interval > 0:
            raise ValueError(f"run_coordinator.config.dequeue_interval_seconds must be above 0, not {interval!r}")
        self._dequeue_interval = float(interval)

    @property
    def dequeue_interval_seconds(self) -> float:  # type: ignore[override]  # int in the base class
        return self._dequeue_interval

    def submit_run(self, context: SubmitRunContext) -> DagsterRun:
        run = super().submit_run(context)
        RUN_QUEUED.set()
        return run

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        fields = dict(super().config_type())  # type: ignore[arg-type]
        fields["dequeue_interval_seconds"] = Field(
            float,
            is_required=False,
            default_value=DEFAULT_DEQUEUE_INTERVAL_SECONDS,
            description=(
                "Seconds between the daemon's looks at the run queue; fractions allowed "
                "(dagster-daemon rounds them up to 0.5 s, pulse-exports daemon does not)."
            ),
        )
        return fields

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> FastQueuedRunCoordinator:
        options = {key: value for key, value in config_value.items() if key != "dequeue_interval_seconds"}
        return cls(
            inst_data=inst_data, dequeue_interval_seconds=config_value.get("dequeue_interval_seconds"), **options
        )
