"""Fairness between tenants with real dagster-webserver and dagster-daemon processes, under the production
dagster.yaml's queue limits: ten queued exports of one tenant never run more than two at once, while another
tenant's export starts before that queue has drained."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import yaml

from pulse_exports.catalog import Catalog
from pulse_exports.jobs import TAG_TENANT
from pulse_exports.jobstore import TERMINAL, ExportJob, JobStore
from pulse_exports_tests.dagster_processes import PRODUCTION_DAGSTER_YAML, DagsterServices, wait_for

from .test_api import insert_telemetry

pytestmark = pytest.mark.slow

TENANT_A = "tenant-001"
TENANT_B = "tenant-002"
A_EXPORTS = 10
BULK_ROWS = 20_000  # tenant A's telemetry grows by this much, so each export has rows to count

_RUNS = """
query TenantRuns($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) {
    __typename
    ... on Runs { results { runId status startTime endTime } }
  }
}
"""

_RUN_EVENTS = """
query RunEvents($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events { __typename ... on MessageEvent { timestamp } } }
  }
}
"""


def per_tenant_limit() -> int:
    """The limit the production dagster.yaml puts on each ``pulse/tenant`` value (the test instance uses it)."""
    config = yaml.safe_load(PRODUCTION_DAGSTER_YAML.read_text())
    (limit,) = [
        rule["limit"]
        for rule in config["concurrency"]["runs"]["tag_concurrency_limits"]
        if rule["key"] == TAG_TENANT and rule.get("value") == {"applyLimitPerUniqueValue": True}
    ]
    return int(limit)


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one ending as another starts do not overlap)."""
    spans = list(intervals)
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = current = 0
    for _, step in events:  # at equal times -1 sorts first: ends before starts
        current += step
        most = max(most, current)
    return most


def tenant_runs(services: DagsterServices, tenant: str) -> dict[str, dict[str, Any]]:
    """Dagster's own record of the tenant's export runs: run id -> status, start and end (epoch seconds)."""
    runs = services.graphql(_RUNS, {"tags": [{"key": TAG_TENANT, "value": tenant}]})["runsOrError"]
    assert runs["__typename"] == "Runs", runs
    return {r["runId"]: r for r in runs["results"]}


@dataclass(frozen=True)
class FairnessRun:
    jobs: list[ExportJob]  # tenant A's ten, then tenant B's one, as they ended
    held: dict[str, list[str]]  # tenant -> statuses of its runs while the source table was locked


@pytest.fixture(scope="module")
def fairness_run(dagster_services: DagsterServices) -> FairnessRun:
    """Ten exports of tenant A, then one of tenant B, submitted as export_jobs rows (the sensor launches them)
    while the test holds a lock on ``telemetry``: every started run waits in its plan step, so what the queue
    let start is seen without racing the runs' end. Then the lock goes and the queue runs them all."""
    url = dagster_services.database_url
    insert_telemetry(url, TENANT_A, BULK_ROWS)
    catalog, jobs = Catalog.load(), JobStore(url)
    with psycopg.connect(url) as lock:
        lock.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")  # held until the rollback below
        submitted = []
        for tenant in [TENANT_A] * A_EXPORTS + [TENANT_B]:
            request = catalog.validate(tenant_id=tenant, export_type="telemetry", format="csv")
            job, created = jobs.create(request, created_by="fairness test")
            assert created
            submitted.append(job.id)

        def statuses() -> dict[str, list[str]]:
            return {
                t: sorted(r["status"] for r in tenant_runs(dagster_services, t).values()) for t in (TENANT_A, TENANT_B)
            }

        def limit_reached() -> bool:
            now = statuses()
            return now[TENANT_A].count("STARTED") >= per_tenant_limit() and now[TENANT_B] == ["STARTED"]

        wait_for("tenant A's first runs and tenant B's run to start", limit_reached, dagster_services.processes, 120)
        time.sleep(3)  # six dequeue intervals: time for a run over the limit to start, if the queue let it
        held = statuses()
        lock.rollback()

    def all_ended() -> list[ExportJob] | None:
        rows = [jobs.get(export_id) for export_id in submitted]
        return rows if all(r is not None and r.status in TERMINAL for r in rows) else None  # type: ignore[return-value]

    return FairnessRun(wait_for("every export to end", all_ended, dagster_services.processes, 300, 1), held)


def test_tenant_a_never_runs_more_than_its_limit_at_once(
    dagster_services: DagsterServices, fairness_run: FairnessRun
) -> None:
    limit = per_tenant_limit()
    assert limit == 2
    # While the runs were held, the queue started exactly `limit` of A's and kept the rest queued.
    held_a = fairness_run.held[TENANT_A]
    assert held_a == ["QUEUED"] * (A_EXPORTS - limit) + ["STARTED"] * limit, held_a
    a_jobs = [j for j in fairness_run.jobs if j.tenant_id == TENANT_A]
    assert [(j.status, j.attempts) for j in a_jobs] == [("COMPLETED", 1)] * A_EXPORTS, [j.error for j in a_jobs]
    with psycopg.connect(dagster_services.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry WHERE tenant_id = %s", (TENANT_A,)).fetchone()
    assert row is not None and all(j.row_count == row[0] for j in a_jobs)

    # Dagster's run records: one run per export, and never more than `limit` of them between start and end.
    runs = tenant_runs(dagster_services, TENANT_A)
    assert set(runs) == {j.run_id for j in a_jobs}
    assert all(r["status"] == "SUCCESS" and r["startTime"] and r["endTime"] for r in runs.values()), runs
    run_overlap = max_overlap((r["startTime"], r["endTime"]) for r in runs.values())
    # The jobs' own claim-to-completion times, on the database clock, lie inside their runs.
    job_overlap = max_overlap((j.started_at.timestamp(), j.completed_at.timestamp()) for j in a_jobs)  # type: ignore[union-attr]
    print(f"tenant A: at most {run_overlap} runs and {job_overlap} exports at once")
    assert run_overlap <= limit and job_overlap <= limit  # nor later, once the runs could end


def test_tenant_b_starts_before_tenant_a_queue_drains(
    dagster_services: DagsterServices, fairness_run: FairnessRun
) -> None:
    assert fairness_run.held[TENANT_B] == ["STARTED"]  # started while eight of A's were still queued
    *a_jobs, b_job = fairness_run.jobs
    assert b_job.tenant_id == TENANT_B and b_job.status == "COMPLETED", b_job.error
    assert b_job.created_at > max(j.created_at for j in a_jobs)  # submitted behind all ten
    assert b_job.started_at is not None and b_job.started_at < max(j.started_at for j in a_jobs)  # type: ignore[type-var]

    a_runs, (b_run,) = tenant_runs(dagster_services, TENANT_A), tenant_runs(dagster_services, TENANT_B).values()
    assert b_run["runId"] == b_job.run_id
    assert b_run["startTime"] < max(r["startTime"] for r in a_runs.values())
    # The queue itself: B's run left it ahead of A runs that had been waiting there since before B arrived.
    b = queue_times(dagster_services, b_run["runId"])
    a_queue = [queue_times(dagster_services, run_id) for run_id in a_runs]
    overtaken = [a for a in a_queue if a["enqueued"] < b["enqueued"] and a["dequeued"] > b["dequeued"]]
    print(f"tenant B waited {b['dequeued'] - b['enqueued']:.1f}s in the queue, overtaking {len(overtaken)} A runs")
    assert overtaken, (b, a_queue)


def queue_times(services: DagsterServices, run_id: str) -> dict[str, float]:
    """When the run entered the queue (RunEnqueuedEvent) and left it to be launched (RunStartingEvent)."""
    logs = services.graphql(_RUN_EVENTS, {"runId": run_id})["logsForRun"]
    assert logs["__typename"] == "EventConnection", logs
    times = {e["__typename"]: int(e["timestamp"]) / 1000 for e in logs["events"] if "timestamp" in e}
    return {"enqueued": times["RunEnqueuedEvent"], "dequeued": times["RunStartingEvent"]}
