"""Column conversions shared by the text formats (CSV, JSON): every timestamp becomes UTC, binary
becomes base64, durations ISO-8601 text and categoricals plain strings. All are polars expressions,
so no per-row Python."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import polars as pl
import pyarrow as pa
from polars.exceptions import PanicException

# Fixed microseconds (PostgreSQL's precision) and an explicit offset: 2026-01-02T03:04:05.123456+00:00.
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.6f%:z"


def polars_schema(schema: pa.Schema) -> pl.Schema:
    """The polars dtypes ``pl.from_arrow`` gives batches of this Arrow schema."""
    return pl.from_arrow(schema.empty_table()).schema  # type: ignore[union-attr]


def utc(column: pl.Expr, dtype: pl.Datetime) -> pl.Expr:
    """The same instants in UTC; naive timestamps are taken to be UTC already."""
    if dtype.time_zone is None:
        return column.dt.replace_time_zone("UTC")
    if dtype.time_zone != "UTC":
        return column.dt.convert_time_zone("UTC")
    return column


def text_column(name: str, dtype: pl.DataType) -> pl.Expr | None:
    """The conversion a column needs before a text writer sees it, or None if it needs none."""
    column = pl.col(name)
    if isinstance(dtype, pl.Datetime):
        return utc(column, dtype)
    if isinstance(dtype, pl.Duration):
        return column.dt.to_string("iso")
    if isinstance(dtype, pl.Binary):
        return column.bin.encode("base64")
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return column.cast(pl.String)
    return None


@contextlib.contextmanager
def polars_write_errors(fmt: str) -> Iterator[None]:
    """Turn polars' panics on types it cannot serialise (e.g. list<binary>) into a ValueError.

    A PanicException is a BaseException, which a job's ``except Exception`` would not catch.
    """
    try:
        yield
    except PanicException as exc:
        raise ValueError(f"cannot write this batch as {fmt}: {exc}") from exc
