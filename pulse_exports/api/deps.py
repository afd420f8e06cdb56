"""What the routers depend on: the runtime (pools, stores, launcher), the caller's tenant and links."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from pulse_exports.api.schemas import ExportLinks
from pulse_exports.api.settings import ApiSettings
from pulse_exports.apikeys import ApiKeyStore
from pulse_exports.catalog import Catalog, OperatorTable
from pulse_exports.jobstore import PooledJobStore
from pulse_exports.launcher import DagsterLauncher
from pulse_exports.logs import bind
from pulse_exports.netguard import Allowlist
from pulse_exports.quotas import Quotas
from pulse_exports.storage import ExportStore, store_from_url

API_PREFIX = "/api/v1"


def _pool(url: str, size: int, name: str) -> ConnectionPool:
    # autocommit + dict rows: what JobStore's queries expect of a connection
    return ConnectionPool(
        url,
        min_size=min(2, size),
        max_size=size,
        kwargs={"autocommit": True, "row_factory": dict_row},
        name=name,
        open=False,
    )


@dataclass
class ApiRuntime:
    """Everything a request needs, made once per app: connection pools, stores and the launcher."""

    settings: ApiSettings
    pool: ConnectionPool
    source_pool: ConnectionPool
    jobs: PooledJobStore
    keys: ApiKeyStore
    store: ExportStore
    presign_store: ExportStore
    launcher: DagsterLauncher | None
    callback_allowlist: Allowlist
    quotas: Quotas = field(default_factory=Quotas)
    _catalog: Catalog | None = field(default=None, repr=False)
    _catalog_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> ApiRuntime:
        pool = _pool(settings.database_url, settings.db_pool_size, "pulse-jobs")
        source_pool = pool if settings.source_url == settings.database_url else _pool(settings.source_url, 4, "source")
        store = store_from_url(settings.storage_url, endpoint_url=settings.s3_endpoint_url)
        presign_store = (
            store_from_url(settings.storage_url, endpoint_url=settings.s3_public_endpoint_url)
            if settings.s3_public_endpoint_url
            else store
        )
        launcher = (
            DagsterLauncher(
                settings.dagster_graphql_url,
                location_name=settings.dagster_location_name,
                repository_name=settings.dagster_repository_name,
                timeout=settings.dagster_timeout_seconds,
            )
            if settings.dagster_graphql_url
            else None
        )
        return cls(
            settings=settings,
            pool=pool,
            source_pool=source_pool,
            jobs=PooledJobStore(pool),
            keys=ApiKeyStore(settings.database_url, pool),
            store=store,
            presign_store=presign_store,
            launcher=launcher,
            callback_allowlist=Allowlist.parse(settings.callback_allowlist),
            quotas=settings.quotas(),
        )

    def open(self) -> None:
        self.pool.open()
        if self.source_pool is not self.pool:
            self.source_pool.open()

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.close()
        if self.source_pool is not self.pool:
            self.source_pool.close()
        self.pool.close()

    def catalog(self) -> Catalog:
        """The catalog, loaded once: operator tables need the source database's column lists."""
        with self._catalog_lock:
            if self._catalog is None:
                tables = OperatorTable.parse_all(self.settings.export_tables)
                if tables:
                    with self.source_pool.connection() as conn:
                        self._catalog = Catalog.load(conn, tables)
                else:
                    self._catalog = Catalog.load()
            return self._catalog


# Dependencies that do not block are async: FastAPI runs sync ones on a worker thread each.
async def get_runtime(request: Request) -> ApiRuntime:
    runtime: ApiRuntime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[ApiRuntime, Depends(get_runtime)]


@dataclass(frozen=True)
class Tenant:
    """The caller: the tenant its API key belongs to."""

    id: str
    api_key_id: uuid.UUID


_bearer = HTTPBearer(auto_error=False, description="An API key made with `pulse-exports api-key create`.")


def current_tenant(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Tenant:
    """The tenant of the bearer API key; 401 when the key is missing, unknown or revoked."""
    key = runtime.keys.authenticate(credentials.credentials) if credentials is not None else None
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="a valid API key is required (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    bind(tenant=key.tenant_id)  # every log line of this request names the tenant
    return Tenant(id=key.tenant_id, api_key_id=key.id)


TenantDep = Annotated[Tenant, Depends(current_tenant)]


async def export_links(request: Request, runtime: RuntimeDep) -> ExportLinks:
    """Links in answers: the configured public URL, else the URL this request came to."""
    base = runtime.settings.api_public_url or str(request.base_url)
    return ExportLinks(api_base=base.rstrip("/") + API_PREFIX, dagster_ui_url=runtime.settings.dagster_ui_url)


LinksDep = Annotated[ExportLinks, Depends(export_links)]
