"""Purging expired exports: files deleted, rows kept as EXPIRED for audit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pulse_exports.jobstore import JobStore
from pulse_exports.pipeline import discard_export, export_prefix
from pulse_exports.storage import ExportStore


@dataclass
class PurgeResult:
    expired: list[str] = field(default_factory=list)
    objects_deleted: int = 0


def purge_expired(
    jobs: JobStore, store: ExportStore, *, on_expired: Callable[[str], None] | None = None, batch: int = 500
) -> PurgeResult:
    """Delete the files of every COMPLETED export past its expires_at and mark it EXPIRED.

    Files go first, then the status: a purge interrupted between the two simply runs again.
    Running it twice changes nothing the second time.
    """
    result = PurgeResult()
    while True:
        expired = jobs.expired(batch)
        if not expired:
            return result
        for job in expired:
            prefix = export_prefix(job.tenant_id, str(job.id))
            result.objects_deleted += store.delete_prefix(prefix)
            discard_export(store, prefix)
            if jobs.mark_expired(job.id):
                result.expired.append(str(job.id))
                if on_expired is not None:
                    on_expired(str(job.id))
        if len(expired) < batch:
            return result
