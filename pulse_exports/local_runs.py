"""Run the export sensor and its runs in this process, against a real Dagster instance.

Used by the one-command demo and the tests; in production the daemon does the same work.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from pulse_exports.jobs import exports_partitions
from pulse_exports.sensors import export_jobs_sensor


@dataclass(frozen=True)
class LocalRun:
    export_id: str
    run_id: str
    success: bool


def tick_export_sensor(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    """Evaluate export_jobs_sensor once and register the partitions it asks for."""
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=dict(defs.resources or {})) as context:
        result = export_jobs_sensor(context)
    if not isinstance(result, dg.SensorResult):
        return []
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return [r for r in result.run_requests or [] if isinstance(r, dg.RunRequest)]


def execute_export_run(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest, *, log_level: str = "DEBUG"
) -> LocalRun:
    """Execute one requested export run in process (raising nothing: failures are in the run)."""
    key = request.partition_key
    assert key is not None
    if not instance.has_dynamic_partition(exports_partitions.name, key):
        instance.add_dynamic_partitions(exports_partitions.name, [key])
    result = defs.get_job_def("export_job").execute_in_process(
        instance=instance,
        partition_key=key,
        tags=dict(request.tags),
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        raise_on_error=False,
    )
    return LocalRun(export_id=key, run_id=result.run_id, success=result.success)


def run_pending_exports(
    defs: dg.Definitions, instance: dg.DagsterInstance, *, log_level: str = "DEBUG"
) -> list[LocalRun]:
    """One sensor tick, then each run it requested, in order."""
    return [execute_export_run(defs, instance, r, log_level=log_level) for r in tick_export_sensor(defs, instance)]
