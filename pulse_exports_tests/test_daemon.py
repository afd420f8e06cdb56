"""``pulse-exports daemon``: Dagster's daemons for the instance, with short sensor and run-queue loops."""

from __future__ import annotations

import itertools
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef
from dagster._daemon.controller import create_daemons_from_instance

from pulse_exports.daemon import DEFAULT_SENSOR_LOOP_SECONDS, FastQueueDaemon, FastSensorDaemon, pulse_daemons
from pulse_exports_tests.dagster_processes import LOCATION, REPOSITORY, DagsterServices, instance_yaml, wait_for

SENSOR = "export_jobs_sensor"


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
        slower = {d.daemon_type(): d for d in pulse_daemons(instance, sensor_loop_seconds=2)}
        assert slower["SENSOR"].loop_seconds == 2  # type: ignore[attr-defined]


def test_a_sensor_loop_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="sensor loop"):
        FastSensorDaemon({}, loop_seconds=0)


@pytest.mark.slow
def test_export_jobs_sensor_ticks_every_second_under_the_real_daemon(dagster_services: DagsterServices) -> None:
    """dagster-daemon evaluates sensors every 5 s at most; ours every 0.5 s, so the sensor's own 1 s
    interval is what spaces its ticks (an export row waits about a second, not up to five)."""
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": SENSOR}

    def five_ticks() -> list[float] | None:
        sensor = dagster_services.graphql(_TICKS, {"selector": selector})["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        assert sensor["sensorState"]["status"] == "RUNNING", sensor
        stamps = sorted(float(t["timestamp"]) for t in sensor["sensorState"]["ticks"])
        return stamps if len(stamps) == 5 else None

    stamps = wait_for("five ticks of export_jobs_sensor", five_ticks, dagster_services.processes, 60, 0.5)
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    assert all(0.9 <= gap < 3 for gap in gaps), gaps  # >= its 1 s interval; dagster-daemon's would be >= 5 s


_TICKS = """
query Ticks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename ... on Sensor { sensorState { status ticks(limit: 5) { timestamp } } } ... on Error { message }
  }
}"""
