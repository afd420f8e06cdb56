"""Per-tenant quotas: how many unfinished exports a tenant may have, and how many rows and bytes one
export may write.

Defaults for every tenant come from PULSE_QUOTA_MAX_ACTIVE_JOBS, PULSE_QUOTA_MAX_ROWS and
PULSE_QUOTA_MAX_BYTES (unset or empty: no limit); PULSE_TENANT_QUOTAS (JSON) overrides them per
tenant. The API refuses requests over a quota up front; the export run enforces rows and bytes
whoever made the job, since estimates are approximate and other producers insert jobs directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

LIMIT_VARIABLES = {
    "max_active_jobs": "PULSE_QUOTA_MAX_ACTIVE_JOBS",
    "max_rows": "PULSE_QUOTA_MAX_ROWS",
    "max_bytes": "PULSE_QUOTA_MAX_BYTES",
}
TENANT_QUOTAS_VARIABLE = "PULSE_TENANT_QUOTAS"
# What a 429 asks the caller to wait: exports take seconds to hours, so a shorter wait mostly polls.
RETRY_AFTER_SECONDS = 30
# With no row_limit, the API refuses an export whose planner estimate is over this many times
# max_rows: estimates can be off, so only a clear excess is refused; the run enforces the exact limit.
ESTIMATE_REFUSAL_FACTOR = 2

Limit = Annotated[StrictInt | None, Field(ge=1)]


class QuotaConfigError(ValueError):
    """Quota configuration that cannot be used; the message starts with the variable's name."""


class QuotaExceeded(Exception):
    """A tenant or an export went over a quota: ``quota`` names it, ``limit`` is its value."""

    def __init__(self, quota: str, limit: int, message: str) -> None:
        super().__init__(message)
        self.quota = quota
        self.limit = limit
        self.message = message

    @classmethod
    def for_active_jobs(cls, limit: int, active: int) -> QuotaExceeded:
        return cls(
            "max_active_jobs",
            limit,
            f"the tenant has {active} unfinished exports (PENDING, QUEUED or RUNNING) and its max_active_jobs"
            f" quota is {limit}; retry when one of them has ended, or cancel one",
        )

    @classmethod
    def for_rows(cls, limit: int) -> QuotaExceeded:
        return cls(
            "max_rows",
            limit,
            f"the export has more than {limit} rows, the tenant's max_rows quota;"
            f" set row_limit to at most {limit} or narrow the filters",
        )

    @classmethod
    def for_row_limit(cls, limit: int, row_limit: int) -> QuotaExceeded:
        return cls("max_rows", limit, f"{row_limit} is above the tenant's max_rows quota of {limit} rows")

    @classmethod
    def for_estimate(cls, limit: int, estimate: int) -> QuotaExceeded:
        return cls(
            "max_rows",
            limit,
            f"the export would have about {estimate} rows, above the tenant's max_rows quota of {limit};"
            f" set row_limit to at most {limit} or narrow the filters",
        )

    @classmethod
    def for_bytes(cls, limit: int) -> QuotaExceeded:
        return cls(
            "max_bytes",
            limit,
            f"the export's files grew past {limit} bytes, the tenant's max_bytes quota;"
            " narrow the filters, choose fewer columns, set row_limit or use compression",
        )


class TenantQuota(BaseModel):
    """One tenant's limits; None means no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_active_jobs: Limit = Field(default=None, description="Unfinished (PENDING, QUEUED, RUNNING) exports at once.")
    max_rows: Limit = Field(default=None, description="Rows in one export.")
    max_bytes: Limit = Field(default=None, description="Bytes of one export's files (the sum of its parts).")


class Quotas(BaseModel):
    """The defaults and the per-tenant overrides; ``for_tenant`` merges them."""

    model_config = ConfigDict(frozen=True)

    default: TenantQuota = TenantQuota()
    tenants: dict[str, TenantQuota] = Field(default_factory=dict)

    def for_tenant(self, tenant_id: str) -> TenantQuota:
        """The tenant's quota: fields its override sets (null included: no limit) win over the defaults."""
        override = self.tenants.get(tenant_id)
        if override is None:
            return self.default
        return self.default.model_copy(update={name: getattr(override, name) for name in override.model_fields_set})

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        max_active_jobs: int | str | None = None,
        max_rows: int | str | None = None,
        max_bytes: int | str | None = None,
        tenant_quotas: str | Mapping[str, Any] | None = None,
    ) -> Quotas:
        """Values given win; the rest come from the PULSE_QUOTA_* and PULSE_TENANT_QUOTAS variables.
        Raises QuotaConfigError naming the variable when one cannot be used."""
        env = os.environ if environ is None else environ
        given = {"max_active_jobs": max_active_jobs, "max_rows": max_rows, "max_bytes": max_bytes}
        default = {
            name: parse_limit(variable, given[name] if given[name] is not None else env.get(variable))
            for name, variable in LIMIT_VARIABLES.items()
        }
        tenants = parse_tenant_quotas(tenant_quotas if tenant_quotas is not None else env.get(TENANT_QUOTAS_VARIABLE))
        return cls(default=TenantQuota(**default), tenants=tenants)


def parse_limit(variable: str, raw: Any) -> int | None:
    """A limit from the environment or a setting: a whole number of at least 1; unset or empty: no limit."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    value: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and raw.strip().isdigit():
        value = int(raw.strip())
    if value is None or value < 1:
        raise QuotaConfigError(f"{variable}: must be a whole number of at least 1 (or empty for no limit), got {raw!r}")
    return value


def parse_tenant_quotas(raw: str | Mapping[str, Any] | None) -> dict[str, TenantQuota]:
    """PULSE_TENANT_QUOTAS: ``{"tenant-a": {"max_active_jobs": 3, "max_rows": 1000000}}``."""
    variable = TENANT_QUOTAS_VARIABLE
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise QuotaConfigError(
                f"{variable}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            ) from None
    if not isinstance(raw, Mapping):
        raise QuotaConfigError(
            f'{variable}: must be a JSON object of tenant id -> quotas, e.g. {{"tenant-a": {{"max_rows": 1000000}}}}'
        )
    tenants: dict[str, TenantQuota] = {}
    for tenant_id, quota in raw.items():
        try:
            tenants[str(tenant_id)] = TenantQuota.model_validate(quota)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in (tenant_id, *error["loc"]))
            allowed = ", ".join(TenantQuota.model_fields)
            hint = f" (quotas: {allowed})" if error["type"] in ("extra_forbidden", "model_type") else ""
            raise QuotaConfigError(f"{variable}: {where}: {error['msg']}{hint}") from None
    return tenants
