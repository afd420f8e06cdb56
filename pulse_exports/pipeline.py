"""The data path of one export: stream Arrow batches from the source query into part files,
upload each finished part, and describe the result in a manifest.

Memory is bounded by one batch plus the writer's buffers: rows never gather in Python.
Finished parts are uploaded on a background thread while the next part is being written.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pyarrow as pa

from pulse_exports.catalog import ExportRequest
from pulse_exports.formats import content_type, file_extension, open_part_writer, output_schema
from pulse_exports.quotas import QuotaExceeded
from pulse_exports.storage import ExportStore, PartUpload

MANIFEST_NAME = "manifest.json"
DEFAULT_BATCH_ROWS = 32_768
DEFAULT_PART_MAX_ROWS = 5_000_000
DEFAULT_PART_MAX_BYTES = 512 * 1024**2


class ExportCancelled(RuntimeError):
    """The job stopped being this run's (cancelled, or taken over) while it was running."""


@dataclass(frozen=True)
class PartInfo:
    index: int
    key: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ExportOutcome:
    """What one export wrote: its parts and totals."""

    prefix: str
    location: str
    columns: list[dict[str, str]]
    parts: list[PartInfo]
    row_count: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_prefix(tenant_id: str, export_id: str) -> str:
    """Where an export's objects live inside the store: ``<tenant_id>/<export_id>/``."""
    return f"{tenant_id}/{export_id}/"


class SourceQueryError(RuntimeError):
    """The source database failed the export's query while its rows were streaming."""


# A slice of a big export ends at a time bound, and the planner may then prefer a (parallel) scan and a
# full sort of the slice over walking the (tenant, time) index: its first row would wait for the whole
# sort, and the sort's workers would compete with the other slices for the cores.
SLICE_SESSION_OPTIONS = "-c enable_sort=off -c max_parallel_workers_per_gather=0"


def stream_query(
    source_url: str, query: str, batch_rows: int = DEFAULT_BATCH_ROWS, *, session_options: str | None = None
) -> pa.RecordBatchReader:
    """Run the query with connectorx and return its rows as a stream of Arrow batches.

    ``session_options`` are server settings for the query's connection (libpq ``options``).
    """
    import connectorx as cx

    url = source_url.replace("postgres://", "postgresql://", 1)
    if session_options:
        url = _with_session_options(url, session_options)
    reader = cx.read_sql(url, query, return_type="arrow_stream", batch_size=batch_rows)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        except BaseException as exc:
            # connectorx reports a query that fails mid-stream (e.g. a cast error) as pyo3's
            # PanicException, a BaseException that `except Exception` would let through.
            if type(exc).__name__ != "PanicException":
                raise
            raise SourceQueryError(f"connectorx: the source query failed: {_db_message(exc)}") from None

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


def _with_session_options(url: str, options: str) -> str:
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    existing = " ".join(value for key, value in params if key == "options")
    params = [(key, value) for key, value in params if key != "options"]
    params.append(("options", f"{existing} {options}".strip()))
    return urlunsplit(parts._replace(query=urlencode(params, quote_via=quote)))


def _db_message(exc: BaseException) -> str:
    """PostgreSQL's own message out of connectorx's debug dump of the error, when it has one."""
    text = str(exc)
    marker = 'message: "'
    if marker in text:
        return text.split(marker, 1)[1].split('", ', 1)[0].replace('\\"', '"')
    return text[:500]


@dataclass
class PartLimits:
    max_rows: int = DEFAULT_PART_MAX_ROWS
    max_bytes: int = DEFAULT_PART_MAX_BYTES


SLICE_PART_STRIDE = 10_000  # slice i numbers its parts from i * 10,000: part names sort in row order


class ExportBudget:
    """The tenant's row and byte quotas, shared by the slices of one export (thread-safe)."""

    def __init__(self, max_rows: int | None = None, max_bytes: int | None = None) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._rows: dict[int, int] = {}
        self._bytes: dict[int, int] = {}

    def check_rows(self, slot: int, rows: int) -> None:
        """Slice ``slot`` is about to have written ``rows`` rows; QuotaExceeded if that is over the total."""
        if self.max_rows is None:
            return
        with self._lock:
            self._rows[slot] = rows
            if sum(self._rows.values()) > self.max_rows:
                raise QuotaExceeded.for_rows(self.max_rows)

    def check_bytes(self, slot: int, written: int) -> None:
        if self.max_bytes is None:
            return
        with self._lock:
            self._bytes[slot] = written
            if sum(self._bytes.values()) > self.max_bytes:
                raise QuotaExceeded.for_bytes(self.max_bytes)


def write_export(
    reader: pa.RecordBatchReader,
    *,
    export_id: str,
    request: ExportRequest,
    store: ExportStore,
    limits: PartLimits,
    on_progress: Callable[[int], bool] | None = None,
    workdir: Path | None = None,
    progress_interval: float = 0.5,
    max_rows: int | None = None,
    max_bytes: int | None = None,
    owns_export: Callable[[], bool] | None = None,
    budget: ExportBudget | None = None,
    first_part: int = 0,
    as_slice: bool = False,
) -> ExportOutcome:
    """Write every batch of ``reader`` into parts under the export's prefix (no manifest yet).

    ``on_progress(rows_done)`` is called after batches (at most every ``progress_interval``
    seconds) and after each part; when it returns False the export stops with ExportCancelled.
    More than ``max_rows`` rows, or parts totalling more than ``max_bytes``, stop it with
    QuotaExceeded (the tenant's quotas; a query limited to ``max_rows + 1`` rows stops early).
    On any failure the parts already uploaded are deleted, so no half-export is left behind, unless
    ``owns_export()`` says another run has taken the export over: the files under the prefix are its own.

    ``as_slice``: one of several concurrent writers of the export (``write_export_slices``): its parts
    are numbered from ``first_part``, quotas are counted in the shared ``budget``, and clearing the
    prefix, the empty part of an empty export and the clean-up after a failure are left to the caller.
    """
    budget = budget or ExportBudget(max_rows, max_bytes)
    started = time.monotonic()
    prefix = export_prefix(request.tenant_id, export_id)
    ext = file_extension(request.format, request.compression)
    ctype = content_type(request.format, request.compression)
    neutralise = bool(request.options.get("neutralise_formulas", True))
    schema = reader.schema
    parts: list[PartInfo] = []
    rows_done = 0
    bytes_done = 0  # of the finished parts
    pending: Future[None] | None = None
    last_progress = 0.0

    def report(force: bool = False) -> None:
        nonlocal last_progress
        now = time.monotonic()
        if on_progress is None or (not force and now - last_progress < progress_interval):
            return
        last_progress = now
        if on_progress(rows_done) is False:
            raise ExportCancelled("the export was cancelled or taken over by another run")

    with tempfile.TemporaryDirectory(prefix="pulse-export-", dir=workdir) as tmp, ThreadPoolExecutor(1) as uploads:
        writer = None
        upload: PartUpload | None = None  # the part being written goes up while it grows (S3)
        try:
            if not as_slice:  # clear what an earlier, crashed attempt may have left under this prefix
                store.delete_prefix(prefix)

            def finish_part() -> None:
                nonlocal writer, upload, pending, bytes_done
                assert writer is not None and upload is not None
                result = writer.close()
                writer = None
                bytes_done += result.bytes
                budget.check_bytes(first_part, bytes_done)  # over quota: `upload` is still set, the except aborts it
                part_upload, upload = upload, None
                index = first_part + len(parts)
                path = Path(tmp) / f"part-{index:05d}.{ext}"
                key = f"{prefix}part-{index:05d}.{ext}"
                parts.append(PartInfo(index, key, result.rows, result.bytes, result.sha256))
                if pending is not None:
                    pending.result()  # at most one upload in flight: bounded disk as well as memory

                def publish() -> None:
                    # A run that was frozen while its export was taken over must not publish over the new
                    # run's part of the same name: ownership is checked again right before each publish.
                    if owns_export is not None and not owns_export():
                        part_upload.abort()
                        raise ExportCancelled("the export was taken over by another run: its parts are not published")
                    part_upload.finish()
                    path.unlink(missing_ok=True)

                pending = uploads.submit(publish)
                report(force=True)

            def new_writer() -> Any:
                nonlocal upload
                name = f"part-{first_part + len(parts):05d}.{ext}"
                path = Path(tmp) / name
                part_writer = open_part_writer(
                    path, request.format, request.compression, schema, neutralise_formulas=neutralise
                )
                upload = store.begin_upload(f"{prefix}{name}", path, content_type=ctype)
                return part_writer

            for batch in reader:
                if batch.num_rows == 0:
                    continue
                offset = 0
                while offset < batch.num_rows:
                    if writer is None:
                        writer = new_writer()
                    room = limits.max_rows - writer.rows
                    piece = batch.slice(offset, room) if batch.num_rows - offset > room else batch.slice(offset)
                    budget.check_rows(first_part, rows_done + piece.num_rows)
                    writer.write(piece)
                    offset += piece.num_rows
                    rows_done += piece.num_rows
                    budget.check_bytes(first_part, bytes_done + writer.bytes_written)
                    if writer.rows >= limits.max_rows or writer.bytes_written >= limits.max_bytes:
                        finish_part()
                report()
            if writer is not None or (not parts and not as_slice):
                if writer is None:
                    writer = new_writer()  # an empty export still gets one valid (empty) file
                finish_part()
            if pending is not None:
                pending.result()
        except BaseException:
            if writer is not None:
                writer.abort()
            if upload is not None:
                upload.abort()
            if pending is not None:
                pending.exception()  # wait for it; its own error is secondary to the one raised
            if not as_slice and (owns_export is None or owns_export()):
                discard_export(store, prefix)
            raise
    return ExportOutcome(
        prefix=prefix,
        location=store.uri(prefix),
        columns=[{"name": n, "type": t} for n, t in output_schema(request.format, schema)],
        parts=parts,
        row_count=rows_done,
        bytes=sum(p.bytes for p in parts),
        seconds=time.monotonic() - started,
    )


def write_export_slices(
    open_readers: Sequence[Callable[[], pa.RecordBatchReader]],
    *,
    export_id: str,
    request: ExportRequest,
    store: ExportStore,
    on_progress: Callable[[int], bool] | None = None,
    max_rows: int | None = None,
    max_bytes: int | None = None,
    owns_export: Callable[[], bool] | None = None,
    stagger_seconds: float = 1.0,
    **options: Any,
) -> ExportOutcome:
    """``write_export`` for an export split into consecutive slices, each streamed by its own thread.

    Slice ``i`` writes parts numbered from ``i * SLICE_PART_STRIDE``, so the part names sort in the
    export's row order; the outcome lists the parts in that order, indexed 0, 1, 2... Quotas count all
    slices together. When one slice fails the others stop at their next progress report, then the
    prefix is cleared once; the first real error (not another slice's ExportCancelled) is raised.

    The other slices open their queries once the first slice has written its first batch (or after
    ``stagger_seconds``): connectorx holds the GIL while it waits for a batch (sfu-db/connector-x#564),
    so a slice waiting for its first rows would stall the first slice, and the export's first row.
    """
    started = time.monotonic()
    prefix = export_prefix(request.tenant_id, export_id)
    store.delete_prefix(prefix)  # what an earlier, crashed attempt may have left
    budget = ExportBudget(max_rows, max_bytes)
    failed = threading.Event()
    lock = threading.Lock()
    rows_by_slice = [0] * len(open_readers)
    schemas: list[pa.Schema] = []
    first_batch = threading.Event()  # the first slice wrote its first batch (or ended): the others start

    def progress_of(index: int) -> Callable[[int], bool]:
        def report(rows: int) -> bool:
            with lock:  # one report at a time: on_progress writes the job row
                rows_by_slice[index] = rows
                if failed.is_set():
                    return False
                return on_progress is None or on_progress(sum(rows_by_slice)) is not False

        return report

    def run(index: int) -> ExportOutcome:
        try:
            if index > 0:
                first_batch.wait(stagger_seconds)
                if failed.is_set():
                    raise ExportCancelled("another slice failed")
            reader = open_readers[index]()
            schemas.append(reader.schema)
            if index == 0:
                reader = _signalling_first_batch(reader, first_batch)
            return write_export(
                reader,
                export_id=export_id,
                request=request,
                store=store,
                on_progress=progress_of(index),
                budget=budget,
                first_part=index * SLICE_PART_STRIDE,
                as_slice=True,
                owns_export=owns_export,
                **options,
            )
        except BaseException:
            failed.set()
            first_batch.set()
            raise

    with ThreadPoolExecutor(len(open_readers), thread_name_prefix="pulse-slice") as pool:
        futures = [pool.submit(run, i) for i in range(len(open_readers))]
        errors = [f.exception() for f in futures]
    if failed.is_set() or any(errors):
        if owns_export is None or owns_export():
            discard_export(store, prefix)
        raised = [e for e in errors if e is not None]
        raise next((e for e in raised if not isinstance(e, ExportCancelled)), raised[0])
    outcomes = [f.result() for f in futures]
    parts = [part for outcome in outcomes for part in outcome.parts]
    if not parts:  # an empty export still gets one valid (empty) file
        empty = pa.RecordBatchReader.from_batches(schemas[0], iter(()))
        return write_export(
            empty, export_id=export_id, request=request, store=store, owns_export=owns_export, **options
        )
    return ExportOutcome(
        prefix=prefix,
        location=store.uri(prefix),
        columns=outcomes[0].columns,
        parts=[PartInfo(i, p.key, p.rows, p.bytes, p.sha256) for i, p in enumerate(parts)],
        row_count=sum(o.row_count for o in outcomes),
        bytes=sum(o.bytes for o in outcomes),
        seconds=time.monotonic() - started,
    )


def _signalling_first_batch(reader: pa.RecordBatchReader, event: threading.Event) -> pa.RecordBatchReader:
    """``reader``, setting ``event`` once its first batch is consumed (written and reported: the consumer
    asks for the next one), or when it ends or fails before that."""

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in reader:
                yield batch
                event.set()
        finally:
            event.set()

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


class ConcurrentCheck:
    """Runs ``check(conn)`` on its own PostgreSQL connection, in a thread, while the rows stream.

    A plan whose metric columns were typed from a sample is checked this way for a row with a key
    the sample lacked: that pass over every row overlaps the export instead of delaying its first
    row. The check's backend runs without parallel workers, leaving the other cores to the export.
    With ``start_after``, it waits for that event (the export's first rows): until then its scan
    would compete with the export's queries for the cores and delay the first row.
    """

    def __init__(
        self, database_url: str, check: Callable[[Any], bool], *, start_after: threading.Event | None = None
    ) -> None:
        self._url = database_url
        self._check = check
        self._conn: Any = None
        self._cancelled = False
        self._start = start_after
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pulse-check")
        self._future: Future[bool] = self._pool.submit(self._run)

    def _run(self) -> bool:
        import psycopg

        if self._start is not None:
            self._start.wait()
        if self._cancelled:
            raise ExportCancelled("check cancelled")
        with psycopg.connect(self._url, autocommit=True) as conn:
            self._conn = conn
            if self._cancelled:
                raise ExportCancelled("check cancelled")
            conn.execute("SET max_parallel_workers_per_gather = 0")
            return self._check(conn)

    def result(self) -> bool:
        """Wait for the check (starting it now if it still waits); its errors are raised here."""
        if self._start is not None:
            self._start.set()
        return self._future.result()

    def cancel(self) -> None:
        """Interrupt the check if it still runs, and wait for its thread."""
        self._cancelled = True
        if self._start is not None:
            self._start.set()  # a check still waiting to start ends now
        if not self._future.done() and self._conn is not None:
            self._conn.cancel_safe()
        self._pool.shutdown(wait=True)
        self._future.exception()  # a cancelled query's error is expected: retrieve it, do not raise it


class PartsChanged(RuntimeError):
    """A part in the store is not the file this run wrote (missing, or of another size)."""


def verify_parts(store: ExportStore, parts: Sequence[dict[str, Any]]) -> None:
    """Check that every part is in the store with the size this run wrote, before the manifest vouches for it."""
    for part in parts:
        try:
            size = store.size(part["key"])
        except Exception as exc:  # FileNotFoundError, or S3's 404 ClientError
            raise PartsChanged(f"part {part['key']} is missing from the store ({type(exc).__name__})") from None
        if size != part["bytes"]:
            raise PartsChanged(
                f"part {part['key']} has {size} bytes in the store, not the {part['bytes']} this run wrote:"
                " another run wrote under this export's prefix"
            )


def discard_export(store: ExportStore, prefix: str) -> None:
    """Remove everything an unfinished export wrote, including unfinished multipart uploads."""
    store.delete_prefix(prefix)
    store.abort_multipart_uploads(prefix)


def write_manifest(
    store: ExportStore, export_id: str, request: ExportRequest, outcome: dict[str, Any]
) -> dict[str, Any]:
    """Write manifest.json, last: its presence is what makes an export complete."""
    manifest = build_manifest(export_id, request, outcome)
    body = json.dumps(manifest, indent=2).encode("utf-8")
    store.put_bytes(outcome["prefix"] + MANIFEST_NAME, body, content_type="application/json")
    return manifest


def build_manifest(export_id: str, request: ExportRequest, outcome: dict[str, Any]) -> dict[str, Any]:
    """The manifest: parts with rows, bytes and sha256; columns and types; format; created_at."""
    return {
        "version": 1,
        "export_id": export_id,
        "tenant_id": request.tenant_id,
        "export_type": request.export_type,
        "format": request.format,
        "compression": request.compression,
        "columns": outcome["columns"],
        "filters": dict(request.filters),
        "row_limit": request.row_limit,
        "row_count": outcome["row_count"],
        "bytes": outcome["bytes"],
        "location": outcome["location"],
        "parts": [{**p, "file": p["key"].rsplit("/", 1)[-1]} for p in outcome["parts"]],
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
