"""The catalog: request validation with errors naming the field, and safe, tenant-scoped SQL."""

from __future__ import annotations

import psycopg
import pytest

from pulse_exports.catalog import Catalog, ExportRequest, ExportRequestError, OperatorTable, QueryPlan

TENANT = "tenant-002"


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.load()


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"export_type": "invoices"}, "export_type"),
        ({"export_type": "devices", "format": "xlsx"}, "format"),
        ({"export_type": "devices", "compression": "brotli"}, "compression"),
        ({"export_type": "devices", "columns": ["device_id", "password"]}, "columns[1]"),
        ({"export_type": "devices", "columns": ["device_id", "device_id"]}, "columns[1]"),
        ({"export_type": "devices", "columns": ['device_id" FROM pg_shadow --']}, "columns[0]"),
        ({"export_type": "devices", "columns": []}, "columns"),
        ({"export_type": "telemetry", "filters": {"time_range": "2w"}}, "filters.time_range"),
        ({"export_type": "telemetry", "filters": {"time_range": "1h; DROP TABLE x"}}, "filters.time_range"),
        ({"export_type": "telemetry", "filters": {"time_from": "yesterday"}}, "filters.time_from"),
        (
            {"export_type": "telemetry", "filters": {"time_from": "2026-02-01T00:00:00Z", "time_to": "2026-01-01"}},
            "filters.time_to",
        ),
        (
            {"export_type": "telemetry", "filters": {"time_range": "24h", "time_from": "2026-01-01"}},
            "filters.time_range",
        ),
        ({"export_type": "telemetry", "filters": {"tenant_id": "tenant-001"}}, "filters.tenant_id"),
        ({"export_type": "telemetry", "filters": {"1=1; --": "x"}}, "filters"),
        ({"export_type": "telemetry", "filters": {"device_ids": [1, 2]}}, "filters.device_ids[0]"),
        ({"export_type": "telemetry", "filters": {"device_ids": []}}, "filters.device_ids"),
        ({"export_type": "telemetry", "filters": {"metric_names": ["temp'); --"]}}, "filters.metric_names[0]"),
        ({"export_type": "devices", "filters": {"time_range": "24h"}}, "filters.time_range"),
        ({"export_type": "alerts", "filters": {"status": ["open\x00"]}}, "filters.status[0]"),
        ({"export_type": "devices", "row_limit": 0}, "row_limit"),
        ({"export_type": "devices", "row_limit": "10"}, "row_limit"),
        ({"export_type": "devices", "options": {"part_max_rows": -1}}, "options.part_max_rows"),
        ({"export_type": "devices", "options": {"shell": "rm -rf"}}, "options.shell"),
        ({"export_type": "devices", "tenant_id": "acme'--"}, "tenant_id"),
    ],
)
def test_bad_requests_are_rejected_naming_the_field(catalog: Catalog, request_fields: dict, field: str) -> None:
    with pytest.raises(ExportRequestError) as error:
        catalog.validate(**{"tenant_id": TENANT, **request_fields})
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")


def test_valid_request_is_normalised(catalog: Catalog) -> None:
    request = catalog.validate(
        tenant_id=TENANT,
        export_type="telemetry",
        format="parquet",
        columns="time, device_id",
        filters={"time_from": "2026-01-01T00:00:00Z", "device_ids": "dev-000001"},
        row_limit=10,
    )
    assert request.compression == "zstd"  # parquet's default codec
    assert request.columns == ("time", "device_id")
    assert request.filters == {"time_from": "2026-01-01T00:00:00+00:00", "device_ids": ["dev-000001"]}


def test_query_is_scoped_to_the_tenant_and_quotes_values(catalog: Catalog, seeded_database_url: str) -> None:
    request = catalog.validate(
        tenant_id=TENANT, export_type="alerts", filters={"device_ids": ["x' OR '1'='1"], "time_range": "7d"}
    )
    with psycopg.connect(seeded_database_url) as conn:
        plan = catalog.plan(conn, request)
        assert '"a"."tenant_id" = \'tenant-002\'' in plan.query
        assert "x'' OR ''1''=''1" in plan.query
        assert conn.execute(plan.query).fetchall() == []
        tenants = conn.execute(
            catalog.plan(conn, catalog.validate(tenant_id=TENANT, export_type="alerts")).query
        ).fetchall()
    assert tenants and plan.columns[0] == "id"


def test_filter_values_with_quotes_braces_and_backslashes_match_exactly(
    catalog: Catalog, seeded_database_url: str
) -> None:
    odd = "a\"b\\c,{d}'e NULL"
    with psycopg.connect(seeded_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO fleet_alert (tenant_id, device_id, alert_type, severity, status)"
            " VALUES (%s, %s, 'tamper', 'info', 'open'), (%s, 'NULL', 'tamper', 'info', 'open')",
            (TENANT, odd, TENANT),
        )
        plan = catalog.plan(
            conn, catalog.validate(tenant_id=TENANT, export_type="alerts", filters={"device_ids": [odd]})
        )
        rows = conn.execute(plan.query).fetchall()
    assert [r[1] for r in rows] == [odd]


def test_telemetry_metrics_become_typed_columns(catalog: Catalog, seeded_database_url: str) -> None:
    with psycopg.connect(seeded_database_url) as conn:
        plan = catalog.plan(conn, catalog.validate(tenant_id=TENANT, export_type="telemetry"))
        assert plan.columns == (
            "time", "device_id", "site_id", "seq", "battery", "humidity", "pressure", "rssi", "temperature", "voltage"
        )  # fmt: skip
        chosen = catalog.plan(
            conn,
            catalog.validate(
                tenant_id=TENANT, export_type="telemetry", columns=["seq"], filters={"metric_names": ["rssi", "nope"]}
            ),
        )
        assert chosen.columns == ("seq", "rssi", "nope")
        row = conn.execute(chosen.query).fetchone()
    assert row is not None and isinstance(row[1], float) and row[2] is None


def _add_late_odd_rows(conn: psycopg.Connection, *metrics: str) -> None:
    """Rows after every seeded one (in time and in the heap): by default a new key, and text in a numeric key."""
    for seq, value in enumerate(metrics or ('{"co2": 410}', '{"rssi": "n/a"}'), start=900001):
        conn.execute(
            "INSERT INTO telemetry (time, tenant_id, device_id, site_id, seq, metrics)"
            " VALUES (now() + interval '1 day', %s, 'dev-late', 'site-0', %s, %s)",
            (TENANT, seq, value),
        )


def _late_sampled_plan(catalog: Catalog, conn: psycopg.Connection, request: ExportRequest) -> QueryPlan:
    # A sample reads whichever rows PostgreSQL finds first; in heap order the new rows could land
    # in free space anywhere. Through the (tenant_id, time) index they come last, outside it.
    conn.execute("SET enable_seqscan = off")
    try:
        return catalog.plan(conn, request, metric_sample_rows=100)
    finally:
        conn.execute("RESET enable_seqscan")


def test_sampled_metric_columns_are_checked_for_missed_keys_and_types(
    catalog: Catalog, seeded_database_url: str
) -> None:
    request = catalog.validate(tenant_id=TENANT, export_type="telemetry")
    with psycopg.connect(seeded_database_url, autocommit=True) as conn:
        exact = catalog.plan(conn, request)
        sampled = catalog.plan(conn, request, metric_sample_rows=100)
        assert not exact.metrics_sampled and exact.unplanned_keys_query is None
        assert sampled.metrics_sampled and sampled.unplanned_keys_query is not None
        assert sampled.columns == exact.columns and sampled.metric_columns == exact.metric_columns
        assert conn.execute(sampled.query).fetchall() == conn.execute(exact.query).fetchall()
        assert conn.execute(sampled.unplanned_keys_query).fetchone() == (False,)
        assert not catalog.plan(conn, request, metric_sample_rows=100_000).metrics_sampled  # the sample is all rows

        _add_late_odd_rows(conn)
        late = _late_sampled_plan(catalog, conn, request)
        assert late.metrics_sampled and "co2" not in late.columns
        assert ("rssi", "double precision") in late.metric_columns and late.unplanned_keys_query is not None
        assert conn.execute(late.unplanned_keys_query).fetchone() == (True,)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):  # "n/a" is no number: no silent NULL
            conn.execute(late.query).fetchall()
        replanned = catalog.plan(conn, request)
        assert "co2" in replanned.columns and ("rssi", "text") in replanned.metric_columns


@pytest.mark.parametrize("late", ['{"rssi": "12"}', '{"rssi": true}', '{"rssi": {"dbm": -70}}'])
def test_the_check_catches_a_value_of_another_json_type_that_the_cast_would_take(
    catalog: Catalog, seeded_database_url: str, late: str
) -> None:
    request = catalog.validate(tenant_id=TENANT, export_type="telemetry")
    with psycopg.connect(seeded_database_url, autocommit=True) as conn:
        _add_late_odd_rows(conn, late)
        sampled = _late_sampled_plan(catalog, conn, request)
        assert ("rssi", "double precision") in sampled.metric_columns and sampled.unplanned_keys_query is not None
        assert conn.execute(sampled.unplanned_keys_query).fetchone() == (True,)
        if late == '{"rssi": "12"}':  # the text cast takes it as 12.0: only the check tells the type changed
            rows = conn.execute(sampled.query).fetchall()
            assert rows[-1][list(sampled.columns).index("rssi")] == 12.0
        assert ("rssi", "double precision") not in catalog.plan(conn, request).metric_columns


def test_named_metric_keys_are_sampled_without_a_check_and_cast_strictly(
    catalog: Catalog, seeded_database_url: str
) -> None:
    request = catalog.validate(tenant_id=TENANT, export_type="telemetry", filters={"metric_names": ["rssi"]})
    with psycopg.connect(seeded_database_url, autocommit=True) as conn:
        _add_late_odd_rows(conn, '{"rssi": "12"}')
        named = _late_sampled_plan(catalog, conn, request)
        assert named.metrics_sampled and named.unplanned_keys_query is None
        assert named.metric_columns == (("rssi", "double precision"),)
        with pytest.raises(psycopg.errors.InvalidParameterValue):  # jsonb -> double precision refuses "12"
            conn.execute(named.query).fetchall()


def test_row_limit_takes_metric_keys_from_the_exported_rows_only(catalog: Catalog, seeded_database_url: str) -> None:
    with psycopg.connect(seeded_database_url, autocommit=True) as conn:
        _add_late_odd_rows(conn)  # last in export order: beyond any small row limit
        limited = catalog.plan(conn, catalog.validate(tenant_id=TENANT, export_type="telemetry", row_limit=50))
        everything = catalog.plan(conn, catalog.validate(tenant_id=TENANT, export_type="telemetry"))
    assert "co2" not in limited.columns and ("rssi", "double precision") in limited.metric_columns
    assert "co2" in everything.columns


def test_operator_table_is_exported_with_columns_from_the_database(seeded_database_url: str) -> None:
    with psycopg.connect(seeded_database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE firmware_updates (tenant_id text, device_id text, version text, at timestamptz)")
        conn.execute(
            "INSERT INTO firmware_updates VALUES ('tenant-002', 'd1', '1.2', now()), ('tenant-001', 'd2', '9', now())"
        )
        tables = OperatorTable.parse_all(
            '[{"name": "firmware_updates", "tenant_column": "tenant_id", "time_column": "at"}]'
        )
        catalog = Catalog.load(conn, tables)
        request = catalog.validate(tenant_id=TENANT, export_type="firmware_updates", filters={"time_range": "1h"})
        rows = conn.execute(catalog.plan(conn, request).query).fetchall()
    assert rows == [("d1", "1.2", rows[0][2])]
    with pytest.raises(ExportRequestError) as error:
        catalog.validate(tenant_id=TENANT, export_type="firmware_updates", columns=["tenant_id"])
    assert error.value.field == "columns[0]"


@pytest.mark.parametrize(
    "config",
    [
        "not json",
        '{"name": "x"}',
        '[{"name": "x; drop", "tenant_column": "t"}]',
        '[{"name": "x", "tenant_column": "t", "colour": "red"}]',
    ],
)
def test_bad_operator_table_config_is_refused(config: str) -> None:
    with pytest.raises(ValueError, match="PULSE_EXPORT_TABLES"):
        OperatorTable.parse_all(config)


def test_catalog_description_lists_types_columns_and_filters(catalog: Catalog) -> None:
    described = {t["name"]: t for t in catalog.describe()}
    assert set(described) == {"devices", "alerts", "telemetry"}
    assert "time_range" in described["telemetry"]["filters"] and "metric_names" in described["telemetry"]["filters"]
    assert described["alerts"]["formats"] == ["csv", "json", "ndjson", "parquet"]
