"""Parquet parts: typed columns as Arrow has them (timestamps keep their time zone), compressed
inside the file by the chosen codec; batches are gathered into row groups of ``ROW_GROUP_ROWS`` rows."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pulse_exports.formats.part import GZIP_LEVEL, ZSTD_LEVEL, BasePartWriter

# Arrow's own gzip default is level 9: 8 s per million rows, against 0.7 s at level 1 for a file
# only 1% bigger. Both codecs use the levels the text formats use.
PARQUET_CODECS = {"none": ("NONE", None), "gzip": ("GZIP", GZIP_LEVEL), "zstd": ("ZSTD", ZSTD_LEVEL)}
# A row group per batch would tie the file's layout to the stream's batch size (16k rows per slice);
# readers prefer groups of 100k+ rows, and one group of this schema holds ~13 MB in memory until written.
ROW_GROUP_ROWS = 131_072


class ParquetPartWriter(BasePartWriter):
    """Wraps ``pq.ParquetWriter``; the footer (with the schema) is written on close."""

    def __init__(self, path: Path, codec: str, schema: pa.Schema) -> None:
        # The part file itself is never compressed: the codec applies to the column chunks.
        super().__init__(path, "none", schema)
        try:
            name, level = PARQUET_CODECS[codec]
            self._writer = pq.ParquetWriter(self._file.as_io(), schema, compression=name, compression_level=level)
            self._schema = schema
            self._pending: list[pa.RecordBatch] = []
            self._pending_rows = 0
        except BaseException:
            self._file.discard()
            raise

    def _write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush_row_group()

    def _flush_row_group(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending, self._schema)
            self._pending, self._pending_rows = [], 0
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))

    def _finish(self) -> None:
        self._flush_row_group()
        self._writer.close()

    def _release(self) -> None:
        # After an abort the file is detached, so the footer this writes goes nowhere.
        with contextlib.suppress(Exception):
            self._writer.close()
