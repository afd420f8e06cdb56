"""Assembles the FastAPI app: the runtime made from settings, and one router per resource."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import APIRouter, FastAPI

from pulse_exports.api import callback_secret, export_schedules, export_types, exports, health, metrics
from pulse_exports.api.access_log import AccessLogMiddleware
from pulse_exports.api.deps import API_PREFIX, ApiRuntime
from pulse_exports.api.settings import ApiSettings


def build_app(settings: ApiSettings | None = None) -> FastAPI:
    runtime = ApiRuntime.from_settings(settings or ApiSettings())  # type: ignore[call-arg]  # read from env

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync endpoints run on AnyIO's threads (40 by default); more threads than pooled connections
        # only wait for one while contending for the GIL, which stretches the latency tail under load.
        to_thread.current_default_thread_limiter().total_tokens = runtime.settings.db_pool_size
        runtime.open()
        try:
            yield
        finally:
            runtime.close()

    app = FastAPI(
        title="pulse_exports",
        version="1",
        summary="Asynchronous, multi-tenant data exports: create, follow, download and cancel.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics_registry = metrics.metrics_registry(runtime)
    app.add_middleware(AccessLogMiddleware)
    api = APIRouter(prefix=API_PREFIX)
    api.include_router(exports.router)
    api.include_router(export_schedules.router)
    api.include_router(export_types.router)
    api.include_router(callback_secret.router)
    api.include_router(health.router)
    app.include_router(api)
    app.include_router(metrics.router)  # at the root, where Prometheus looks by default
    return app
