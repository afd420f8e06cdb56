"""CSV parts: RFC 4180 (quoted as needed, CRLF rows), UTF-8 without BOM, header always, NULL as
an empty cell, nested values as compact JSON text, and spreadsheet formulas neutralised."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa

from pulse_exports.formats.part import BasePartWriter
from pulse_exports.formats.text import TIMESTAMP_FORMAT, polars_schema, polars_write_errors, text_column

# Cells a spreadsheet would evaluate as a formula (OWASP "CSV injection"): = + - @ TAB CR.
_FORMULA_START = r"^[=+\-@\t\r]"
_LIST_FIELD = "v"


def _json_text(column: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """A list or struct as one JSON text cell; NULL stays NULL (an empty cell)."""
    if isinstance(dtype, pl.Struct):
        encoded = column.struct.json_encode()
    else:
        # polars JSON-encodes structs only: wrap the list as {"v": [...]} and cut the wrapper off.
        wrapped = pl.struct(column.alias(_LIST_FIELD)).struct.json_encode()
        encoded = wrapped.str.strip_prefix(f'{{"{_LIST_FIELD}":').str.strip_suffix("}")
    return pl.when(column.is_not_null()).then(encoded)


def neutralise(column: pl.Expr) -> pl.Expr:
    """Prefix ``'`` to string cells a spreadsheet would run as a formula."""
    return pl.when(column.str.contains(_FORMULA_START)).then(pl.lit("'") + column).otherwise(column)


def csv_columns(schema: pa.Schema, *, neutralise_formulas: bool) -> list[pl.Expr]:
    """One expression per column turning a batch into what the CSV writer prints."""
    exprs = []
    for name, dtype in polars_schema(schema).items():
        converted = text_column(name, dtype)
        column = pl.col(name) if converted is None else converted
        if isinstance(dtype, (pl.List, pl.Array, pl.Struct)):
            column = _json_text(column, dtype)
        elif neutralise_formulas and isinstance(dtype, (pl.String, pl.Categorical, pl.Enum)):
            column = neutralise(column)
        exprs.append(column.alias(name))
    return exprs


class CsvPartWriter(BasePartWriter):
    """Writes the header on open, then each batch with polars' native CSV writer."""

    def __init__(self, path: Path, compression: str, schema: pa.Schema, *, neutralise_formulas: bool) -> None:
        super().__init__(path, compression, schema)
        self._columns = csv_columns(schema, neutralise_formulas=neutralise_formulas)
        # A NULL in a one-column file would be a blank line, which CSV readers skip: quote it.
        self._null = '""' if len(schema) == 1 else ""
        try:
            self._write_frame(pl.from_arrow(schema.empty_table()), include_header=True)  # type: ignore[arg-type]
        except BaseException:
            self._file.discard()
            raise

    def _write(self, batch: pa.RecordBatch) -> None:
        self._write_frame(pl.from_arrow(batch), include_header=False)  # type: ignore[arg-type]

    def _write_frame(self, frame: pl.DataFrame, *, include_header: bool) -> None:
        with polars_write_errors("csv"):
            frame.select(self._columns).write_csv(
                self._file.as_io(),
                include_header=include_header,
                line_terminator="\r\n",
                datetime_format=TIMESTAMP_FORMAT,
                date_format="%Y-%m-%d",
                time_format="%H:%M:%S%.f",
                null_value=self._null,
            )
