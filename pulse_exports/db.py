"""Connections to the service's own PostgreSQL database, shaped as every store's queries expect them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool


@contextmanager
def connect(database_url: str, pool: ConnectionPool | None = None) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A connection from ``pool`` (the API's are autocommit with dict rows, see api/deps.py), or else a
    short autocommit connection with dict rows."""
    if pool is not None:
        with pool.connection() as pooled:
            yield pooled
        return
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


class PostgresStore:
    """Base of the table stores: short autocommit connections, or a pool's (the API answers many short requests)."""

    def __init__(self, database_url: str, pool: ConnectionPool | None = None) -> None:
        self.database_url = database_url
        self.pool = pool

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        with connect(self.database_url, self.pool) as conn:
            yield conn


def column_list(row_type: type) -> sql.Composed:
    """``a, b, ...``: the columns of a dataclass that mirrors a row, for SELECT and RETURNING."""
    return sql.SQL(", ").join(sql.Identifier(f.name) for f in fields(row_type))
