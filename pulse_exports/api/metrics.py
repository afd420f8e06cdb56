"""/metrics: Prometheus metrics of the export service, computed from export_jobs at scrape time.

Exports run in Dagster processes and the API may run several workers, so no process holds these
numbers: each scrape reads them from PostgreSQL (JobStore.statistics), and every worker answers alike.

Gauges are the table now (jobs by status, queue age, callbacks). Counters and the duration
histogram count the finished exports since the table began: rows are never deleted (the purge
marks them EXPIRED, which still counts as finished), so they only grow, as Prometheus requires of
counters, and ``rate()``/``histogram_quantile()`` over a window give recent throughput and latency.
"""

from __future__ import annotations

import hmac
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Annotated

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pulse_exports.api.deps import ApiRuntime, RuntimeDep
from pulse_exports.jobstore import ACTIVE, TERMINAL, JobStatistics, JobStore

_log = logging.getLogger(__name__)

STATUSES = ACTIVE + TERMINAL
QUEUE_STATUSES = ("PENDING", "QUEUED")
CALLBACK_STATUSES = ("pending", "delivered", "failed")
# Export durations span seconds (a small device list) to hours (months of telemetry).
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)

router = APIRouter(tags=["metrics"])
_bearer = HTTPBearer(auto_error=False)


class ExportJobsCollector(Collector):
    """Reads export_jobs once per scrape. Without a database, only ``pulse_exports_jobstore_up 0``."""

    def __init__(self, jobs: JobStore, *, tenant_labels: bool = False) -> None:
        self._jobs = jobs
        self._tenant_labels = tenant_labels

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pulse_exports_jobstore_up", "1 when export_jobs could be read for this scrape.")
        try:
            stats = self._jobs.statistics(DURATION_BUCKETS, by_tenant=self._tenant_labels)
        except psycopg.Error as exc:  # PoolTimeout included: the scrape still answers, saying why it is empty
            _log.warning("metrics: export_jobs unreadable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(stats, tenant_labels=self._tenant_labels)


def families(stats: JobStatistics, *, tenant_labels: bool) -> Iterator[Metric]:
    """The metric families of one JobStatistics."""
    keys = ["export_type", "tenant"] if tenant_labels else ["export_type"]

    def key(export_type: str, tenant: str | None) -> tuple[str, ...]:
        return (export_type, tenant or "") if tenant_labels else (export_type,)

    jobs: dict[tuple[str, ...], int] = defaultdict(int)
    rows: dict[tuple[str, ...], int] = defaultdict(int)
    size: dict[tuple[str, ...], int] = defaultdict(int)
    callbacks = dict.fromkeys(CALLBACK_STATUSES, 0)
    queue_age = dict.fromkeys(QUEUE_STATUSES, 0.0)
    heartbeat_age = 0.0
    for g in stats.groups:
        k = key(g.export_type, g.tenant_id)
        jobs[(g.status, *k)] += g.jobs
        rows[k] += g.rows_exported
        size[k] += g.bytes_exported
        callbacks["pending"] += g.callbacks_pending
        callbacks["delivered"] += g.callbacks_delivered
        callbacks["failed"] += g.callbacks_failed
        if g.status in queue_age:
            queue_age[g.status] = max(queue_age[g.status], g.oldest_age_seconds)
        if g.status == "RUNNING" and g.oldest_heartbeat_age_seconds is not None:
            heartbeat_age = max(heartbeat_age, g.oldest_heartbeat_age_seconds)

    by_status = GaugeMetricFamily(
        "pulse_exports_jobs", "Export jobs in export_jobs, by status and export type.", labels=["status", *keys]
    )
    for k in sorted(rows):  # every status of every type seen, so a status that empties reads 0, not absent
        for s in STATUSES:
            by_status.add_metric([s, *k], jobs.get((s, *k), 0))
    yield by_status

    age = GaugeMetricFamily(
        "pulse_exports_queue_oldest_age_seconds",
        "Age of the oldest export not yet started (since it was created), by status; 0 when none waits.",
        labels=["status"],
    )
    for s, seconds in queue_age.items():
        age.add_metric([s], max(seconds, 0.0))
    yield age

    yield GaugeMetricFamily(
        "pulse_exports_running_oldest_heartbeat_age_seconds",
        "Seconds since the stalest RUNNING export wrote its heartbeat; 0 when none runs.",
        value=max(heartbeat_age, 0.0),
    )

    exported_rows = CounterMetricFamily(
        "pulse_exports_exported_rows", "Rows written by finished (COMPLETED, later EXPIRED) exports.", labels=keys
    )
    exported_bytes = CounterMetricFamily(
        "pulse_exports_exported_bytes", "Bytes of part files written by finished exports.", labels=keys
    )
    for k in sorted(rows):
        exported_rows.add_metric(list(k), rows[k])
        exported_bytes.add_metric(list(k), size[k])
    yield exported_rows
    yield exported_bytes

    delivered = GaugeMetricFamily(
        "pulse_exports_callbacks", "Export jobs by callback delivery status.", labels=["status"]
    )
    for s, count in callbacks.items():
        delivered.add_metric([s], count)
    yield delivered

    yield duration_histogram(stats)


def duration_histogram(stats: JobStatistics) -> HistogramMetricFamily:
    """completed_at - started_at of finished exports, by export type, with cumulative buckets."""
    histogram = HistogramMetricFamily(
        "pulse_exports_export_duration_seconds",
        "Duration of finished exports, from the claim of the run that finished it to COMPLETED.",
        labels=["export_type"],
    )
    per_type: dict[str, list[int]] = defaultdict(lambda: [0] * (len(stats.duration_bounds) + 1))
    seconds: dict[str, float] = defaultdict(float)
    for d in stats.durations:
        per_type[d.export_type][d.bucket] += d.jobs
        seconds[d.export_type] += d.seconds
    for export_type in sorted(per_type):
        counts, running = per_type[export_type], 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip([*stats.duration_bounds, float("inf")], counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        histogram.add_metric([export_type], buckets, sum_value=seconds[export_type])
    return histogram


def metrics_registry(runtime: ApiRuntime) -> CollectorRegistry:
    """A registry of this app's own (not the process-global one: its numbers are per process)."""
    registry = CollectorRegistry(auto_describe=False)  # no query at registration
    registry.register(ExportJobsCollector(runtime.jobs, tenant_labels=runtime.settings.metrics_tenant_labels))
    return registry


def require_metrics_token(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """With PULSE_METRICS_TOKEN set, a scrape must send it as a bearer token."""
    token = runtime.settings.metrics_token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="the metrics token is required (Authorization: Bearer <PULSE_METRICS_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_token)])
def metrics(request: Request) -> Response:
    """Prometheus text exposition (or OpenMetrics, when the scraper asks for it)."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"})
