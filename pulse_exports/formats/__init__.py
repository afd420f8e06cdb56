"""Export file formats: one streaming part writer per format behind the ``PartWriter`` interface,
plus the names, media types and column types the manifest records for a part."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pulse_exports.formats.csv import CsvPartWriter
from pulse_exports.formats.json import JsonPartWriter
from pulse_exports.formats.parquet import ParquetPartWriter
from pulse_exports.formats.part import PartResult, PartWriter

__all__ = [
    "COMPRESSIONS",
    "FORMATS",
    "PartResult",
    "PartWriter",
    "content_type",
    "file_extension",
    "open_part_writer",
    "output_schema",
]

FORMATS = ("csv", "json", "ndjson", "parquet")
COMPRESSIONS = ("none", "gzip", "zstd")

_MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
_COMPRESSED_MEDIA_TYPES = {"gzip": "application/gzip", "zstd": "application/zstd"}
_SUFFIXES = {"none": "", "gzip": ".gz", "zstd": ".zst"}


def _check(fmt: str, compression: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format: unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if compression not in COMPRESSIONS:
        known = ", ".join(COMPRESSIONS)
        raise ValueError(f"compression: unknown compression {compression!r}; one of {known}")


def file_extension(fmt: str, compression: str) -> str:
    """File name extension without the dot: ``csv.gz``; parquet compresses inside, so ``parquet``."""
    _check(fmt, compression)
    return fmt if fmt == "parquet" else fmt + _SUFFIXES[compression]


def content_type(fmt: str, compression: str) -> str:
    """Media type of a part: the format's, or the compressor's for compressed text formats."""
    _check(fmt, compression)
    if fmt == "parquet" or compression == "none":
        return _MEDIA_TYPES[fmt]
    return _COMPRESSED_MEDIA_TYPES[compression]


def open_part_writer(
    path: Path, fmt: str, compression: str, schema: pa.Schema, *, neutralise_formulas: bool = True
) -> PartWriter:
    """Create ``path`` and return the writer for it; ``neutralise_formulas`` only affects CSV."""
    _check(fmt, compression)
    if fmt == "csv":
        return CsvPartWriter(path, compression, schema, neutralise_formulas=neutralise_formulas)
    if fmt == "parquet":
        return ParquetPartWriter(path, compression, schema)
    return JsonPartWriter(path, compression, schema, array=fmt == "json")


def output_schema(fmt: str, schema: pa.Schema) -> list[tuple[str, str]]:
    """(column, type) pairs as the file holds them: text formats hold every timestamp as UTC
    (microseconds) and binary as base64; parquet keeps Arrow's units and time zones."""
    _check(fmt, "none")
    return [(field.name, _type_name(field.type, text=fmt != "parquet")) for field in schema]


def _type_name(t: pa.DataType, *, text: bool) -> str:
    if pa.types.is_dictionary(t):
        return _type_name(t.value_type, text=text)
    if pa.types.is_timestamp(t):
        if text:
            return "timestamp[us, UTC]"
        return f"timestamp[{t.unit}, {t.tz}]" if t.tz else f"timestamp[{t.unit}]"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "base64" if text else "binary"
    if pa.types.is_fixed_size_binary(t):
        return "base64" if text else f"binary[{t.byte_width}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"list<{_type_name(t.value_type, text=text)}>"
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return f"list<{_type_name(t.value_type, text=text)}>"
    if pa.types.is_struct(t):
        fields = ", ".join(f"{f.name}: {_type_name(f.type, text=text)}" for f in t)
        return f"struct<{fields}>"
    if pa.types.is_decimal(t):
        return f"decimal({t.precision}, {t.scale})"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time" if text else f"time[{t.unit}]"
    if pa.types.is_floating(t):
        return f"float{t.bit_width}"
    if pa.types.is_duration(t) and text:
        return "duration"  # ISO-8601 text, e.g. P1DT5S
    return str(t)  # int8..uint64, null, duration[...]: Arrow's own names are already plain
