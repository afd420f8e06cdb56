"""/callback-secret: the key that signs the caller's callbacks (X-Pulse-Signature), shown and rotated."""

from __future__ import annotations

from fastapi import APIRouter, Response

from pulse_exports.api.deps import RuntimeDep, TenantDep
from pulse_exports.api.schemas import CallbackSecret

router = APIRouter(prefix="/callback-secret", tags=["callbacks"])


def _secret(tenant_id: str, secret: str, response: Response) -> CallbackSecret:
    response.headers["Cache-Control"] = "no-store"  # a credential: no cache keeps a copy
    return CallbackSecret(tenant_id=tenant_id, secret=secret)


@router.get("")
def get_callback_secret(tenant: TenantDep, runtime: RuntimeDep, response: Response) -> CallbackSecret:
    """The tenant's signing secret (made on first use): verify each callback's X-Pulse-Signature with it."""
    return _secret(tenant.id, runtime.jobs.callback_secret(tenant.id), response)


@router.post("/rotate")
def rotate_callback_secret(tenant: TenantDep, runtime: RuntimeDep, response: Response) -> CallbackSecret:
    """Replace the signing secret: deliveries from now on, retries included, are signed with the new one."""
    return _secret(tenant.id, runtime.jobs.rotate_callback_secret(tenant.id), response)
