"""FastQueuedRunCoordinator: Dagster's run queue with a sub-second dequeue interval."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, QueuedRunCoordinator
from dagster._core.errors import DagsterInvalidConfigError
from dagster._daemon.controller import create_daemon_of_type
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

from pulse_exports.run_coordinator import FastQueuedRunCoordinator
from pulse_exports_tests.dagster_processes import instance_yaml

REPO = Path(__file__).resolve().parents[1]


def _instance(home: Path, coordinator: dict) -> DagsterInstance:
    config = yaml.safe_load(instance_yaml())
    config["run_coordinator"] = coordinator
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return DagsterInstance.from_config(str(home))


def test_the_daemon_dequeues_at_the_configured_fraction_of_a_second(tmp_path):
    production = yaml.safe_load((REPO / "dagster.yaml").read_text())["run_coordinator"]
    with _instance(tmp_path, production) as instance:
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, FastQueuedRunCoordinator) and isinstance(coordinator, QueuedRunCoordinator)
        assert coordinator.dequeue_interval_seconds == 0.25
        # dagster-daemon's queue daemon gets it too (and sleeps 0.5 s at least); pulse-exports daemon's sleeps 0.25 s
        daemon = create_daemon_of_type(QueuedRunCoordinatorDaemon.daemon_type(), instance)
        assert daemon.interval_seconds == 0.25
        # the tenant limits still come from `concurrency:`, read through the base class
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
        assert {"key": "pulse/tenant", "value": {"applyLimitPerUniqueValue": True}, "limit": 2} in limits


def test_the_interval_defaults_to_half_a_second_and_other_options_pass_through(tmp_path):
    spec = {
        "module": "pulse_exports.run_coordinator",
        "class": "FastQueuedRunCoordinator",
        "config": {"dequeue_use_threads": True, "dequeue_num_workers": 3},
    }
    with _instance(tmp_path, spec) as instance:
        coordinator = instance.run_coordinator
        assert coordinator.dequeue_interval_seconds == 0.5
        assert coordinator.dequeue_use_threads is True and coordinator.dequeue_num_workers == 3


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), ("soon", DagsterInvalidConfigError)])
def test_a_bad_interval_is_refused_naming_the_field(tmp_path, value, error):
    spec = {
        "module": "pulse_exports.run_coordinator",
        "class": "FastQueuedRunCoordinator",
        "config": {"dequeue_interval_seconds": value},
    }
    with pytest.raises(error, match="dequeue_interval_seconds"):
        with _instance(tmp_path, spec) as instance:
            instance.run_coordinator  # noqa: B018  # built lazily
