"""One log line per API request, with the tenant and export id its handlers bound (pulse_exports.logs)."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pulse_exports.logs import log_context

_log = logging.getLogger("pulse_exports.api.access")

# Probes and scrapes come every few seconds: they are logged at DEBUG.
_QUIET_PATHS = frozenset({"/metrics", "/api/v1/health"})


class AccessLogMiddleware:
    """Opens a log scope per request and logs method, path (never the query), status and duration.

    Replaces uvicorn's access log, which is written outside the request's context and so could not
    carry the tenant or the export id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500  # unless a response starts

        async def send_recording_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        with log_context():
            try:
                await self.app(scope, receive, send_recording_status)
            finally:
                path = scope["path"]
                _log.log(
                    logging.DEBUG if path in _QUIET_PATHS else logging.INFO,
                    "%s %s %s",
                    scope["method"],
                    path,
                    status_code,
                    extra={
                        "method": scope["method"],
                        "path": path,
                        "status": status_code,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    },
                )
