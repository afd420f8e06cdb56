"""The one place that assembles the code location: jobs, sensors, schedules and resources."""

from __future__ import annotations

import warnings

import dagster as dg

from pulse_exports.jobs import export_job
from pulse_exports.resources import CallbackSettings, ExportSettings, ExportStorage, PulseDatabase
from pulse_exports.schedules import purge_job, purge_schedule
from pulse_exports.sensors import (
    export_callbacks_sensor,
    export_jobs_sensor,
    export_reconciler_sensor,
    export_run_canceled_sensor,
    export_run_failure_sensor,
    export_schedules_sensor,
)

# Dagster 1.13 reports `owners` as a beta parameter whenever Definitions attaches resources to a sensor
# (SensorDefinition.with_attributes passes the sensor's empty owners on). No sensor here sets owners.
warnings.filterwarnings("ignore", "Parameter `owners` of initializer `SensorDefinition", dg.BetaWarning)


def build_definitions(
    database: PulseDatabase | None = None,
    storage: ExportStorage | None = None,
    settings: ExportSettings | None = None,
    callbacks: CallbackSettings | None = None,
) -> dg.Definitions:
    """The Definitions, wired from the environment unless resources are given (tests, demo)."""
    return dg.Definitions(
        jobs=[export_job, purge_job],
        sensors=[
            export_jobs_sensor,
            export_run_failure_sensor,
            export_run_canceled_sensor,
            export_reconciler_sensor,
            export_callbacks_sensor,
            export_schedules_sensor,
        ],
        schedules=[purge_schedule],
        resources={
            "database": database or PulseDatabase(url=dg.EnvVar("PULSE_DATABASE_URL")),
            "storage": storage or ExportStorage(url=dg.EnvVar("PULSE_STORAGE_URL")),
            "settings": settings or ExportSettings.from_env(),
            "callbacks": callbacks or CallbackSettings(),
        },
    )


defs = build_definitions()
