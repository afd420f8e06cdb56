"""Session fixtures that start a real PostgreSQL and a real S3 server (SeaweedFS) once per test run.

Set ``PULSE_TEST_DATABASE_URL`` (a maintenance database on a server where we may CREATE DATABASE)
or ``PULSE_TEST_S3_ENDPOINT`` (+ ``PULSE_TEST_S3_ACCESS_KEY``/``PULSE_TEST_S3_SECRET_KEY``) to
use servers you already run instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from pulse_exports.embedded import EmbeddedPostgres
from pulse_exports_tests.servers import S3Endpoint, SeaweedS3


def database_url(server_url: str, name: str) -> str:
    """``server_url`` with its database (the URL path) replaced by ``name``."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


@contextmanager
def temporary_database(server_url: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A new database on ``server_url`` (empty, or a copy of ``template``), dropped on exit; its URL."""
    name = f"{prefix}{uuid.uuid4().hex}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create = sql.SQL("{} TEMPLATE {}").format(create, sql.Identifier(template))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(create)
    try:
        yield database_url(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("PULSE_TEST_DATABASE_URL"):
        yield url
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def fresh_database_url(pg_server_url: str) -> Iterator[str]:
    with temporary_database(pg_server_url, "pulse_t_") as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    if url := os.environ.get("PULSE_TEST_S3_ENDPOINT"):
        yield S3Endpoint(
            url,
            os.environ.get("PULSE_TEST_S3_ACCESS_KEY", "any"),
            os.environ.get("PULSE_TEST_S3_SECRET_KEY", "any"),
        )
        return
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> Iterator[str]:
    client = s3_endpoint.client()
    bucket = f"pulse-t-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    yield bucket
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        if objects := [{"Key": item["Key"]} for item in page.get("Contents", [])]:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def s3_storage_url(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/exports"


# Fixtures for export tests live in their own modules; importing them here makes them visible.
# dagster_processes: real dagster-webserver/daemon processes and the API as a process (test_api_dagster.py).
from pulse_exports_tests.dagster_processes import (  # noqa: E402, F401
    api_process,
    dagster_services,
    dagster_storage_url,
    module_database_url,
    module_storage_url,
)
from pulse_exports_tests.export_fixtures import (  # noqa: E402, F401
    dagster_instance,
    exports,
    seeded_database_url,
    seeded_template,
)
