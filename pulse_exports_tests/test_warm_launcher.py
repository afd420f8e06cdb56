"""WarmRunLauncher: runs forked from a warm zygote, under a real dagster-webserver, dagster-daemon and the API."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import yaml
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher import WorkerStatus
from dagster._serdes import serialize_value

from pulse_exports.apikeys import ApiKeyStore
from pulse_exports.client import PulseExportsClient
from pulse_exports.warm_launcher import (
    HOST_TAG,
    PID_TAG,
    START_TAG,
    WarmRunLauncher,
    _ZygoteClient,
    _ZygoteGone,
    process_start,
)
from pulse_exports_tests.dagster_processes import ApiProcess, DagsterServices, wait_for

from .test_api import insert_telemetry
from .test_export_job import read_rows, source_telemetry

# The snippet deploy/README.md documents for dagster.yaml.
WARM_LAUNCHER = {
    "module": "pulse_exports.warm_launcher",
    "class": "WarmRunLauncher",
    "config": {"preload": ["pulse_exports.definitions", "pulse_exports.storage:preload_s3"]},
}
# The production dagster.yaml with the warm launcher, and run monitoring polling every 2 s instead of 60.
DAGSTER_INSTANCE = {
    "run_launcher": WARM_LAUNCHER,
    "run_monitoring": {
        "enabled": True,
        "start_timeout_seconds": 180,
        "poll_interval_seconds": 2,
        "max_resume_run_attempts": 0,
    },
}
STOPPED_SENSORS = ("export_jobs_sensor",)  # the API launches every run here


def test_the_dagster_yaml_snippet_is_a_valid_instance_config(tmp_path: Path) -> None:
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"run_launcher": WARM_LAUNCHER}))
    ref = InstanceRef.from_dir(str(tmp_path))  # raises DagsterInvalidConfigError on a schema error
    launcher = ref.run_launcher_data.rehydrate(as_type=WarmRunLauncher)
    assert launcher.preload == WARM_LAUNCHER["config"]["preload"] and launcher.supports_check_run_worker_health
    assert not launcher.supports_resume_run  # so dagster.yaml's max_resume_run_attempts: 0 stays right

    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"run_launcher": {**WARM_LAUNCHER, "config": {"x": 1}}}))
    with pytest.raises(dg.DagsterInvalidConfigError, match="x"):  # the class's own schema refuses it
        InstanceRef.from_dir(str(tmp_path)).run_launcher_data.rehydrate(as_type=WarmRunLauncher)


def test_zygote_refuses_threads_and_exits_when_its_preloaded_code_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "warmed"
    (tmp_path / "warm_probe_plain.py").write_text(f"def warm():\n    open({str(marker)!r}, 'w').write('1')\n")
    (tmp_path / "warm_probe_threads.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as test_instance:
        ref = serialize_value(test_instance.get_ref())

    threaded = _ZygoteClient.start(["warm_probe_threads"], ref)
    try:
        with pytest.raises(_ZygoteGone, match="single-threaded"):
            threaded.ready(timeout=60)
        assert threaded.process.wait(timeout=10) == 0
    finally:
        threaded.close()

    zygote = _ZygoteClient.start(["warm_probe_plain:warm"], ref)
    try:
        seconds, frozen = zygote.ready(timeout=60)
        assert seconds > 0
        # Dagster's run-worker code and the instance's classes, frozen: a worker's collections never walk them
        assert frozen > 50_000
        assert marker.read_text() == "1"  # `module:function` called the function once imported
        module = tmp_path / "warm_probe_plain.py"
        os.utime(module, (time.time() + 5, time.time() + 5))
        assert zygote.request({"run_id": "never-forked"}, timeout=30) == {"stale": str(module)}
        assert zygote.process.wait(timeout=10) == 0
    finally:
        zygote.close()


def test_process_start_tells_a_live_process_from_a_dead_one() -> None:
    assert process_start(os.getpid())
    assert process_start(2**22 + 1) is None  # above the kernel's pid_max


# --- real processes -------------------------------------------------------------------------------

TENANT = "tenant-003"


@pytest.fixture(scope="module")
def instance(dagster_services: DagsterServices) -> Iterator[dg.DagsterInstance]:
    """The test's own view of the services' instance (their dagster.yaml and PostgreSQL storage)."""
    with dagster_services.instance() as test_instance:
        yield test_instance


@pytest.fixture(scope="module")
def client(api_process: ApiProcess, dagster_services: DagsterServices) -> Iterator[PulseExportsClient]:
    key = ApiKeyStore(dagster_services.database_url).create(TENANT, name="warm launcher test").secret
    with PulseExportsClient(api_process.url, key) as api_client:
        yield api_client


def run_timings(instance: dg.DagsterInstance, run_id: str, submitted: float) -> dict[str, float]:
    """Seconds from the launch (RUN_STARTING, written before the launcher is called) to the run's events,
    and from ``submitted`` (the API's POST, ``time.time()``) to the first step (the dequeue included)."""
    firsts: dict[str, float] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is not None:
            firsts.setdefault(event.event_type_value, record.timestamp)
    launched = firsts["PIPELINE_STARTING"]
    return {
        "run start": firsts["PIPELINE_START"] - launched,
        "first step": firsts["STEP_START"] - launched,
        "run end": max(firsts.get("PIPELINE_SUCCESS", 0), firsts.get("PIPELINE_FAILURE", 0)) - launched,
        "POST to first step": firsts["STEP_START"] - submitted,
    }


def ended_run(services: DagsterServices, export_id: str) -> dict[str, Any] | None:
    runs = services.runs_for_export(export_id)
    return runs[0] if runs and runs[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None


def running_with_rows(client: PulseExportsClient, export_id: str, rows: int) -> bool:
    export = client.get(export_id)
    assert export.status.value in ("QUEUED", "RUNNING"), export
    return export.status.value == "RUNNING" and export.progress.rows_done >= rows


@pytest.mark.slow
def test_exports_run_in_forked_workers_and_complete_with_the_tenants_rows(
    client: PulseExportsClient, dagster_services: DagsterServices, instance: dg.DagsterInstance
) -> None:
    expected = sorted(source_telemetry(dagster_services.database_url, TENANT))
    pids = set()
    for attempt in range(3):
        submitted = time.time()
        created = client.create("telemetry", format="csv")
        assert created.launch == "launched"
        done = client.wait(created.export_id, timeout=120, interval=0.2)
        assert done.status.value == "COMPLETED", done.error
        export_id = str(created.export_id)
        run = wait_for("the run to end", lambda: ended_run(dagster_services, export_id), [], 30)  # noqa: B023
        assert run["status"] == "SUCCESS"
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert {PID_TAG, HOST_TAG, START_TAG} <= tags.keys()
        pids.add(int(tags[PID_TAG]))
        timings = run_timings(instance, run["runId"], submitted)
        print(f"warm launch {attempt + 1}: " + ", ".join(f"{k} +{v:.2f}s" for k, v in timings.items()))
        assert 0 < timings["run start"] < 60  # a sanity bound only: the machine is shared

        rows = read_rows(httpx.get(client.manifest(created.export_id).parts[0].url).content, "csv", "none")
        assert sorted(int(r["seq"]) for r in rows) == expected
    assert len(pids) == 3  # one forked worker per run
    messages = [
        r.dagster_event.message for r in instance.all_logs(run["runId"], of_type=dg.DagsterEventType.ENGINE_EVENT)
    ]
    assert any("Forked the run worker" in m for m in messages), messages


def zygote_of(instance: dg.DagsterInstance, run_id: str) -> int:
    """The zygote pid in the launcher's "Forked the run worker" engine event."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        if event is not None and "Forked the run worker" in (event.message or ""):
            return int(event.engine_event_data.metadata["zygote_pid"].value)
    raise AssertionError(f"no fork event in run {run_id}")


@pytest.mark.slow
def test_a_killed_zygote_is_replaced_on_the_next_launch(
    client: PulseExportsClient, dagster_services: DagsterServices, instance: dg.DagsterInstance
) -> None:
    zygotes = []
    for _ in range(2):
        created = client.create("telemetry", format="csv")
        done = client.wait(created.export_id, timeout=120, interval=0.2)
        assert done.status.value == "COMPLETED", done.error
        export_id = str(created.export_id)
        run = wait_for("the run to end", lambda: ended_run(dagster_services, export_id), [], 30)  # noqa: B023
        assert run["status"] == "SUCCESS"
        zygotes.append(zygote_of(instance, run["runId"]))
        os.kill(zygotes[-1], signal.SIGKILL)
    assert zygotes[0] != zygotes[1]


@pytest.mark.slow
def test_delete_terminates_the_forked_worker_and_the_run_is_canceled(
    client: PulseExportsClient, dagster_services: DagsterServices, instance: dg.DagsterInstance
) -> None:
    insert_telemetry(dagster_services.database_url, TENANT, 400_000)
    created = client.create("telemetry", format="csv", options={"part_max_rows": 1000})
    export_id = str(created.export_id)
    wait_for("the export to be RUNNING", lambda: running_with_rows(client, export_id, 3000), [], 120, 0.05)
    run = instance.get_run_by_id(client.get(export_id).run_id)
    pid = int(run.tags[PID_TAG])
    assert process_start(pid)

    assert client.cancel(export_id).status.value == "CANCELLED"
    assert wait_for("the run to end", lambda: ended_run(dagster_services, export_id), [], 60)["status"] == "CANCELED"
    assert client.get(export_id).status.value == "CANCELLED"
    assert wait_for("the worker to exit", lambda: process_start(pid) is None, [], 30)


@pytest.mark.slow
def test_a_sigkilled_worker_is_reported_by_the_health_check_and_run_monitoring_fails_its_run(
    client: PulseExportsClient, dagster_services: DagsterServices, instance: dg.DagsterInstance
) -> None:
    insert_telemetry(dagster_services.database_url, TENANT, 400_000)
    created = client.create("telemetry", format="csv", options={"part_max_rows": 1000})
    export_id = str(created.export_id)
    wait_for("the export to be RUNNING", lambda: running_with_rows(client, export_id, 3000), [], 120, 0.05)
    run = instance.get_run_by_id(client.get(export_id).run_id)
    launcher = instance.run_launcher
    assert launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING

    os.kill(int(run.tags[PID_TAG]), signal.SIGKILL)
    health = wait_for(
        "the health check to see the kill",
        lambda: (h := launcher.check_run_worker_health(run)).status == WorkerStatus.FAILED and h,
        [],
        10,
    )
    assert "no longer running" in health.msg

    # the daemon's run monitoring (every 2 s here) asks the same launcher and fails the run
    def failed() -> bool:
        return instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE

    wait_for("run monitoring to fail the run", failed, dagster_services.processes, 60)
    failure = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert failure and "no longer running" in failure[-1].dagster_event.message, failure
    started = time.monotonic()
    # dagster.yaml's run_retries: the retry (forked by the warm launcher too) takes the export over
    done = client.wait(export_id, timeout=180, interval=0.5)
    assert done.status.value == "COMPLETED", done.error
    assert done.run_id != run.run_id
    print(f"retry completed the export {time.monotonic() - started:.1f}s after the failure")
