"""Dagster's storage connections, held open in the processes that write to it all the time.

Outside ``dagster-webserver``, dagster-postgres opens a new PostgreSQL connection for every query
(SQLAlchemy's ``NullPool``, so that short-lived processes hold none). In ``pulse-exports daemon`` (its
queue loop looks every 0.25 s) and in a run worker (every Dagster event is a write) that is a new
PostgreSQL backend, with its fork, authentication and cold catalog caches (~4.7 ms of CPU here), many
times a second: ~300 sessions per 2M-row export on the benchmark's stack, and ~30 a second idle.
``hold_storage_connections`` gives those processes what the webserver gets (``optimize_for_webserver``):
a pool that keeps one connection per storage and opens more only while threads overlap.

Only for storage reached through psycopg2 (``scheme: postgresql+psycopg2``, as dagster.yaml has it; the
driver dagster-postgres is written for). SQLite storage is left as it is.
"""

from dagster import DagsterInstance

POOL_RECYCLE_SECONDS = 3600  # dagster-webserver's default (--db-pool-recycle)
POOL_MAX_OVERFLOW = 20  # connections beyond the held one while threads query at once (--db-pool-max-overflow)
NO_STATEMENT_TIMEOUT = 0  # unlike the webserver's 15 s: the daemon and runs must not fail a slow write


def _driver(storage: object) -> str | None:
    """The DBAPI driver of a SQLAlchemy-backed Dagster storage (``psycopg2``, ``psycopg``, ``pysqlite``)."""
    engine = getattr(storage, "_engine", None)
    dialect = getattr(engine, "dialect", None)
    return getattr(dialect, "driver", None)


def hold_storage_connections(instance: DagsterInstance) -> bool:
    """Pool the instance's run, event and schedule storage connections when all three use psycopg2.
    True if it did."""
    drivers = {_driver(s) for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)}
    if drivers != {"psycopg2"}:
        return False
    instance.optimize_for_webserver(
        statement_timeout=NO_STATEMENT_TIMEOUT, pool_recycle=POOL_RECYCLE_SECONDS, max_overflow=POOL_MAX_OVERFLOW
    )
    return True
