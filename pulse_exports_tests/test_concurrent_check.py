"""ConcurrentCheck: a query on its own connection beside the export, started once the rows flow."""

from __future__ import annotations

import threading
import time

import psycopg

from pulse_exports.pipeline import ConcurrentCheck


def _backends(url: str, marker: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()", (f"%{marker}%",)
        ).fetchone()
    return int(row[0]) if row else 0


def test_the_check_waits_for_the_rows_then_runs_on_its_own_backend(fresh_database_url):
    rows_flowing = threading.Event()
    seen: list[int] = []

    def check(conn: psycopg.Connection) -> bool:
        seen.append(conn.info.backend_pid)
        return conn.execute("SELECT pg_sleep(0.3), 'pulse-check-marker' IS NOT NULL").fetchone()[1]

    probe = ConcurrentCheck(fresh_database_url, check, start_after=rows_flowing)
    time.sleep(0.3)
    assert seen == []  # no connection, no query before the first rows
    rows_flowing.set()
    deadline = time.monotonic() + 5
    while not _backends(fresh_database_url, "pulse-check-marker") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _backends(fresh_database_url, "pulse-check-marker") == 1  # running beside us
    assert probe.result() is True and len(seen) == 1
    probe.cancel()


def test_result_starts_a_check_still_waiting(fresh_database_url):
    # An export that never reported rows (all slices empty) must not wait on the check forever.
    probe = ConcurrentCheck(
        fresh_database_url, lambda conn: conn.execute("SELECT true").fetchone()[0], start_after=threading.Event()
    )
    assert probe.result() is True
    probe.cancel()


def test_cancel_before_the_rows_ends_the_check_without_a_query(fresh_database_url):
    ran: list[bool] = []
    probe = ConcurrentCheck(fresh_database_url, lambda conn: ran.append(True) or True, start_after=threading.Event())
    probe.cancel()  # the export failed before its first rows
    assert ran == []
