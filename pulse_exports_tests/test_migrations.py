"""Migrations of the job tables: idempotent upgrades, indexes, and row-level security by tenant."""

from __future__ import annotations

import psycopg
import pytest

from pulse_exports import migrations


def test_upgrade_applies_every_migration_once(fresh_database_url: str) -> None:
    first = migrations.upgrade(fresh_database_url)
    assert first == [name for _, name, _ in migrations.available()]
    assert migrations.upgrade(fresh_database_url) == []
    assert migrations.current_version(fresh_database_url) == migrations.available()[-1][0]
    with psycopg.connect(fresh_database_url) as conn:
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'export_jobs'")}
    assert {"export_jobs_pending", "export_jobs_tenant_created", "export_jobs_idempotency"} <= indexes


def test_row_level_security_hides_other_tenants_jobs(fresh_database_url: str) -> None:
    migrations.upgrade(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO export_jobs (tenant_id, export_type, format)"
            " VALUES ('a', 'devices', 'csv'), ('b', 'devices', 'csv')"
        )
        conn.execute("CREATE ROLE pulse_app_t NOLOGIN")
        conn.execute("GRANT SELECT, INSERT ON export_jobs TO pulse_app_t")
        try:
            conn.execute("SET ROLE pulse_app_t")
            assert conn.execute("SELECT count(*) FROM export_jobs").fetchone() == (2,)  # service role: unset
            conn.execute("SET pulse.tenant_id = 'a'")
            assert conn.execute("SELECT tenant_id FROM export_jobs").fetchall() == [("a",)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO export_jobs (tenant_id, export_type, format) VALUES ('b', 'devices', 'csv')")
        finally:
            conn.execute("RESET ROLE")
            conn.execute("RESET pulse.tenant_id")
            conn.execute("DROP OWNED BY pulse_app_t")
            conn.execute("DROP ROLE pulse_app_t")


def test_bad_status_or_format_is_refused_by_the_table(fresh_database_url: str) -> None:
    migrations.upgrade(fresh_database_url)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO export_jobs (tenant_id, export_type, format) VALUES ('a', 'devices', 'xlsx')")


def test_a_job_becoming_pending_notifies_the_daemon_once_per_transaction(fresh_database_url: str) -> None:
    migrations.upgrade(fresh_database_url)
    insert = "INSERT INTO export_jobs (tenant_id, export_type, format, status) VALUES ('a', 'devices', 'csv', %s)"
    with (
        psycopg.connect(fresh_database_url, autocommit=True) as listener,
        psycopg.connect(fresh_database_url, autocommit=True) as conn,
    ):
        listener.execute("LISTEN pulse_export_jobs")

        def heard() -> int:
            return len(list(listener.notifies(timeout=0.3)))

        with conn.transaction():  # two PENDING rows in one transaction: one wake-up, at commit
            conn.execute(insert, ("PENDING",))
            conn.execute(insert, ("PENDING",))
        assert heard() == 1
        queued = conn.execute(insert + " RETURNING id", ("QUEUED",)).fetchone()
        assert queued is not None and heard() == 0  # a job someone else launches is not the sensor's
        conn.execute("UPDATE export_jobs SET status = 'RUNNING' WHERE id = %s", queued)
        assert heard() == 0
        conn.execute("UPDATE export_jobs SET status = 'PENDING' WHERE id = %s", queued)  # handed back
        assert heard() == 1
