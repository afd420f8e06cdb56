"""Structured logs: one JSON object (or one readable line) per record, carrying the export id and
tenant of the work it is about.

Two sources of those fields:
- the product API binds them per request (``log_context`` in a middleware, ``bind`` in the
  dependencies and handlers that learn the tenant and the export id);
- Dagster runs carry them as run tags (``pulse/export_id``, ``pulse/tenant``), which every record
  Dagster hands to the handlers of ``python_logs.dagster_handler_config`` (dagster.yaml) has in
  its ``dagster_meta``: ops need no code for it, and Dagster's own events (step failures) get them too.

``PULSE_LOG_FORMAT`` is ``json`` (the default) or ``text``. Every message and traceback passes
through ``redact`` on its way out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog

from pulse_exports.redact import redact

LOG_FORMATS = ("json", "text")
LOG_FORMAT_VARIABLE = "PULSE_LOG_FORMAT"

# The fields of the current scope. The dict itself is shared by the contexts copied from the scope
# (FastAPI runs sync dependencies and endpoints in threads with a copy), so bind() in one of them is
# seen by the request's other steps and by the access log line written when the request ends.
_fields: ContextVar[dict[str, str] | None] = ContextVar("pulse_log_fields", default=None)

# Run tags an export run carries (pulse_exports.jobs.export_tags), as log fields.
_RUN_TAG_FIELDS = {"pulse/export_id": "export_id", "pulse/tenant": "tenant", "pulse/export_type": "export_type"}
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_SIMPLE = (str, int, float, bool)


@contextmanager
def log_context(**fields: str) -> Iterator[dict[str, str]]:
    """A scope whose fields every record logged inside it carries (on top of the enclosing scope's)."""
    scope = {**(_fields.get() or {}), **fields}
    token = _fields.set(scope)
    try:
        yield scope
    finally:
        _fields.reset(token)


def bind(**fields: str) -> None:
    """Add fields to the current scope (e.g. the tenant, once the API key is checked)."""
    scope = _fields.get()
    if scope is None:
        _fields.set(dict(fields))  # outside any scope: for the rest of this context
    else:
        scope.update(fields)


def current_fields() -> dict[str, str]:
    return dict(_fields.get() or {})


def resolve_log_format(value: str | None = None) -> str:
    """``value``, else PULSE_LOG_FORMAT, else json; anything but json/text is refused naming the variable."""
    chosen = (value or os.environ.get(LOG_FORMAT_VARIABLE) or "json").strip().lower()
    if chosen not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_VARIABLE} must be one of {', '.join(LOG_FORMATS)}, not {chosen!r}")
    return chosen


def _add_fields(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """The scope's fields, Dagster's run/step/tags, and simple ``extra=`` values of the record."""
    record: logging.LogRecord = event["_record"]
    meta: Mapping[str, Any] | None = getattr(record, "dagster_meta", None)
    if meta:
        event["event"] = meta.get("orig_message") or event["event"]  # not Dagster's "job - run - step - msg"
        tags = meta.get("job_tags") or {}
        for tag, name in _RUN_TAG_FIELDS.items():
            if tags.get(tag):
                event[name] = tags[tag]
        for key in ("run_id", "job_name", "step_key"):
            if meta.get(key):
                event[key] = meta[key]
        if dagster_event := meta.get("dagster_event"):
            event["dagster_event"] = dagster_event.event_type.name  # RUN_SUCCESS, not its legacy value
    for key, value in record.__dict__.items():
        if key not in _STANDARD_ATTRIBUTES and not key.startswith(("_", "dagster")) and isinstance(value, _SIMPLE):
            event.setdefault(key, value)
    for key, value in current_fields().items():
        event.setdefault(key, value)
    return event


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in ("event", "exception", "stack"):
        if isinstance(event.get(key), str):
            event[key] = redact(event[key])
    return event


def formatter(log_format: str | None = None) -> logging.Formatter:
    """A logging.Formatter for any handler (dictConfig: ``{"()": "pulse_exports.logs.formatter"}``)."""
    render: list[structlog.typing.Processor] = (
        # "message", the key log pipelines (Loki, Elastic, Cloud Logging) look for first
        [structlog.processors.EventRenamer("message"), structlog.processors.JSONRenderer(default=str)]
        if resolve_log_format(log_format) == "json"
        else [structlog.dev.ConsoleRenderer(colors=False)]
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            _add_fields,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact,
            *render,
        ],
    )


def logging_config(log_format: str | None = None, level: str = "INFO") -> dict[str, Any]:
    """A logging.config.dictConfig dict: every logger (uvicorn's too) to stderr through ``formatter``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"pulse": {"()": "pulse_exports.logs.formatter", "log_format": resolve_log_format(log_format)}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "pulse", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        # uvicorn's loggers propagate to the root; uvicorn's own access log is off (see api.access_log)
        "loggers": {
            name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
