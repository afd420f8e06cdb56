"""hold_storage_connections: Dagster's PostgreSQL storage keeps its connections instead of one per query."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import dagster as dg
import psycopg
import pytest

from pulse_exports.instance_storage import hold_storage_connections

from .conftest import temporary_database


@pytest.fixture(scope="module")
def storage_url(pg_server_url: str) -> Iterator[str]:
    with temporary_database(pg_server_url, "pulse_t_dagster_") as url:
        yield url


def _backends(url: str, application_name: str) -> set[int]:
    """The backends connected with ``application_name`` right now."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,))
        return {pid for (pid,) in rows.fetchall()}


def _writes_and_backends(storage_url: str, hold: bool) -> list[set[int]]:
    """Write 10 engine events to a run, noting after each which backends the instance holds open."""
    application_name = f"pulse-test-{uuid.uuid4().hex[:12]}"
    # psycopg2, as dagster.yaml's `scheme: postgresql+psycopg2`
    url = f"{storage_url.replace('postgresql://', 'postgresql+psycopg2://', 1)}?"
    url += urlencode({"application_name": application_name})
    with dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": url}}}) as instance:
        if hold:
            assert hold_storage_connections(instance)
        run = instance.create_run_for_job(dg.GraphDefinition("noop").to_job())
        seen = []
        for i in range(10):
            instance.report_engine_event(f"event {i}", run)
            seen.append(_backends(storage_url, application_name))
        assert len(instance.all_logs(run.run_id)) >= 10  # the writes landed
    return seen


def test_held_storage_writes_through_kept_connections(storage_url: str) -> None:
    seen = _writes_and_backends(storage_url, hold=True)
    # the same backends all along: one per storage (run and event log here; schedule storage is not used)
    assert seen == [seen[0]] * 10 and 1 <= len(seen[0]) <= 3, seen


def test_dagster_postgres_alone_connects_for_each_query(storage_url: str) -> None:
    """Why the daemon and run workers hold theirs: without it no connection outlives its query."""
    assert _writes_and_backends(storage_url, hold=False) == [set()] * 10


def test_sqlite_storage_is_left_as_it_is(tmp_path: Path) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert not hold_storage_connections(instance)
        run = instance.create_run_for_job(dg.GraphDefinition("noop").to_job())
        instance.report_engine_event("still written", run)
        assert len(instance.all_logs(run.run_id)) == 1
