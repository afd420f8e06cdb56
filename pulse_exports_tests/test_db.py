"""HeldConnection: one real PostgreSQL session shared by a task's calls, reopened after it broke."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg
import pytest

from pulse_exports import migrations
from pulse_exports.db import HeldConnection
from pulse_exports.jobstore import JobStore


def _backend_pid(held: HeldConnection) -> int:
    with held.connection() as conn:
        row = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
    assert row is not None
    return int(row["pid"])


def test_calls_from_several_threads_share_one_session(fresh_database_url: str) -> None:
    pids: list[int] = []
    with HeldConnection(fresh_database_url) as held:

        def work() -> None:
            pids.extend(_backend_pid(held) for _ in range(20))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(pids) == 80 and len(set(pids)) == 1
    with psycopg.connect(fresh_database_url, autocommit=True) as observer:  # closed with the block
        for _ in range(100):  # a closed session's backend exits on its own time
            left = observer.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pids[0],)).fetchone()
            if left == (0,):
                break
            time.sleep(0.02)
    assert left == (0,)


def test_a_broken_session_fails_its_call_with_psycopgs_error_and_the_next_call_reconnects(
    fresh_database_url: str,
) -> None:
    with HeldConnection(fresh_database_url) as held:
        first = _backend_pid(held)
        with psycopg.connect(fresh_database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        with pytest.raises(psycopg.OperationalError):
            _backend_pid(held)
        assert _backend_pid(held) != first


def test_a_store_on_a_held_connection_answers_like_one_with_its_own(fresh_database_url: str) -> None:
    migrations.upgrade(fresh_database_url)
    with HeldConnection(fresh_database_url) as held:
        store = JobStore(fresh_database_url, held)
        assert store.get("00000000-0000-0000-0000-000000000000") is None
        with pytest.raises(psycopg.errors.UndefinedTable):  # an SQL error leaves the session usable
            with held.connection() as conn:
                conn.execute("SELECT * FROM no_such_table")
        assert store.stale_running(older_than=timedelta(seconds=1)) == []
