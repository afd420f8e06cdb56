"""A snapshot of the code location: job, sensor and schedule names, partitions and cron strings."""

from __future__ import annotations

import dagster as dg

from pulse_exports.definitions import defs


def test_definitions_snapshot() -> None:
    repo = defs.get_repository_def()
    assert {j.name for j in repo.get_all_jobs()} - {"__ASSET_JOB"} == {"export_job", "purge_job"}
    sensors = {s.name: s for s in repo.sensor_defs}
    assert sorted(sensors) == [
        "export_callbacks_sensor",
        "export_jobs_sensor",
        "export_reconciler_sensor",
        "export_run_canceled_sensor",
        "export_run_failure_sensor",
        "export_schedules_sensor",
    ]
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in sensors.values())
    (schedule,) = repo.schedule_defs
    assert (schedule.name, schedule.cron_schedule, schedule.job_name) == (
        "purge_job_schedule",
        "0 * * * *",
        "purge_job",
    )
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_export_job_is_partitioned_by_export_id_and_runs_in_one_process() -> None:
    job = defs.get_job_def("export_job")
    assert isinstance(job.partitions_def, dg.DynamicPartitionsDefinition)
    assert job.partitions_def.name == "exports"
    assert job.executor_def.name == "in_process"
    assert [n.name for n in job.graph.nodes_in_topological_order] == [
        "claim_export", "plan_export", "extract_and_write", "finish_export"
    ]  # fmt: skip


def test_resources_read_configuration_from_the_environment() -> None:
    """The database and storage URLs are EnvVars: resolved at run time, never shown in the UI."""
    resources = defs.resources or {}
    assert set(resources) == {"database", "storage", "settings", "callbacks"}
    assert resources["database"].url == dg.EnvVar("PULSE_DATABASE_URL")
    assert resources["storage"].url == dg.EnvVar("PULSE_STORAGE_URL")
