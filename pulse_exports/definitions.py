"""The one place that assembles the code location: jobs, sensors, schedules and resources."""

from __future__ import annotations

import dagster as dg

from pulse_exports.jobs import export_job
from pulse_exports.resources import ExportSettings, ExportStorage, PulseDatabase
from pulse_exports.schedules import purge_job, purge_schedule
from pulse_exports.sensors import export_jobs_sensor, export_run_canceled_sensor, export_run_failure_sensor


def build_definitions(
    database: PulseDatabase | None = None,
    storage: ExportStorage | None = None,
    settings: ExportSettings | None = None,
) -> dg.Definitions:
    """The Definitions, wired from the environment unless resources are given (tests, demo)."""
    return dg.Definitions(
        jobs=[export_job, purge_job],
        sensors=[export_jobs_sensor, export_run_failure_sensor, export_run_canceled_sensor],
        schedules=[purge_schedule],
        resources={
            "database": database or PulseDatabase(url=dg.EnvVar("PULSE_DATABASE_URL")),
            "storage": storage or ExportStorage(url=dg.EnvVar("PULSE_STORAGE_URL")),
            "settings": settings or ExportSettings(),
        },
    )


defs = build_definitions()
