"""Part writers for every format and compression, read back with independent readers."""

from __future__ import annotations

import csv
import gc
import gzip
import hashlib
import io
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import zstandard

from pulse_exports.formats import (
    COMPRESSIONS,
    FORMATS,
    PartResult,
    content_type,
    file_extension,
    open_part_writer,
    output_schema,
)

UTC = timezone.utc
T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
HOSTILE = ["=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "\tx", "\rx"]
TEXTS = [*HOSTILE, "a,b", 'say "hi"', "line1\nline2\r\nline3", "naïve 🎉 中文 — ok", None, ""]
N = len(TEXTS)
TIMES = [T0 + timedelta(hours=i) for i in range(N - 1)] + [None]
NAIVE = [datetime(2025, 12, 31, 23, 59, 59) + timedelta(microseconds=i) for i in range(N)]
COUNTS = [-5, 0, 7, -2, None, 123_456_789_012, 1, -1, 2, 3, 4, -9_000_000_000]
VALUES = [1.5, -0.25, None, 1e-3, 2.0, -3.75, 0.1, 100.0, -1e10, 7.0, 8.5, 0.0]
OKS = [True, False, None, True, True, False, True, False, True, False, True, False]
TAGS = [["a", "b"], [], None, ["=x", "🎉"], ['q"u,o'], ["line\nbreak"], ["x"], None, ["y"], [], ["z"], ["w"]]
AMOUNTS = [Decimal("12.30"), Decimal("-0.05"), None, *(Decimal(f"{i}.00") for i in range(N - 3))]

SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("us", "UTC")),
        ("naive", pa.timestamp("us")),
        ("text", pa.string()),
        ("count", pa.int64()),
        ("value", pa.float64()),
        ("ok", pa.bool_()),
        ("tags", pa.large_list(pa.string())),
        ("amount", pa.decimal128(12, 2)),
    ]
)
COLUMNS: dict[str, list[Any]] = {
    "time": TIMES,
    "naive": NAIVE,
    "text": TEXTS,
    "count": COUNTS,
    "value": VALUES,
    "ok": OKS,
    "tags": TAGS,
    "amount": AMOUNTS,
}


def sample_batches(rows_per_batch: int = 5) -> list[pa.RecordBatch]:
    """The sample rows as several batches (5 + 5 + 2), as connectorx would stream them."""
    return pa.table(COLUMNS, schema=SCHEMA).to_batches(max_chunksize=rows_per_batch)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")


def write_part(
    directory: Path,
    fmt: str,
    compression: str,
    batches: list[pa.RecordBatch],
    schema: pa.Schema = SCHEMA,
    **options: bool,
) -> tuple[Path, PartResult]:
    path = directory / f"part-0.{file_extension(fmt, compression)}"
    writer = open_part_writer(path, fmt, compression, schema, **options)
    for batch in batches:
        writer.write(batch)
    return path, writer.close()


def file_text(path: Path, compression: str) -> str:
    """The decompressed file as UTF-8, failing on a BOM."""
    if compression == "gzip":
        with gzip.open(path, "rb") as f:
            data = f.read()
    elif compression == "zstd":
        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            data = f.read()
    else:
        data = path.read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf")
    return data.decode("utf-8")


def csv_rows(path: Path, compression: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(file_text(path, compression), newline="")))


def ndjson_rows(path: Path, compression: str) -> list[dict]:
    text = file_text(path, compression)
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def csv_column(rows: list[list[str]], name: str) -> list[str]:
    index = rows[0].index(name)
    return [row[index] for row in rows[1:]]


def expected_json_rows() -> list[dict]:
    return [
        {
            "time": iso(TIMES[i]),
            "naive": iso(NAIVE[i].replace(tzinfo=UTC)),
            "text": TEXTS[i],
            "count": COUNTS[i],
            "value": VALUES[i],
            "ok": OKS[i],
            "tags": TAGS[i],
            "amount": None if AMOUNTS[i] is None else str(AMOUNTS[i]),
        }
        for i in range(N)
    ]


# --- CSV ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_csv_round_trips_every_value_through_the_csv_module(tmp_path: Path, compression: str) -> None:
    path, result = write_part(tmp_path, "csv", compression, sample_batches())
    rows = csv_rows(path, compression)

    assert result.rows == N
    assert rows[0] == SCHEMA.names
    assert len(rows) == N + 1
    assert csv_column(rows, "time") == [iso(t) or "" for t in TIMES]
    assert csv_column(rows, "naive") == [iso(t.replace(tzinfo=UTC)) for t in NAIVE]
    assert csv_column(rows, "count") == ["" if c is None else str(c) for c in COUNTS]
    assert [float(v) if v else None for v in csv_column(rows, "value")] == VALUES
    assert csv_column(rows, "ok") == ["" if b is None else str(b).lower() for b in OKS]
    assert csv_column(rows, "amount") == ["" if a is None else str(a) for a in AMOUNTS]
    assert [json.loads(t) if t else None for t in csv_column(rows, "tags")] == TAGS
    safe = [t for t in TEXTS if t not in HOSTILE]
    assert csv_column(rows, "text")[len(HOSTILE) :] == [t or "" for t in safe]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_csv_cells_starting_with_formula_characters_are_neutralised(tmp_path: Path, hostile: str) -> None:
    path, _ = write_part(tmp_path, "csv", "none", sample_batches())

    texts = csv_column(csv_rows(path, "none"), "text")

    assert texts[TEXTS.index(hostile)] == "'" + hostile


def test_csv_cells_starting_with_equals_are_neutralised(tmp_path: Path) -> None:
    path, _ = write_part(tmp_path, "csv", "gzip", sample_batches())

    assert csv_column(csv_rows(path, "gzip"), "text")[0] == "'=cmd|' /C calc'!A0"


def test_csv_negative_numbers_and_json_lists_are_not_neutralised(tmp_path: Path) -> None:
    path, _ = write_part(tmp_path, "csv", "none", sample_batches())
    rows = csv_rows(path, "none")

    assert csv_column(rows, "count")[0] == "-5"
    assert csv_column(rows, "value")[1] == "-0.25"
    assert csv_column(rows, "amount")[1] == "-0.05"
    assert csv_column(rows, "tags")[3] == '["=x","🎉"]'


def test_csv_keeps_raw_values_when_neutralise_formulas_is_false(tmp_path: Path) -> None:
    path, _ = write_part(tmp_path, "csv", "zstd", sample_batches(), neutralise_formulas=False)

    texts = csv_column(csv_rows(path, "zstd"), "text")

    assert texts == [t or "" for t in TEXTS]


def test_csv_null_is_an_empty_cell_and_empty_string_is_quoted(tmp_path: Path) -> None:
    path, _ = write_part(tmp_path, "csv", "none", sample_batches())
    lines = path.read_bytes().decode().split("\r\n")

    null_row, empty_row = csv_rows(path, "none")[N - 1 :]

    assert null_row[SCHEMA.names.index("text")] == ""
    assert lines[-3].split(",")[2] == ""  # the NULL text cell, unquoted
    assert lines[-2].split(",")[2] == '""'  # the empty string, quoted
    assert empty_row[SCHEMA.names.index("text")] == ""


def test_csv_single_column_null_is_not_a_blank_line(tmp_path: Path) -> None:
    schema = pa.schema([("count", pa.int64())])
    batch = pa.record_batch({"count": [1, None, 3]}, schema=schema)

    path, _ = write_part(tmp_path, "csv", "none", [batch], schema=schema)

    assert csv_rows(path, "none") == [["count"], ["1"], [""], ["3"]]


def test_csv_uses_crlf_rows_and_quotes_embedded_newlines(tmp_path: Path) -> None:
    path, _ = write_part(tmp_path, "csv", "none", sample_batches())
    data = path.read_bytes()

    assert data.startswith(b"time,naive,text,count,value,ok,tags,amount\r\n")
    assert b'"line1\nline2\r\nline3"' in data
    assert data.endswith(b"\r\n")


def test_csv_timestamps_in_other_time_zones_are_written_in_utc(tmp_path: Path) -> None:
    schema = pa.schema([("at", pa.timestamp("us", "Europe/Berlin"))])
    batch = pa.record_batch({"at": pa.array([T0], pa.timestamp("us", "Europe/Berlin"))}, schema=schema)

    path, _ = write_part(tmp_path, "csv", "none", [batch], schema=schema)

    assert csv_rows(path, "none")[1] == ["2026-01-02T03:04:05.123456+00:00"]


def test_csv_is_readable_by_pyarrow_and_polars(tmp_path: Path) -> None:
    path, _ = write_part(tmp_path, "csv", "none", sample_batches())

    frame = pl.read_csv(path, try_parse_dates=True)
    table = pa_csv.read_csv(path)

    assert frame.height == table.num_rows == N
    assert frame["count"].to_list() == COUNTS
    assert frame["time"].to_list()[:2] == TIMES[:2]
    assert table.column("text").to_pylist()[7] == 'say "hi"'


# --- JSON and NDJSON --------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_json_array_round_trips_every_value_across_batches(tmp_path: Path, compression: str) -> None:
    path, result = write_part(tmp_path, "json", compression, sample_batches())

    rows = json.loads(file_text(path, compression))

    assert result.rows == N
    assert rows == expected_json_rows()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_ndjson_has_one_object_per_line(tmp_path: Path, compression: str) -> None:
    path, result = write_part(tmp_path, "ndjson", compression, sample_batches())

    rows = ndjson_rows(path, compression)

    assert result.rows == N
    assert rows == expected_json_rows()


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_json_keeps_formulas_unmodified_and_decimals_as_strings(tmp_path: Path, fmt: str) -> None:
    path, _ = write_part(tmp_path, fmt, "none", sample_batches())
    text = file_text(path, "none")

    rows = json.loads(text) if fmt == "json" else ndjson_rows(path, "none")

    assert [r["text"] for r in rows[: len(HOSTILE)]] == HOSTILE
    assert rows[0]["amount"] == "12.30"
    assert rows[0]["time"] == "2026-01-02T03:04:05.123456+00:00"
    assert rows[N - 1]["time"] is None


def test_json_array_from_single_row_batches_is_valid(tmp_path: Path) -> None:
    path, _ = write_part(tmp_path, "json", "none", sample_batches(rows_per_batch=1))

    assert json.loads(path.read_text(encoding="utf-8")) == expected_json_rows()


def test_text_formats_write_binary_as_base64(tmp_path: Path) -> None:
    schema = pa.schema([("blob", pa.binary()), ("n", pa.int8())])
    batch = pa.record_batch({"blob": [b"\x00\xff", None], "n": [1, 2]}, schema=schema)

    csv_path, _ = write_part(tmp_path, "csv", "none", [batch], schema=schema)
    json_path, _ = write_part(tmp_path, "ndjson", "none", [batch], schema=schema)

    assert csv_rows(csv_path, "none")[1:] == [["AP8=", "1"], ["", "2"]]
    assert ndjson_rows(json_path, "none") == [{"blob": "AP8=", "n": 1}, {"blob": None, "n": 2}]


# --- Parquet ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("compression", "codec"), [("none", "UNCOMPRESSED"), ("gzip", "GZIP"), ("zstd", "ZSTD")])
def test_parquet_keeps_types_and_values_with_the_chosen_codec(tmp_path: Path, compression: str, codec: str) -> None:
    path, result = write_part(tmp_path, "parquet", compression, sample_batches())

    table = pq.read_table(path)
    frame = pl.read_parquet(path)

    assert path.name == "part-0.parquet"
    assert result.rows == table.num_rows == frame.height == N
    assert table.schema.equals(SCHEMA)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == codec
    assert table.to_pydict() == COLUMNS
    assert frame.schema["time"] == pl.Datetime("us", "UTC")
    assert frame["time"].to_list() == TIMES
    assert frame["text"].to_list() == TEXTS
    assert frame["tags"].to_list() == TAGS


# --- Every format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_part_result_size_and_digest_match_the_file(tmp_path: Path, fmt: str, compression: str) -> None:
    path, result = write_part(tmp_path, fmt, compression, sample_batches())
    data = path.read_bytes()

    assert result == PartResult(rows=N, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_empty_csv_part_is_the_header_only(tmp_path: Path, compression: str) -> None:
    path, result = write_part(tmp_path, "csv", compression, [])

    assert file_text(path, compression) == ",".join(SCHEMA.names) + "\r\n"
    assert result.rows == 0


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_empty_json_part_is_an_empty_array(tmp_path: Path, compression: str) -> None:
    path, _ = write_part(tmp_path, "json", compression, [])

    assert json.loads(file_text(path, compression)) == []


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_empty_ndjson_part_has_no_lines(tmp_path: Path, compression: str) -> None:
    path, result = write_part(tmp_path, "ndjson", compression, [])

    assert file_text(path, compression) == ""
    assert result.bytes == path.stat().st_size


def test_empty_parquet_part_has_the_schema_and_no_rows(tmp_path: Path) -> None:
    path, _ = write_part(tmp_path, "parquet", "zstd", [])

    table = pq.read_table(path)

    assert table.num_rows == 0
    assert table.schema.equals(SCHEMA)
    assert pl.read_parquet(path).columns == SCHEMA.names


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_row_batches_write_no_rows(tmp_path: Path, fmt: str) -> None:
    empty = sample_batches()[0].slice(0, 0)

    _, result = write_part(tmp_path, fmt, "none", [empty, *sample_batches(), empty])

    assert result.rows == N


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_abort_removes_the_partial_file(tmp_path: Path, fmt: str, compression: str) -> None:
    path = tmp_path / f"part-0.{file_extension(fmt, compression)}"
    writer = open_part_writer(path, fmt, compression, SCHEMA)
    writer.write(sample_batches()[0])

    writer.abort()
    del writer
    gc.collect()  # finalisers of the abandoned compressor/parquet writer must not write or warn

    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_written_grows_as_batches_are_written(tmp_path: Path, fmt: str) -> None:
    big = pa.table({name: values * 500 for name, values in COLUMNS.items()}, schema=SCHEMA)
    batches = big.to_batches(max_chunksize=2000)
    writer = open_part_writer(tmp_path / f"part.{fmt}", fmt, "none", SCHEMA)
    seen = []

    for batch in batches:
        writer.write(batch)
        seen.append(writer.bytes_written)
    result = writer.close()

    assert seen == sorted(seen) and seen[0] > 0 and seen[-1] > seen[0]
    assert writer.rows == result.rows == big.num_rows
    assert seen[-1] <= result.bytes


def test_gzip_bytes_written_grows_before_close(tmp_path: Path) -> None:
    big = pa.table({name: values * 2000 for name, values in COLUMNS.items()}, schema=SCHEMA)
    writer = open_part_writer(tmp_path / "part.csv.gz", "csv", "gzip", SCHEMA)

    for batch in big.to_batches(max_chunksize=4000):
        writer.write(batch)

    assert writer.bytes_written > 0
    assert writer.bytes_written < writer.close().bytes


def test_batch_with_other_columns_is_rejected(tmp_path: Path) -> None:
    writer = open_part_writer(tmp_path / "part.csv", "csv", "none", SCHEMA)

    with pytest.raises(ValueError, match="columns"):
        writer.write(pa.record_batch({"other": [1]}))
    writer.abort()


# --- Names, media types, schema ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "compression", "extension", "media_type"),
    [
        ("csv", "none", "csv", "text/csv; charset=utf-8"),
        ("csv", "gzip", "csv.gz", "application/gzip"),
        ("csv", "zstd", "csv.zst", "application/zstd"),
        ("json", "none", "json", "application/json"),
        ("json", "gzip", "json.gz", "application/gzip"),
        ("ndjson", "none", "ndjson", "application/x-ndjson"),
        ("ndjson", "zstd", "ndjson.zst", "application/zstd"),
        ("parquet", "none", "parquet", "application/vnd.apache.parquet"),
        ("parquet", "zstd", "parquet", "application/vnd.apache.parquet"),
        ("parquet", "gzip", "parquet", "application/vnd.apache.parquet"),
    ],
)
def test_extension_and_content_type_follow_format_and_compression(
    fmt: str, compression: str, extension: str, media_type: str
) -> None:
    assert file_extension(fmt, compression) == extension
    assert content_type(fmt, compression) == media_type


def test_output_schema_names_the_types_as_written() -> None:
    assert output_schema("parquet", SCHEMA) == [
        ("time", "timestamp[us, UTC]"),
        ("naive", "timestamp[us]"),
        ("text", "string"),
        ("count", "int64"),
        ("value", "float64"),
        ("ok", "bool"),
        ("tags", "list<string>"),
        ("amount", "decimal(12, 2)"),
    ]
    assert dict(output_schema("csv", SCHEMA))["naive"] == "timestamp[us, UTC]"
    assert dict(output_schema("json", pa.schema([("b", pa.binary())]))) == {"b": "base64"}


@pytest.mark.parametrize(
    "call",
    [
        lambda p: file_extension("xlsx", "none"),
        lambda p: content_type("xlsx", "none"),
        lambda p: output_schema("xlsx", SCHEMA),
        lambda p: open_part_writer(p / "x", "xlsx", "none", SCHEMA),
    ],
)
def test_unknown_format_raises_value_error_naming_the_field(tmp_path: Path, call) -> None:
    with pytest.raises(ValueError, match="^format: .*'xlsx'"):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda p: file_extension("csv", "bz2"),
        lambda p: content_type("parquet", "bz2"),
        lambda p: open_part_writer(p / "x", "csv", "bz2", SCHEMA),
    ],
)
def test_unknown_compression_raises_value_error_naming_the_field(tmp_path: Path, call) -> None:
    with pytest.raises(ValueError, match="^compression: .*'bz2'"):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []
