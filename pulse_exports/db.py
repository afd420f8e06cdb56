"""Connections to the service's own PostgreSQL database, shaped as every store's queries expect them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields
from types import TracebackType
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

Connection = psycopg.Connection[dict[str, Any]]


class ConnectionSource(Protocol):
    """Where a store takes its connections: a psycopg_pool ``ConnectionPool`` or a ``HeldConnection``."""

    def connection(self) -> AbstractContextManager[Connection]: ...


class HeldConnection:
    """One autocommit connection with dict rows, shared by a task's many small writes one call at a time,
    instead of a new PostgreSQL session for each: a run's progress reports, heartbeats and ownership checks
    were ~40 sessions per 2M-row export, each a backend fork and authentication (~4.7 ms of CPU here).

    Opened on first use and closed by ``close`` (or the ``with`` block); a connection that broke is dropped
    and the next call opens a new one. Errors are psycopg's own, as with a connection of its own."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # the heartbeat thread and the slice writers share it

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row)
            try:
                yield self._conn
            finally:
                if self._conn.broken:
                    self._conn.close()
                    self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> HeldConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextmanager
def connect(database_url: str, pool: ConnectionSource | None = None) -> Iterator[Connection]:
    """A connection from ``pool`` (the API's are autocommit with dict rows, see api/deps.py; or a
    ``HeldConnection``), or else a short autocommit connection with dict rows."""
    if pool is not None:
        with pool.connection() as pooled:
            yield pooled
        return
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


class PostgresStore:
    """Base of the table stores: short autocommit connections, or a pool's (the API answers many short requests)."""

    def __init__(self, database_url: str, pool: ConnectionSource | None = None) -> None:
        self.database_url = database_url
        self.pool = pool

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with connect(self.database_url, self.pool) as conn:
            yield conn


def column_list(row_type: type) -> sql.Composed:
    """``a, b, ...``: the columns of a dataclass that mirrors a row, for SELECT and RETURNING."""
    return sql.SQL(", ").join(sql.Identifier(f.name) for f in fields(row_type))
