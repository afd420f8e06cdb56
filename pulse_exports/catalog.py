"""What can be exported and how to query it: export types, their columns and filters, and the
validation that turns a request into a safe query.

SQL is composed with psycopg's ``sql`` module only: identifiers come from this catalog (or from
PostgreSQL's own catalog for operator tables) and every request value is a quoted ``Literal``.
connectorx takes no bind parameters, so this is the one place that makes request text safe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from pulse_exports.formats import COMPRESSIONS, FORMATS

TIME_RANGES = {"1h": "1 hour", "6h": "6 hours", "24h": "24 hours", "7d": "7 days", "30d": "30 days", "90d": "90 days"}
MAX_LIST_VALUES = 10_000
MAX_VALUE_LENGTH = 256
MAX_ROW_LIMIT = 1_000_000_000
MAX_METRIC_COLUMNS = 500
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,62}$")
_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class ExportRequestError(ValueError):
    """A request that cannot become an export; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Filter:
    """A filter a type accepts: ``kind`` is list (values matched with = ANY) or time."""

    name: str
    kind: str
    column: sql.Composable | None = None


@dataclass(frozen=True)
class ExportType:
    """One exportable thing: its FROM clause, columns (name -> expression) and filters."""

    name: str
    description: str
    source: sql.Composable
    tenant_column: sql.Composable
    columns: Mapping[str, sql.Composable]
    order_by: Sequence[sql.Composable]
    time_column: sql.Composable | None = None
    filters: Mapping[str, Filter] = field(default_factory=dict)
    metrics_column: sql.Composable | None = None  # jsonb flattened to one typed column per key

    def filter_names(self) -> list[str]:
        names = list(self.filters)
        if self.time_column is not None:
            names = ["time_range", "time_from", "time_to", *names]
        if self.metrics_column is not None:
            names.append("metric_names")
        return names


def _col(table: str, name: str) -> sql.Composable:
    return sql.Identifier(table, name)


def _list_filter(name: str, table: str, column: str) -> Filter:
    return Filter(name, "list", _col(table, column))


def builtin_types() -> dict[str, ExportType]:
    """The export types of the product schema: devices, alerts, telemetry."""
    r, s, a, t = "r", "s", "a", "t"
    devices = ExportType(
        name="devices",
        description="Device registry joined with each device's current state.",
        source=sql.SQL("{} AS r LEFT JOIN {} AS s ON s.tenant_id = r.tenant_id AND s.device_id = r.device_id").format(
            sql.Identifier("device_registry"), sql.Identifier("device_state")
        ),
        tenant_column=_col(r, "tenant_id"),
        columns={
            "device_id": _col(r, "device_id"),
            "name": _col(r, "name"),
            "model": _col(r, "model"),
            "device_type": _col(r, "device_type"),
            "site_id": _col(r, "site_id"),
            "tags": _col(r, "tags"),
            "status": _col(s, "status"),
            "last_seen_at": _col(s, "last_seen_at"),
            "created_at": _col(r, "created_at"),
        },
        order_by=[_col(r, "device_id")],
        filters={
            "device_ids": _list_filter("device_ids", r, "device_id"),
            "site_ids": _list_filter("site_ids", r, "site_id"),
            "status": _list_filter("status", s, "status"),
        },
    )
    alerts = ExportType(
        name="alerts",
        description="Fleet alerts with their lifecycle timestamps.",
        source=sql.SQL("{} AS a").format(sql.Identifier("fleet_alert")),
        tenant_column=_col(a, "tenant_id"),
        time_column=_col(a, "created_at"),
        columns={
            "id": _col(a, "id"),
            "device_id": _col(a, "device_id"),
            "site_id": _col(a, "site_id"),
            "alert_type": _col(a, "alert_type"),
            "severity": _col(a, "severity"),
            "status": _col(a, "status"),
            "summary": _col(a, "summary"),
            "created_at": _col(a, "created_at"),
            "acknowledged_at": _col(a, "acknowledged_at"),
            "closed_at": _col(a, "closed_at"),
        },
        order_by=[_col(a, "created_at"), _col(a, "id")],
        filters={
            "device_ids": _list_filter("device_ids", a, "device_id"),
            "site_ids": _list_filter("site_ids", a, "site_id"),
            "status": _list_filter("status", a, "status"),
            "alert_types": _list_filter("alert_types", a, "alert_type"),
            "severities": _list_filter("severities", a, "severity"),
        },
    )
    telemetry = ExportType(
        name="telemetry",
        description="Telemetry points, metrics flattened to one typed column per metric key.",
        source=sql.SQL("{} AS t").format(sql.Identifier("telemetry")),
        tenant_column=_col(t, "tenant_id"),
        time_column=_col(t, "time"),
        columns={
            "time": _col(t, "time"),
            "device_id": _col(t, "device_id"),
            "site_id": _col(t, "site_id"),
            "seq": _col(t, "seq"),
        },
        order_by=[_col(t, "time"), _col(t, "device_id"), _col(t, "seq")],
        filters={
            "device_ids": _list_filter("device_ids", t, "device_id"),
            "site_ids": _list_filter("site_ids", t, "site_id"),
        },
        metrics_column=_col(t, "metrics"),
    )
    return {e.name: e for e in (devices, alerts, telemetry)}


@dataclass(frozen=True)
class OperatorTable:
    """A table an operator allows for export: ``name`` (optionally schema-qualified), its tenant
    column, an optional time column, and the export type name it is offered under."""

    name: str
    tenant_column: str
    time_column: str | None = None
    export_type: str | None = None

    @classmethod
    def parse_all(cls, text: str | None) -> list[OperatorTable]:
        """Parse the operator's JSON list (``PULSE_EXPORT_TABLES``); errors name the entry."""
        if not text or not text.strip():
            return []
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"PULSE_EXPORT_TABLES is not valid JSON: {exc}") from exc
        if not isinstance(items, list):
            raise ValueError("PULSE_EXPORT_TABLES must be a JSON list of tables")
        tables = []
        for i, item in enumerate(items):
            try:
                table = cls(**item)
            except TypeError as exc:
                raise ValueError(f"PULSE_EXPORT_TABLES[{i}]: {exc}") from exc
            for part in [*table.name.split("."), table.tenant_column, table.time_column or "x"]:
                if not _IDENT.match(part):
                    raise ValueError(f"PULSE_EXPORT_TABLES[{i}]: {part!r} is not a plain identifier")
            tables.append(table)
        return tables

    @property
    def type_name(self) -> str:
        return self.export_type or self.name.split(".")[-1]


def operator_type(conn: psycopg.Connection[Any], table: OperatorTable) -> ExportType:
    """Build an export type for an operator's table from PostgreSQL's catalog of its columns."""
    schema, _, name = table.name.rpartition(".")
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = coalesce(nullif(%s, ''), current_schema()) AND table_name = %s"
        " ORDER BY ordinal_position",
        (schema, name),
    ).fetchall()
    names = [r[0] for r in rows]
    if not names:
        raise ValueError(f"operator table {table.name!r} does not exist in the source database")
    for required in (table.tenant_column, table.time_column):
        if required and required not in names:
            raise ValueError(f"operator table {table.name!r} has no column {required!r}")
    ident = sql.Identifier(*table.name.split("."))
    columns = {n: _col("o", n) for n in names if n != table.tenant_column}
    time_col = _col("o", table.time_column) if table.time_column else None
    return ExportType(
        name=table.type_name,
        description=f"Operator-allowed table {table.name}.",
        source=sql.SQL("{} AS o").format(ident),
        tenant_column=_col("o", table.tenant_column),
        time_column=time_col,
        columns=columns,
        order_by=[time_col] if time_col is not None else [_col("o", names[0])],
    )


@dataclass(frozen=True)
class ExportRequest:
    """A validated export request: every field checked against the catalog."""

    tenant_id: str
    export_type: str
    format: str
    compression: str
    columns: tuple[str, ...] | None = None
    filters: Mapping[str, Any] = field(default_factory=dict)
    row_limit: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryPlan:
    """The SQL for one export and the columns it returns, in order.

    ``metric_columns`` are the (key, PostgreSQL type) pairs flattened from the metrics jsonb. When
    ``metrics_sampled`` is true they were read from a sample of the rows, and the export is right only if
    ``unplanned_keys_query`` returns false: no row has a key the sample lacked, or a value of another
    JSON type than the sample's (a string "12" in a number key). Without that query (the request names
    its keys) the query casts them strictly instead: a value of another JSON type fails it.
    """

    query: str
    estimated_rows: int  # the planner's estimate of the query's rows (EXPLAIN of a COUNT, no scan)
    columns: tuple[str, ...]
    metric_columns: tuple[tuple[str, str], ...] = ()
    metrics_sampled: bool = False
    unplanned_keys_query: str | None = None
    # The same rows as ``query``, split into consecutive time ranges (each ordered like ``query``, so
    # their concatenation is ``query``'s order); empty when the export is not split.
    slice_queries: tuple[str, ...] = ()


class Catalog:
    """The export types on offer: the built-in ones plus the operator's tables."""

    def __init__(self, types: Mapping[str, ExportType]) -> None:
        self.types = dict(types)

    @classmethod
    def load(
        cls, conn: psycopg.Connection[Any] | None = None, operator_tables: Sequence[OperatorTable] = ()
    ) -> Catalog:
        types = builtin_types()
        if operator_tables:
            if conn is None:
                raise ValueError("operator tables need a source database connection to read their columns")
            for table in operator_tables:
                types[table.type_name] = operator_type(conn, table)
        return cls(types)

    def describe(self) -> list[dict[str, Any]]:
        """The catalog as plain data (for `GET /export-types` and the CLI)."""
        return [
            {
                "name": t.name,
                "description": t.description,
                "columns": list(t.columns) + (["<metric keys>"] if t.metrics_column is not None else []),
                "filters": t.filter_names(),
                "formats": list(FORMATS),
                "compressions": list(COMPRESSIONS),
            }
            for t in self.types.values()
        ]

    # -- validation -----------------------------------------------------------------------
    def validate(
        self,
        *,
        tenant_id: str,
        export_type: str,
        format: str = "csv",
        compression: str | None = None,
        columns: Sequence[str] | str | None = None,
        filters: Mapping[str, Any] | None = None,
        row_limit: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> ExportRequest:
        """Check a raw request against the catalog; raises ExportRequestError naming the field."""
        if not isinstance(tenant_id, str) or not _TENANT_ID.match(tenant_id):
            raise ExportRequestError("tenant_id", "must be 1-128 letters, digits, '.', '_' or '-'")
        etype = self.types.get(export_type) if isinstance(export_type, str) else None
        if etype is None:
            raise ExportRequestError(
                "export_type", f"unknown export type {_shown(export_type)}; one of {', '.join(sorted(self.types))}"
            )
        if format not in FORMATS:
            raise ExportRequestError("format", f"unknown format {_shown(format)}; one of {', '.join(FORMATS)}")
        if compression is None:
            compression = "zstd" if format == "parquet" else "none"
        if compression not in COMPRESSIONS:
            raise ExportRequestError(
                "compression", f"unknown compression {_shown(compression)}; one of {', '.join(COMPRESSIONS)}"
            )
        return ExportRequest(
            tenant_id=tenant_id,
            export_type=etype.name,
            format=format,
            compression=compression,
            columns=self._validate_columns(etype, columns),
            filters=self._validate_filters(etype, filters or {}),
            row_limit=_validate_row_limit(row_limit),
            options=_validate_options(options or {}),
        )

    def _validate_columns(self, etype: ExportType, columns: Sequence[str] | str | None) -> tuple[str, ...] | None:
        if columns is None:
            return None
        if isinstance(columns, str):
            columns = [c.strip() for c in columns.split(",") if c.strip()]
        if not isinstance(columns, (list, tuple)) or not columns:
            raise ExportRequestError("columns", "must be a non-empty list of column names")
        seen: list[str] = []
        for i, name in enumerate(columns):
            if not isinstance(name, str) or name not in etype.columns:
                allowed = ", ".join(etype.columns)
                raise ExportRequestError(f"columns[{i}]", f"unknown column {_shown(name)}; allowed: {allowed}")
            if name in seen:
                raise ExportRequestError(f"columns[{i}]", f"column {name!r} is listed twice")
            seen.append(name)
        return tuple(seen)

    def _validate_filters(self, etype: ExportType, filters: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(filters, Mapping):
            raise ExportRequestError("filters", "must be a JSON object")
        allowed = etype.filter_names()
        clean: dict[str, Any] = {}
        for key, value in filters.items():
            where = f"filters.{key}" if isinstance(key, str) and _IDENT.match(key) else "filters"
            if key not in allowed:
                raise ExportRequestError(where, f"unknown filter {_shown(key)}; allowed: {', '.join(allowed)}")
            if value is None:
                continue
            if key == "time_range":
                if value not in TIME_RANGES:
                    raise ExportRequestError(where, f"must be one of {', '.join(TIME_RANGES)}")
                clean[key] = value
            elif key in ("time_from", "time_to"):
                clean[key] = _parse_time(where, value).isoformat()
            elif key == "metric_names":
                names = _string_list(where, value)
                for i, name in enumerate(names):
                    if not _METRIC_NAME.match(name):
                        raise ExportRequestError(f"{where}[{i}]", f"{_shown(name)} is not a metric name")
                clean[key] = names
            else:
                clean[key] = _string_list(where, value)
        if "time_range" in clean and ("time_from" in clean or "time_to" in clean):
            raise ExportRequestError("filters.time_range", "use either time_range or time_from/time_to, not both")
        if "time_from" in clean and "time_to" in clean and clean["time_from"] >= clean["time_to"]:
            raise ExportRequestError("filters.time_to", "must be after filters.time_from")
        return clean

    # -- query composition ----------------------------------------------------------------
    def plan(
        self,
        conn: psycopg.Connection[Any],
        request: ExportRequest,
        *,
        metric_sample_rows: int | None = None,
        slices: int = 1,
        min_slice_rows: int = 500_000,
    ) -> QueryPlan:
        """Compose the export's SELECT (and a cheap COUNT for the estimate) for this tenant.

        With ``metric_sample_rows``, metric columns are typed from that many rows when the export
        has more and the sample settles every type (``metrics_sampled``); the caller must then treat
        a failed query or a true ``unplanned_keys_query`` as "plan again without a sample". Without
        it, every row of the export is read first.

        With ``slices`` > 1, an export ordered by its type's time column and estimated at
        ``min_slice_rows`` rows or more per slice also gets ``slice_queries``: its time span cut
        into equal ranges, so that several backends can produce its rows at once.
        """
        etype = self.types[request.export_type]
        where = self._where(etype, request)
        selected = list(request.columns) if request.columns else list(etype.columns)
        items = [sql.SQL("{} AS {}").format(etype.columns[c], sql.Identifier(c)) for c in selected]
        names = list(selected)
        metric_columns: list[tuple[str, str]] = []
        sampled, unplanned_keys = False, None
        if self._flattens_metrics(etype, request):
            assert etype.metrics_column is not None
            kinds = None
            if metric_sample_rows is not None and self._has_more_rows(conn, etype, request, where, metric_sample_rows):
                kinds = self._metric_kinds(conn, etype, request, where, sample_rows=metric_sample_rows)
                if not _sample_settles_types(kinds):
                    kinds = None
            sampled = kinds is not None
            if kinds is None:
                kinds = self._metric_kinds(conn, etype, request, where)
            typed_keys = _typed_keys(kinds, request)
            metric_columns = _metric_columns(names, typed_keys)
            checked = sampled and not request.filters.get("metric_names")
            for key, pg_type in metric_columns:
                if sampled and not checked and pg_type in _STRICT_CASTS:
                    # jsonb -> double precision/boolean refuses strings and other JSON types, where
                    # ->> text would convert "12" or "yes": a sample's type is never silently wrong.
                    # With the check below, the cheaper ->> text cast is used and the check catches those.
                    value = sql.SQL("({} -> {})").format(etype.metrics_column, sql.Literal(key))
                else:
                    value = sql.SQL("({} ->> {})").format(etype.metrics_column, sql.Literal(key))
                expr = sql.SQL("{}::{}").format(value, sql.SQL(pg_type)) if pg_type != "text" else value
                items.append(sql.SQL("{} AS {}").format(expr, sql.Identifier(key)))
                names.append(key)
            if checked:
                unplanned_keys = self._unplanned_keys_query(etype, request, where, typed_keys)

        def select(condition: sql.Composable) -> sql.Composable:
            query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(
                sql.SQL(", ").join(items), etype.source, condition, sql.SQL(", ").join(etype.order_by)
            )
            if request.row_limit is not None:
                query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(request.row_limit))
            return query

        query = select(where)
        estimate = _planner_rows(conn, _count_query(etype, where, request))
        ranges = self._time_slices(conn, etype, where, estimate, slices, min_slice_rows) if slices > 1 else []
        return QueryPlan(
            query.as_string(conn),
            estimate,
            tuple(names),
            tuple(metric_columns),
            metrics_sampled=sampled,
            unplanned_keys_query=unplanned_keys.as_string(conn) if unplanned_keys is not None else None,
            slice_queries=tuple(select(sql.SQL("{} AND {}").format(where, r)).as_string(conn) for r in ranges),
        )

    @staticmethod
    def _time_slices(
        conn: psycopg.Connection[Any],
        etype: ExportType,
        where: sql.Composable,
        estimate: int,
        slices: int,
        min_slice_rows: int,
    ) -> list[sql.Composable]:
        """Conditions cutting the export's time span into up to ``slices`` equal, consecutive ranges.

        The first range has no lower bound and the last no upper one, so together they cover every
        row whatever its time. Only for types ordered by their time column first: then the slices,
        one after the other, are in the export's order.
        """
        time = etype.time_column
        if time is None or not etype.order_by or etype.order_by[0] != time:
            return []
        count_slices = min(slices, estimate // max(min_slice_rows, 1))
        if count_slices < 2:
            return []
        with conn.cursor(row_factory=tuple_row) as cur:
            span = cur.execute(
                sql.SQL("SELECT min({}), max({}) FROM {} WHERE {}").format(time, time, etype.source, where)
            ).fetchone()
        if span is None or span[0] is None or span[0] == span[1] or not isinstance(span[0], datetime):
            return []
        low, high = span
        bounds = [low + (high - low) * k / count_slices for k in range(1, count_slices)]
        ranges = [sql.SQL("{} < {}").format(time, sql.Literal(bounds[0]))]
        ranges += [
            sql.SQL("{} >= {} AND {} < {}").format(time, sql.Literal(lo), time, sql.Literal(hi))
            for lo, hi in zip(bounds, bounds[1:], strict=False)
        ]
        ranges.append(sql.SQL("{} >= {}").format(time, sql.Literal(bounds[-1])))
        return ranges

    @staticmethod
    def _flattens_metrics(etype: ExportType, request: ExportRequest) -> bool:
        return etype.metrics_column is not None and (request.columns is None or "metric_names" in request.filters)

    def _has_more_rows(
        self, conn: psycopg.Connection[Any], etype: ExportType, request: ExportRequest, where: sql.Composable, n: int
    ) -> bool:
        """Whether the export has more than ``n`` rows (reads at most n + 1 of them)."""
        if request.row_limit is not None and request.row_limit <= n:
            return False
        query = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE {} LIMIT {}) AS head").format(
            etype.source, where, sql.Literal(n + 1)
        )
        row = conn.execute(query).fetchone()
        return bool(row and int(row[0]) > n)

    def estimate_rows(self, conn: psycopg.Connection[Any], request: ExportRequest) -> int:
        """The planner's estimate of an export's rows: EXPLAIN only, no scan (the API answers with it)."""
        etype = self.types[request.export_type]
        return _planner_rows(conn, _count_query(etype, self._where(etype, request), request))

    def _where(self, etype: ExportType, request: ExportRequest) -> sql.Composable:
        clauses: list[sql.Composable] = [sql.SQL("{} = {}").format(etype.tenant_column, sql.Literal(request.tenant_id))]
        f = request.filters
        if etype.time_column is not None:
            if "time_range" in f:
                clauses.append(
                    sql.SQL("{} >= now() - {}::interval").format(
                        etype.time_column, sql.Literal(TIME_RANGES[f["time_range"]])
                    )
                )
            if "time_from" in f:
                clauses.append(sql.SQL("{} >= {}::timestamptz").format(etype.time_column, sql.Literal(f["time_from"])))
            if "time_to" in f:
                clauses.append(sql.SQL("{} < {}::timestamptz").format(etype.time_column, sql.Literal(f["time_to"])))
        for name, flt in etype.filters.items():
            if name in f and flt.column is not None:
                clauses.append(sql.SQL("{} = ANY({}::text[])").format(flt.column, sql.Literal(list(f[name]))))
        if etype.metrics_column is not None and "metric_names" in f:
            clauses.append(
                sql.SQL("{} ?| {}::text[]").format(etype.metrics_column, sql.Literal(list(f["metric_names"])))
            )
        return sql.SQL(" AND ").join(clauses)

    def _exported_rows(
        self, etype: ExportType, request: ExportRequest, where: sql.Composable, sample_rows: int | None = None
    ) -> tuple[sql.Composable, sql.Composable, sql.Composable]:
        """FROM item, metrics expression and WHERE of the rows whose keys become columns: the
        export's rows (the first ``row_limit`` in export order), or the first ``sample_rows`` of them."""
        assert etype.metrics_column is not None
        if request.row_limit is None and sample_rows is None:
            return etype.source, etype.metrics_column, where
        limit = min(n for n in (request.row_limit, sample_rows) if n is not None)
        # A row limit exports the first rows in export order; a sample may be any rows (no sort).
        order = (
            sql.SQL(" ORDER BY {}").format(sql.SQL(", ").join(etype.order_by))
            if request.row_limit is not None
            else sql.SQL("")
        )
        source = sql.SQL("(SELECT {} AS metrics FROM {} WHERE {}{} LIMIT {}) AS exported").format(
            etype.metrics_column, etype.source, where, order, sql.Literal(limit)
        )
        return source, sql.Identifier("exported", "metrics"), sql.SQL("true")

    def _unplanned_keys_query(
        self, etype: ExportType, request: ExportRequest, where: sql.Composable, typed_keys: Sequence[tuple[str, str]]
    ) -> sql.Composable:
        """Whether any exported row has a metric key outside ``typed_keys``, or a value that is neither
        null nor of its key's JSON type (number for double precision, boolean for boolean; text takes any).

        One pass of ``jsonb_each`` over the rows: 0.9 s of CPU per 2M rows here, as much as listing the keys
        alone; the strict ``->`` casts it replaces in the export query cost it ~0.6 s more than ``->>``."""
        source, metrics, rows_where = self._exported_rows(etype, request, where)

        def of_type(pg_type: str) -> sql.Literal:
            return sql.Literal(sorted(key for key, t in typed_keys if t == pg_type))

        return sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {source}, jsonb_each({metrics}) AS k(key, value) WHERE {where} AND ("
            "k.key <> ALL({keys}::text[])"
            " OR (k.key = ANY({numbers}::text[]) AND jsonb_typeof(k.value) NOT IN ('number', 'null'))"
            " OR (k.key = ANY({booleans}::text[]) AND jsonb_typeof(k.value) NOT IN ('boolean', 'null'))))"
        ).format(
            source=source,
            metrics=metrics,
            where=rows_where,
            keys=sql.Literal(sorted(key for key, _ in typed_keys)),
            numbers=of_type("double precision"),
            booleans=of_type("boolean"),
        )

    def _metric_kinds(
        self,
        conn: psycopg.Connection[Any],
        etype: ExportType,
        request: ExportRequest,
        where: sql.Composable,
        *,
        sample_rows: int | None = None,
    ) -> list[tuple[str, list[str]]]:
        """Each metric key of the export's rows (or of a sample of them) with its JSON types."""
        source, metrics, where = self._exported_rows(etype, request, where, sample_rows)
        wanted = request.filters.get("metric_names")
        if wanted:
            key_filter = sql.SQL("AND k.key = ANY({}::text[])").format(sql.Literal(list(wanted)))
        else:
            key_filter = sql.SQL("")
        # One pass over the rows, grouped by (key, JSON type) in hash aggregates that PostgreSQL
        # runs in its parallel workers. jsonb_object_keys plus a `->` lookup is about 5x cheaper
        # than jsonb_each (which copies every value), and array_agg(DISTINCT ...) per key would
        # sort all (key, type) pairs: 9.3 s -> 1.9 s for 2M rows.
        query = sql.SQL(
            "SELECT key, array_agg(kind) FROM ("
            "SELECT k.key, jsonb_typeof({metrics} -> k.key) AS kind"
            " FROM {source}, jsonb_object_keys({metrics}) AS k(key) WHERE {where} {key_filter} GROUP BY 1, 2"
            ") AS kinds GROUP BY key ORDER BY key LIMIT {limit}"
        ).format(
            metrics=metrics,
            source=source,
            where=where,
            key_filter=key_filter,
            limit=sql.Literal(MAX_METRIC_COLUMNS + 1),
        )
        return [(key, list(kinds)) for key, kinds in conn.execute(query).fetchall() if _METRIC_NAME.match(key)]

    def metric_keys(
        self, conn: psycopg.Connection[Any], etype: ExportType, request: ExportRequest, where: sql.Composable
    ) -> list[tuple[str, str]]:
        """The metric keys present in this export's rows, each with a PostgreSQL type to cast to."""
        return _typed_keys(self._metric_kinds(conn, etype, request, where), request)


_STRICT_CASTS = ("double precision", "boolean")


def _typed_keys(kinds: Sequence[tuple[str, Sequence[str]]], request: ExportRequest) -> list[tuple[str, str]]:
    """(key, PostgreSQL type) per key; requested keys keep their order, and get a (NULL) column
    when no row has them."""
    if len(kinds) > MAX_METRIC_COLUMNS:
        raise ExportRequestError(
            "filters.metric_names", f"more than {MAX_METRIC_COLUMNS} metric keys; choose some with metric_names"
        )
    keys = [(key, _pg_type(k)) for key, k in kinds]
    wanted = request.filters.get("metric_names")
    if wanted:
        found = dict(keys)
        return [(k, found.get(k, "double precision")) for k in wanted]
    return keys


def _sample_settles_types(kinds: Sequence[tuple[str, Sequence[str]]]) -> bool:
    """Whether more rows could change a type only in ways the check (or a strict cast) catches: true
    when every key is a number, a boolean, or already text (strings or mixed types); not when a key is
    only null so far, or an object/array (jsonb), which would become text on meeting a scalar."""
    return all(_pg_type(k) in (*_STRICT_CASTS, "text") and set(k) - {"null"} for _, k in kinds)


def _metric_columns(names: Sequence[str], keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The metric keys that become columns: each once, and none named like a selected column."""
    seen = set(names)
    columns = []
    for key, pg_type in keys:
        if key not in seen:
            seen.add(key)
            columns.append((key, pg_type))
    return columns


def _planner_rows(conn: psycopg.Connection[Any], count: sql.Composable) -> int:
    """The planner's row estimate for a COUNT query: instant, unlike count(*) over millions of rows."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(count)).fetchone()
    return int(row[0][0]["Plan"]["Plan Rows"]) if row else 0


def _count_query(etype: ExportType, where: sql.Composable, request: ExportRequest) -> sql.Composed:
    """A cheap row-count-shaped query of an export (no metric-key columns) for planner estimates."""
    count = sql.SQL("SELECT 1 FROM {} WHERE {}").format(etype.source, where)
    if request.row_limit is not None:
        count = sql.SQL("{} LIMIT {}").format(count, sql.Literal(request.row_limit))
    return count


def _pg_type(kinds: Sequence[str | None]) -> str:
    present = {k for k in kinds if k and k != "null"}
    if present == {"number"}:
        return "double precision"
    if present == {"boolean"}:
        return "boolean"
    if present <= {"object", "array"} and present:
        return "jsonb"
    return "text"


def _shown(value: object) -> str:
    """A request value quoted for an error message, cut short so errors stay readable."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _string_list(where: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ExportRequestError(where, "must be a non-empty list of strings")
    if len(value) > MAX_LIST_VALUES:
        raise ExportRequestError(where, f"at most {MAX_LIST_VALUES} values")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or len(item) > MAX_VALUE_LENGTH:
            raise ExportRequestError(f"{where}[{i}]", f"must be a string of 1-{MAX_VALUE_LENGTH} characters")
        if "\x00" in item:
            raise ExportRequestError(f"{where}[{i}]", "must not contain NUL characters")
    return list(value)


def _parse_time(where: str, value: Any) -> datetime:
    if not isinstance(value, str):
        raise ExportRequestError(where, "must be an ISO-8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ExportRequestError(where, f"{_shown(value)} is not an ISO-8601 timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _validate_row_limit(row_limit: Any) -> int | None:
    if row_limit is None:
        return None
    if isinstance(row_limit, bool) or not isinstance(row_limit, int) or not 1 <= row_limit <= MAX_ROW_LIMIT:
        raise ExportRequestError("row_limit", f"must be an integer from 1 to {MAX_ROW_LIMIT}")
    return row_limit


_OPTION_RULES: dict[str, tuple[type, int, int]] = {
    "part_max_rows": (int, 1, 100_000_000),
    "part_max_bytes": (int, 1024, 5 * 1024**3),
    "expires_in": (int, 60, 90 * 86400),
}


def _validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Per-request knobs: formula neutralising, part size and retention."""
    clean: dict[str, Any] = {}
    for key, value in options.items():
        where = f"options.{key}" if isinstance(key, str) and _IDENT.match(key) else "options"
        if value is None:
            continue
        if key == "neutralise_formulas":
            if not isinstance(value, bool):
                raise ExportRequestError(where, "must be true or false")
            clean[key] = value
        elif key in _OPTION_RULES:
            _, low, high = _OPTION_RULES[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ExportRequestError(where, f"must be an integer from {low} to {high}")
            clean[key] = value
        else:
            allowed = ", ".join(["neutralise_formulas", *_OPTION_RULES])
            raise ExportRequestError(where, f"unknown option {_shown(key)}; allowed: {allowed}")
    return clean
