"""Fixtures for export tests: a seeded template database cloned per test, a Dagster instance,
and the ExportHarness that ties them to a real S3 bucket."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from pulse_exports import migrations
from pulse_exports.resources import ExportStorage
from pulse_exports.sample_data import seed_demo
from pulse_exports_tests.exports_harness import ExportHarness
from pulse_exports_tests.servers import S3Endpoint

# Small but real: 3 tenants, 60 devices, 6,000 telemetry rows (tenant-002 holds ~1,800).
SEED = {"tenants": 3, "devices": 60, "telemetry_rows": 6000}


def _database_url(server_url: str, name: str) -> str:
    from pulse_exports_tests.conftest import database_url

    return database_url(server_url, name)


@pytest.fixture(scope="session")
def seeded_template(pg_server_url: str) -> Iterator[str]:
    """A database migrated and seeded once per session, cloned by each test that needs data."""
    name = f"pulse_tpl_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _database_url(pg_server_url, name)
    migrations.upgrade(url)
    seed_demo(url, **SEED)
    yield name
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def seeded_database_url(pg_server_url: str, seeded_template: str) -> Iterator[str]:
    name = f"pulse_t_{uuid.uuid4().hex}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(seeded_template))
        )
    yield _database_url(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# In-process runs capture their compute logs with `tail -F` subprocesses, and on a loaded machine
# Dagster's clean-up of those waited 2 x 30 s for them (a run that had ended took a minute to return).
# These tests read runs and events, never compute logs.
NO_COMPUTE_LOGS = {
    "compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
}


@pytest.fixture
def dagster_instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=NO_COMPUTE_LOGS) as instance:
        yield instance


def s3_storage(endpoint: S3Endpoint, storage_url: str) -> ExportStorage:
    return ExportStorage(
        url=storage_url,
        endpoint_url=endpoint.url,
        access_key_id=endpoint.access_key_id,
        secret_access_key=endpoint.secret_access_key,
        region_name=endpoint.region_name,
    )


@pytest.fixture
def exports(
    seeded_database_url: str, s3_endpoint: S3Endpoint, s3_storage_url: str, dagster_instance: dg.DagsterInstance
) -> ExportHarness:
    return ExportHarness(
        database_url=seeded_database_url,
        storage=s3_storage(s3_endpoint, s3_storage_url),
        instance=dagster_instance,
    )
