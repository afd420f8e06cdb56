"""``pulse-exports daemon``: Dagster's daemons for the instance, with short sensor and run-queue loops."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from dagster._core.instance.ref import InstanceRef
from dagster._daemon.controller import create_daemons_from_instance

from pulse_exports import migrations
from pulse_exports.apikeys import ApiKeyStore
from pulse_exports.catalog import Catalog
from pulse_exports.daemon import (
    DEFAULT_SENSOR_IDLE_SECONDS,
    DEFAULT_SENSOR_LOOP_SECONDS,
    FastQueueDaemon,
    FastSensorDaemon,
    PendingJobsListener,
    next_look,
    pulse_daemons,
)
from pulse_exports.jobstore import JobStore
from pulse_exports.run_coordinator import RUN_QUEUED
from pulse_exports_tests.dagster_processes import (
    LOCATION,
    PRODUCTION_DAGSTER_YAML,
    REPOSITORY,
    ApiProcess,
    DagsterServices,
    instance_yaml,
    post_export,
    wait_for,
)

SENSOR = "export_jobs_sensor"
# The services of this module look at the run queue every 10 minutes: a run that starts within seconds was
# dequeued because it woke the queue daemon.
SLOW_DEQUEUE_SECONDS = 600.0
_coordinator = yaml.safe_load(PRODUCTION_DAGSTER_YAML.read_text())["run_coordinator"]
DAGSTER_INSTANCE = {"run_coordinator": {**_coordinator, "config": {"dequeue_interval_seconds": SLOW_DEQUEUE_SECONDS}}}


def test_the_same_daemons_as_dagster_daemon_with_the_sensor_and_queue_ones_fast(tmp_path: Path) -> None:
    (tmp_path / "dagster.yaml").write_text(instance_yaml())  # the production queue, retries and retention
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path))) as instance:
        ours, stock = pulse_daemons(instance), create_daemons_from_instance(instance)
        assert [d.daemon_type() for d in ours] == [d.daemon_type() for d in stock]
        by_type = {d.daemon_type(): d for d in ours}
        sensor, queue = by_type["SENSOR"], by_type["QUEUED_RUN_COORDINATOR"]
        assert isinstance(sensor, FastSensorDaemon) and sensor.loop_seconds == DEFAULT_SENSOR_LOOP_SECONDS
        # dagster.yaml's dequeue interval, which dagster-daemon's 0.5 s sleeps would round up
        assert isinstance(queue, FastQueueDaemon) and queue.interval_seconds == 0.25
        assert sensor.idle_seconds == DEFAULT_SENSOR_IDLE_SECONDS and sensor.database_url is None
        slower = {
            d.daemon_type(): d
            for d in pulse_daemons(
                instance, sensor_loop_seconds=2, database_url="postgresql://db/x", sensor_idle_seconds=9
            )
        }
        assert isinstance(fast := slower["SENSOR"], FastSensorDaemon)
        assert (fast.loop_seconds, fast.idle_seconds, fast.database_url) == (2, 9, "postgresql://db/x")


def test_a_sensor_loop_of_zero_or_an_idle_loop_below_it_is_refused() -> None:
    with pytest.raises(ValueError, match="sensor loop"):
        FastSensorDaemon({}, loop_seconds=0)
    with pytest.raises(ValueError, match="idle sensor loop"):
        FastSensorDaemon({}, loop_seconds=1, idle_seconds=0.5)


def test_after_a_wake_up_the_sensor_loop_looks_again_until_export_jobs_sensor_has_ticked() -> None:
    woken = 1000.0
    assert next_look((woken + 0.01, 1), woken, woken + 0.1, 0.5) is None  # it ticked since: back to idle
    # it ticked just before the wake-up: look again as soon as it may tick, or after the loop if that is sooner
    assert next_look((woken - 0.7, 1), woken, woken + 0.1, 0.5) == pytest.approx(0.21)  # due at woken + 0.3
    assert next_look((woken - 0.3, 1), woken, woken + 0.1, 0.5) == 0.5  # due at woken + 0.7
    assert next_look((woken - 9.0, 1), woken, woken + 0.1, 0.5) == 0.5  # due long ago (stopped? a tick in flight)
    assert next_look(None, woken, woken + 0.1, 0.5) == 0.5  # no stored state yet


def test_the_listener_wakes_on_a_new_pending_export_and_polls_when_it_cannot_listen(fresh_database_url: str) -> None:
    migrations.upgrade(fresh_database_url)
    logger = logging.getLogger("test")
    listener = PendingJobsListener(fresh_database_url, logger)
    try:
        assert listener.wait(0.2) is False  # connected, nothing new
        request = Catalog.load().validate(tenant_id="tenant-001", export_type="devices", format="csv")
        threading.Timer(0.2, JobStore(fresh_database_url).create, (request,)).start()
        started = time.monotonic()
        assert listener.wait(5) is True and time.monotonic() - started < 2  # woken by the insert, not the timeout
        launched, _ = JobStore(fresh_database_url).create(request, queued=True)  # launched by its creator
        RUN_QUEUED.clear()
        assert listener.wait(0.3) is False and not RUN_QUEUED.is_set()  # not the sensor's, and no run yet
        JobStore(fresh_database_url).mark_launched(launched.id, "run-1")  # its run is in Dagster's queue
        assert listener.wait(0.5) is False  # the sensor stays asleep ...
        assert RUN_QUEUED.is_set()  # ... and the queue daemon dequeues now
    finally:
        RUN_QUEUED.clear()
        listener.close()
    down = PendingJobsListener("postgresql://nobody@127.0.0.1:1/none", logger)
    started = time.monotonic()
    assert down.wait(0.2) is True and time.monotonic() - started >= 0.2  # cannot know: the caller polls


@pytest.mark.slow
def test_export_jobs_sensor_idles_at_five_seconds_and_wakes_for_a_new_export(dagster_services: DagsterServices) -> None:
    """dagster-daemon evaluates sensors every 5 s; ours too while nothing arrives, but a new PENDING row
    (its NOTIFY) has export_jobs_sensor tick within its 1 s interval, not up to five seconds later."""
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": SENSOR}

    def ticks(count: int) -> list[float] | None:
        sensor = dagster_services.graphql(_TICKS, {"selector": selector})["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        assert sensor["sensorState"]["status"] == "RUNNING", sensor
        stamps = sorted(float(t["timestamp"]) for t in sensor["sensorState"]["ticks"])
        return stamps if len(stamps) >= count else None

    idle = wait_for("three idle ticks of export_jobs_sensor", lambda: ticks(3), dagster_services.processes, 60, 0.5)
    gaps = [later - earlier for earlier, later in itertools.pairwise(idle[-3:])]
    assert all(4 <= gap < 8 for gap in gaps), gaps  # the idle loop; a 1 s poll would tick every second

    # insert 1.2 s after an idle tick: the sensor's 1 s interval has passed, the next idle tick is ~4 s away
    def first_tick_after(moment: float, what: str) -> float:
        later = lambda: [s for s in ticks(1) or [] if s > moment] or None  # noqa: E731
        return wait_for(what, later, dagster_services.processes, 15, 0.1)[0]

    time.sleep(max(0.0, first_tick_after(idle[-1], "the next idle tick") + 1.2 - time.time()))
    request = Catalog.load().validate(tenant_id="tenant-001", export_type="devices", format="csv")
    inserted = time.time()
    job, _ = JobStore(dagster_services.database_url).create(request, created_by="daemon test")
    woken = first_tick_after(inserted, "a tick after the insert") - inserted
    assert woken < 1.5, woken  # woken: within the sensor loop, not the idle loop

    def requested() -> str | None:  # the tick is stored when it starts; its evaluation marks the job QUEUED
        with psycopg.connect(dagster_services.database_url) as conn:
            row = conn.execute("SELECT status FROM export_jobs WHERE id = %s", (job.id,)).fetchone()
        return row[0] if row and row[0] != "PENDING" else None

    wait_for("the woken tick to request the export's run", requested, dagster_services.processes, 5, 0.1)
    # Answered by that tick, the daemon goes back to its idle loop: no more ticks for the next few seconds
    # (it used to stay on the 0.5 s loop for 2 s, and the 1 s sensor ticked again once or twice, for nothing).
    time.sleep(max(0.0, inserted + 3.5 - time.time()))
    after = [stamp for stamp in ticks(1) or [] if stamp > inserted]
    assert len(after) == 1, [round(stamp - inserted, 2) for stamp in after]


@pytest.mark.slow
def test_a_queued_run_wakes_the_queue_daemon_from_the_sensor_and_from_the_api(
    dagster_services: DagsterServices, api_process: ApiProcess
) -> None:
    """With the queue looked at every 10 minutes, runs still start at once: the sensor's submit wakes the queue
    daemon in its own process, the API's launch through its NOTIFY."""

    def leaves_the_queue(export_id: str) -> str:
        def started() -> list[str] | None:
            statuses = [run["status"] for run in dagster_services.runs_for_export(export_id)]
            waiting = {"NOT_STARTED", "QUEUED"}  # a sensor's run is created, then submitted to the queue
            return statuses if statuses and not waiting.intersection(statuses) else None

        return wait_for(f"the run of {export_id} to leave the queue", started, dagster_services.processes, 30, 0.2)[0]

    request = Catalog.load().validate(tenant_id="tenant-002", export_type="devices", format="csv")
    by_sensor, _ = JobStore(dagster_services.database_url).create(request, created_by="daemon test")
    assert leaves_the_queue(str(by_sensor.id)) in ("STARTING", "STARTED", "SUCCESS")
    # Only now: a dequeue for the sensor's run must not be what starts the API's.
    secret = ApiKeyStore(dagster_services.database_url).create("tenant-002", name="daemon test").secret
    posted = post_export(api_process.url, secret, export_type="devices", format="csv")
    assert posted.status_code == 202, posted.text
    assert posted.json()["launch"] == "launched"
    assert leaves_the_queue(posted.json()["export_id"]) in ("STARTING", "STARTED", "SUCCESS")


_TICKS = """
query Ticks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename ... on Sensor { sensorState { status ticks(limit: 5) { timestamp } } } ... on Error { message }
  }
}"""
