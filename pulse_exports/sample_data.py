"""The sample product schema and a fast, deterministic generator of demo data (all in SQL)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources

import psycopg

SCHEMA_SQL = resources.files(__package__).joinpath("sql/sample_schema.sql")


@dataclass(frozen=True)
class SeedResult:
    tenants: int
    devices: int
    alerts: int
    telemetry_rows: int
    seconds: float


def tenant_name(number: int) -> str:
    """The tenant id of the n-th sample tenant (1-based)."""
    return f"tenant-{number:03d}"


def create_schema(database_url: str) -> None:
    """Create the sample product tables if they do not exist."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL.read_text(encoding="utf-8"))  # type: ignore[arg-type]


def is_seeded(database_url: str) -> bool:
    with psycopg.connect(database_url) as conn:
        exists = conn.execute("SELECT to_regclass('tenants') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return False
        row = conn.execute("SELECT EXISTS (SELECT 1 FROM tenants)").fetchone()
        return bool(row and row[0])


def seed_demo(
    database_url: str,
    *,
    tenants: int = 3,
    devices: int = 300,
    telemetry_rows: int = 200_000,
    big_tenant_share: float | None = None,
    days: int = 30,
) -> SeedResult:
    """Replace the sample data: ``tenants`` tenants, ``devices`` devices spread over them, alerts,
    and ``telemetry_rows`` rows over ``days`` days with 4-6 numeric metrics each.

    The first tenant holds ``big_tenant_share`` of the telemetry (default 0.4 with several
    tenants), as large tenants do. Everything is generated with generate_series in the server.
    """
    if tenants < 1 or devices < tenants or telemetry_rows < 0:
        raise ValueError("need tenants >= 1, devices >= tenants and telemetry_rows >= 0")
    share = big_tenant_share if big_tenant_share is not None else (0.4 if tenants > 1 else 1.0)
    big_rows = telemetry_rows if tenants == 1 else int(telemetry_rows * share)
    per_tenant = devices // tenants
    params = {
        "t": tenants,
        "d": per_tenant * tenants,
        "dpt": per_tenant,
        "r": telemetry_rows,
        "big": big_rows,
        "span": days * 86400,
    }
    started = time.monotonic()
    create_schema(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("TRUNCATE telemetry, fleet_alert, device_state, device_registry, tenants")
        conn.execute("DROP INDEX IF EXISTS telemetry_tenant_time")
        conn.execute(
            """
            INSERT INTO tenants (tenant_id, name)
            SELECT 'tenant-' || lpad(n::text, 3, '0'), 'Sample tenant ' || n
            FROM generate_series(1, %(t)s) n
            """,
            params,
        )
        # Device n belongs to tenant ((n - 1) % t) + 1; telemetry below uses the same arithmetic.
        conn.execute(
            """
            INSERT INTO device_registry (tenant_id, device_id, name, model, device_type, site_id, tags, created_at)
            SELECT 'tenant-' || lpad((((n - 1) %% %(t)s) + 1)::text, 3, '0'),
                   'dev-' || lpad(n::text, 6, '0'),
                   'Device ' || n,
                   (ARRAY['PX-100', 'PX-200', 'TH-7', 'GW-1'])[1 + n %% 4],
                   (ARRAY['sensor', 'sensor', 'thermostat', 'gateway'])[1 + n %% 4],
                   'site-' || ((n - 1) / %(t)s) %% 5,
                   ARRAY['fleet', 'zone-' || (n %% 3)],
                   timestamptz '2026-01-01 00:00:00+00' + (n || ' minutes')::interval
            FROM generate_series(1, %(d)s) n
            """,
            params,
        )
        conn.execute(
            """
            INSERT INTO device_state (tenant_id, device_id, status, last_seen_at)
            SELECT tenant_id, device_id,
                   (ARRAY['online', 'online', 'offline', 'maintenance'])[1 + abs(hashtext(device_id)) %% 4],
                   now() - (abs(hashtext(device_id)) %% 86400 || ' seconds')::interval
            FROM device_registry
            """,
            params,
        )
        conn.execute(
            """
            INSERT INTO fleet_alert (tenant_id, device_id, site_id, alert_type, severity, status, summary,
                                     created_at, acknowledged_at, closed_at)
            SELECT r.tenant_id, r.device_id, r.site_id,
                   (ARRAY['battery_low', 'offline', 'overheat', 'tamper'])[1 + (k + n) %% 4],
                   (ARRAY['info', 'warning', 'critical'])[1 + (k * 7 + n) %% 3],
                   (ARRAY['open', 'acknowledged', 'closed'])[1 + (k + n * 3) %% 3],
                   'Alert ' || k || ' on ' || r.name,
                   now() - ((k * 7919 + n) %% %(span)s || ' seconds')::interval,
                   CASE WHEN (k + n * 3) %% 3 > 0 THEN now() - ((k * 7919 + n) %% 3600 || ' seconds')::interval END,
                   CASE WHEN (k + n * 3) %% 3 = 2 THEN now() - ((k * 31 + n) %% 600 || ' seconds')::interval END
            FROM (SELECT row_number() OVER (ORDER BY tenant_id, device_id) AS n, * FROM device_registry) r,
                 generate_series(1, 2) k
            """,
            params,
        )
        # Row g goes to tenant 1 while g <= big, then round-robin over the others; its device is
        # one of that tenant's, its time spread over the window, its metrics 4 to 6 numeric keys.
        conn.execute(
            """
            INSERT INTO telemetry (time, tenant_id, device_id, site_id, seq, metrics)
            SELECT date_trunc('hour', now()) - ((g * 7919) %% %(span)s || ' seconds')::interval,
                   'tenant-' || lpad(tn::text, 3, '0'),
                   'dev-' || lpad(dn::text, 6, '0'),
                   'site-' || ((dn - 1) / %(t)s) %% 5,
                   g,
                   jsonb_strip_nulls(jsonb_build_object(
                       'temperature', round((15 + (g %% 200) / 10.0)::numeric, 1),
                       'humidity', 30 + g %% 50,
                       'battery', round((100 - (g %% 1000) / 10.0)::numeric, 1),
                       'rssi', -40 - g %% 60,
                       'pressure', CASE WHEN g %% 3 = 0 THEN 990 + g %% 40 END,
                       'voltage', CASE WHEN g %% 5 = 0 THEN round((3 + (g %% 12) / 10.0)::numeric, 1) END))
            FROM (
                SELECT g, tn, tn + %(t)s * ((g * 31) %% %(dpt)s) AS dn
                FROM (
                    SELECT g, CASE WHEN g <= %(big)s OR %(t)s = 1 THEN 1
                                   ELSE 2 + (g - %(big)s) %% (%(t)s - 1) END AS tn
                    FROM generate_series(1::bigint, %(r)s) g
                ) s
            ) x
            """,
            params,
        )
        conn.execute("CREATE INDEX telemetry_tenant_time ON telemetry (tenant_id, time)")
        conn.execute("ANALYZE tenants, device_registry, device_state, fleet_alert, telemetry")
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM device_registry),"
            " (SELECT count(*) FROM fleet_alert), (SELECT count(*) FROM telemetry)"
        ).fetchone()
    assert counts is not None
    return SeedResult(*(int(c) for c in counts), seconds=time.monotonic() - started)
