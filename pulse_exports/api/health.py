"""/health: can the API reach its database, its export storage and Dagster?"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from pulse_exports.api.deps import ApiRuntime, RuntimeDep
from pulse_exports.api.schemas import Health, HealthCheck
from pulse_exports.launcher import DagsterUnavailable

router = APIRouter(tags=["health"])

_PROBE_KEY = ".pulse-health-probe"  # never written: a HEAD/stat of it proves reachability and credentials


@router.get("/health", responses={503: {"model": Health, "description": "A dependency is unreachable."}})
def health(runtime: RuntimeDep, response: Response) -> Health:
    """Unauthenticated, for load balancers; answers 503 when something the API needs is down."""
    result = Health(status="ok", database=_database(runtime), storage=_storage(runtime), dagster=_dagster(runtime))
    if False in (result.database.ok, result.storage.ok, result.dagster.ok):
        result.status = "unavailable"
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return result


def _database(runtime: ApiRuntime) -> HealthCheck:
    try:
        with runtime.pool.connection(timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure is the answer here, not an error of this endpoint
        return HealthCheck(ok=False, detail=type(exc).__name__)
    return HealthCheck(ok=True, detail="reachable")


def _storage(runtime: ApiRuntime) -> HealthCheck:
    try:
        runtime.store.exists(_PROBE_KEY)
    except Exception as exc:  # unreachable endpoint, refused credentials, missing bucket
        return HealthCheck(ok=False, detail=type(exc).__name__)
    return HealthCheck(ok=True, detail=runtime.store.location)


def _dagster(runtime: ApiRuntime) -> HealthCheck:
    if runtime.launcher is None:
        return HealthCheck(ok=None, detail="not configured: the sensor launches runs")
    try:
        version = runtime.launcher.version()
    except DagsterUnavailable as exc:
        return HealthCheck(ok=False, detail=str(exc)[:200])
    return HealthCheck(ok=True, detail=f"dagster {version}")
