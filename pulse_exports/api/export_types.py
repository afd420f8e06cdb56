"""/export-types: the catalog a tenant can choose from."""

from __future__ import annotations

from fastapi import APIRouter

from pulse_exports.api.deps import RuntimeDep, TenantDep
from pulse_exports.api.schemas import ExportTypePublic

router = APIRouter(prefix="/export-types", tags=["export types"])


@router.get("")
def list_export_types(tenant: TenantDep, runtime: RuntimeDep) -> list[ExportTypePublic]:
    """Export types with their columns, filters, formats and compressions."""
    return [ExportTypePublic(**t) for t in runtime.catalog().describe()]
