"""JSON parts: one array of row objects, or NDJSON (one object per line). NULL is null, timestamps
are ISO-8601 UTC strings, lists/structs nest, decimals are strings (exact), NaN/Infinity are null."""

from __future__ import annotations

from pathlib import Path
from typing import IO, cast

import polars as pl
import pyarrow as pa

from pulse_exports.formats.part import BasePartWriter, PartFile
from pulse_exports.formats.text import TIMESTAMP_FORMAT, polars_schema, polars_write_errors, text_column


def json_columns(schema: pa.Schema) -> list[pl.Expr]:
    """One expression per column turning a batch into what the JSON writer prints."""
    exprs = []
    for name, dtype in polars_schema(schema).items():
        column = text_column(name, dtype)
        if column is None:
            column = pl.col(name)
        elif isinstance(dtype, pl.Datetime):
            # polars would print a variable number of fractional digits; match the CSV format.
            column = column.dt.to_string(TIMESTAMP_FORMAT)
        exprs.append(column.alias(name))
    return exprs


class _ArrayElements:
    """Turns the NDJSON polars writes into array elements: ``[`` first, ``,`` between rows.

    JSON escapes every newline inside strings, so the only newline bytes polars emits end rows.
    Each row's newline is held back and written as ``,\\n`` before the next row, or dropped by
    ``end``, so rows join correctly across chunks and batches.
    """

    def __init__(self, file: PartFile) -> None:
        self._file = file
        self._separator = b"[\n"

    def write(self, data: bytes) -> int:
        if data:
            row_ends = data.endswith(b"\n")
            self._file.write(self._separator)
            self._file.write((data[:-1] if row_ends else data).replace(b"\n", b",\n"))
            self._separator = b",\n" if row_ends else b""
        return len(data)

    def flush(self) -> None:
        pass

    def end(self) -> None:
        self._file.write(b"[]\n" if self._separator == b"[\n" else b"\n]\n")


class JsonPartWriter(BasePartWriter):
    """Streams rows as NDJSON lines, or as the elements of one JSON array."""

    def __init__(self, path: Path, compression: str, schema: pa.Schema, *, array: bool) -> None:
        super().__init__(path, compression, schema)
        self._columns = json_columns(schema)
        self._array = _ArrayElements(self._file) if array else None

    def _write(self, batch: pa.RecordBatch) -> None:
        frame = pl.from_arrow(batch).select(self._columns)  # type: ignore[union-attr]
        with polars_write_errors("json"):
            frame.write_ndjson(self._file.as_io() if self._array is None else cast(IO[bytes], self._array))

    def _finish(self) -> None:
        if self._array is not None:
            self._array.end()
