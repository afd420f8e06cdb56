"""Fixtures for export tests: a seeded template database cloned per test, a Dagster instance,
and the ExportHarness that ties them to a real S3 bucket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import pytest

from pulse_exports import migrations
from pulse_exports.resources import ExportStorage
from pulse_exports.sample_data import seed_demo
from pulse_exports_tests.exports_harness import ExportHarness
from pulse_exports_tests.servers import S3Endpoint

# Small but real: 3 tenants, 60 devices, 6,000 telemetry rows (tenant-002 holds ~1,800).
SEED = {"tenants": 3, "devices": 60, "telemetry_rows": 6000}


@pytest.fixture(scope="session")
def seeded_template(pg_server_url: str) -> Iterator[str]:
    """A database migrated and seeded once per session, cloned by each test that needs data."""
    from pulse_exports_tests.conftest import temporary_database

    with temporary_database(pg_server_url, "pulse_tpl_") as url:
        migrations.upgrade(url)
        seed_demo(url, **SEED)
        yield urlsplit(url).path.lstrip("/")


@pytest.fixture
def seeded_database_url(pg_server_url: str, seeded_template: str) -> Iterator[str]:
    from pulse_exports_tests.conftest import temporary_database

    with temporary_database(pg_server_url, "pulse_t_", template=seeded_template) as url:
        yield url


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
