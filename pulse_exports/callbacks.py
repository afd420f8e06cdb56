"""Signed callbacks: when an export ends, POST a signed JSON event to its callback_url.

A PostgreSQL trigger marks the callback pending when the job reaches COMPLETED, FAILED or CANCELLED;
``deliver_due_callbacks`` (run by export_callbacks_sensor) claims due ones, sends each to a checked,
pinned address with no redirects, and records the outcome. Failed attempts are retried with
exponential backoff and full jitter until the attempt or time budget is spent (then
callback_status = failed; the export keeps its own status). Delivery is at least once: receivers
dedupe on the event id, which is stable per export and status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import ssl
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import certifi
import httpx

from pulse_exports.catalog import ExportRequestError
from pulse_exports.jobstore import DueCallback, ExportJob, JobStore
from pulse_exports.netguard import Allowlist, CallbackTarget, resolve_callback_target
from pulse_exports.redact import redact

EVENT_TYPES = {"COMPLETED": "export.completed", "FAILED": "export.failed", "CANCELLED": "export.cancelled"}
USER_AGENT = "pulse-exports-callbacks/1"
HEADER_TIMESTAMP = "X-Pulse-Timestamp"
HEADER_SIGNATURE = "X-Pulse-Signature"
HEADER_EVENT_ID = "X-Pulse-Event-Id"
# Event ids are uuid5(namespace, "<export id>:<status>"): the same on every retry of one event.
_EVENT_NAMESPACE = uuid.UUID("6f1c2a4e-9d3b-5c7e-8a10-2b4d6f8a0c1e")
# How long a claimed delivery stays invisible to other senders: at least this, and always well above
# one batch's worst case (see claim_lease), so a delivery still in flight is never claimed again.
CLAIM_LEASE = timedelta(minutes=5)
MAX_RESULT_ERROR = 500


@dataclass(frozen=True)
class CallbackPolicy:
    """How callbacks are sent and retried. ``from_env`` reads PULSE_CALLBACK_<FIELD> (and the two below)."""

    allowlist: Allowlist = field(default_factory=Allowlist)
    api_public_url: str | None = None
    max_attempts: int = 8
    max_age_seconds: float = 3600
    backoff_base_seconds: float = 5
    backoff_cap_seconds: float = 600
    connect_timeout_seconds: float = 5
    timeout_seconds: float = 10
    batch_size: int = 32
    concurrency: int = 16
    ca_bundle: str | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("callback max_attempts, batch_size and concurrency must be at least 1")
        if min(self.max_age_seconds, self.connect_timeout_seconds, self.timeout_seconds) <= 0:
            raise ValueError("callback max_age and timeouts must be positive")
        if self.backoff_base_seconds < 0 or self.backoff_cap_seconds < 0:
            raise ValueError("callback backoff must not be negative")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> CallbackPolicy:
        """Defaults, then the environment, then ``overrides`` that are not None (a Dagster resource's fields)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = _ENV_NAMES.get(f.name, f"PULSE_CALLBACK_{f.name.upper()}")
            raw = overrides.get(f.name)
            if raw is None:
                raw = env.get(name) or None
            if raw is None:
                continue
            if f.name == "allowlist":
                values[f.name] = raw if isinstance(raw, Allowlist) else Allowlist.parse(str(raw))
            elif f.name in _INT_FIELDS:
                values[f.name] = int(raw)
            elif f.name in _FLOAT_FIELDS:
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        return cls(**values)


_ENV_NAMES = {"allowlist": "PULSE_CALLBACK_ALLOWLIST", "api_public_url": "PULSE_API_PUBLIC_URL"}
_INT_FIELDS = {"max_attempts", "batch_size", "concurrency"}
_FLOAT_FIELDS = {
    "max_age_seconds",
    "backoff_base_seconds",
    "backoff_cap_seconds",
    "connect_timeout_seconds",
    "timeout_seconds",
}


@dataclass(frozen=True)
class CallbackResult:
    """One delivery attempt: ``outcome`` is delivered, retrying (``retry_in`` from now) or failed (for good)."""

    export_id: uuid.UUID
    event_id: uuid.UUID
    attempt: int
    outcome: str
    status_code: int | None = None
    error: str | None = None
    retry_in: timedelta | None = None


def event_id(export_id: uuid.UUID, status: str) -> uuid.UUID:
    return uuid.uuid5(_EVENT_NAMESPACE, f"{export_id}:{status}")


def build_event(job: ExportJob, api_public_url: str | None = None) -> dict[str, Any]:
    """The JSON event for a job that ended (see README "Callbacks")."""
    completed = job.status == "COMPLETED"
    occurred = job.completed_at or datetime.now(timezone.utc)
    return {
        "event_id": str(event_id(job.id, job.status)),
        "type": EVENT_TYPES[job.status],
        "export_id": str(job.id),
        "tenant_id": job.tenant_id,
        "export_type": job.export_type,
        "format": job.format,
        "status": job.status,
        "row_count": job.row_count if completed else None,
        "bytes": job.file_size_bytes if completed else None,
        "error": redact(job.error) if job.error and not completed else None,
        "download_url": (
            f"{api_public_url.rstrip('/')}/api/v1/exports/{job.id}/download" if api_public_url and completed else None
        ),
        "occurred_at": occurred.astimezone(timezone.utc).isoformat(),
    }


def event_body(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode("utf-8")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``v1=`` + hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` keyed with the tenant's secret (as UTF-8 text)."""
    digest = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def signed_headers(secret: str, body: bytes, event: uuid.UUID | str, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        HEADER_EVENT_ID: str(event),
        HEADER_TIMESTAMP: str(ts),
        HEADER_SIGNATURE: signature(secret, ts, body),
    }


def backoff_delay(attempt: int, policy: CallbackPolicy, rng: random.Random | None = None) -> timedelta:
    """Exponential backoff with full jitter after failed attempt ``attempt`` (1-based)."""
    ceiling = min(policy.backoff_cap_seconds, policy.backoff_base_seconds * 2 ** (attempt - 1))
    return timedelta(seconds=(rng or random).uniform(0, ceiling))


def retry_delay(
    job: ExportJob, attempt: int, policy: CallbackPolicy, now: datetime, rng: random.Random | None = None
) -> timedelta | None:
    """When to try again after a failed attempt, or None once the attempt or time budget is spent."""
    if attempt >= policy.max_attempts:
        return None
    delay = backoff_delay(attempt, policy, rng)
    deadline = (job.completed_at or now) + timedelta(seconds=policy.max_age_seconds)
    return delay if now + delay <= deadline else None


def claim_lease(policy: CallbackPolicy) -> timedelta:
    waves = -(-policy.batch_size // policy.concurrency)
    return max(CLAIM_LEASE, timedelta(seconds=2 * waves * policy.timeout_seconds))


def deliver_due_callbacks(
    jobs: JobStore | str,
    policy: CallbackPolicy | None = None,
    *,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> list[CallbackResult]:
    """Send every callback due at ``now`` (default: the database's clock) once and record the outcomes.

    Safe to run concurrently: each due delivery is claimed by exactly one caller.
    """
    store = JobStore(jobs) if isinstance(jobs, str) else jobs
    policy = policy or CallbackPolicy.from_env()
    claims = store.claim_due_callbacks(policy.batch_size, lease=claim_lease(policy), now=now)
    if not claims:
        return []
    secrets_by_tenant: dict[str, str] = {}
    for claim in claims:
        if claim.job.tenant_id not in secrets_by_tenant:
            secrets_by_tenant[claim.job.tenant_id] = store.callback_secret(claim.job.tenant_id)
    outcomes = asyncio.run(_send_all(claims, secrets_by_tenant, policy))
    clock = now or datetime.now(timezone.utc)
    results = []
    for claim, result in zip(claims, outcomes, strict=True):
        if result.outcome == "delivered":
            store.record_callback_delivered(claim.job.id, claim.attempt)
        else:
            retry_in = retry_delay(claim.job, claim.attempt, policy, clock, rng)
            store.record_callback_failure(claim.job.id, claim.attempt, result.error or "", retry_in=retry_in, now=now)
            result = replace(result, outcome="retrying" if retry_in is not None else "failed", retry_in=retry_in)
        results.append(result)
    return results


async def _send_all(
    claims: Sequence[DueCallback], secrets_by_tenant: Mapping[str, str], policy: CallbackPolicy
) -> list[CallbackResult]:
    tls = ssl.create_default_context(cafile=policy.ca_bundle or certifi.where())
    gate = asyncio.Semaphore(policy.concurrency)

    async def one(claim: DueCallback) -> CallbackResult:
        async with gate:
            return await _deliver(claim, secrets_by_tenant[claim.job.tenant_id], policy, tls)

    return list(await asyncio.gather(*(one(c) for c in claims)))


async def _deliver(claim: DueCallback, secret: str, policy: CallbackPolicy, tls: ssl.SSLContext) -> CallbackResult:
    job = claim.job
    event = build_event(job, policy.api_public_url)
    body = event_body(event)
    headers = signed_headers(secret, body, event["event_id"])
    result = CallbackResult(export_id=job.id, event_id=uuid.UUID(event["event_id"]), attempt=claim.attempt, outcome="")
    url = job.callback_url or ""
    try:
        # One deadline for the whole attempt: resolving, connecting, TLS and the answer's headers.
        status = await asyncio.wait_for(_post(url, body, headers, policy, tls), policy.timeout_seconds)
    except ExportRequestError as exc:
        return replace(result, outcome="failed", error=f"refused at send time: {exc.message}")
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return replace(result, outcome="failed", error=f"no answer within {policy.timeout_seconds:g} s")
    except Exception as exc:  # any other error is one failed attempt, recorded; the batch goes on
        return replace(result, outcome="failed", error=_describe(exc, url))
    if 200 <= status < 300:
        return replace(result, outcome="delivered", status_code=status)
    note = " (redirects are not followed)" if 300 <= status < 400 else ""
    return replace(result, outcome="failed", status_code=status, error=f"receiver answered HTTP {status}{note}")


async def _post(url: str, body: bytes, headers: Mapping[str, str], policy: CallbackPolicy, tls: ssl.SSLContext) -> int:
    """POST to the checked addresses of the URL's host, in order, until one accepts the connection."""
    allowlist = policy.allowlist
    target = await asyncio.to_thread(resolve_callback_target, url, allowlist)
    last: Exception | None = None
    for address in target.addresses:
        # A client per connection: pooled connections are keyed by the pinned IP, and must never
        # carry one host's request over a TLS session negotiated for another.
        async with httpx.AsyncClient(
            verify=tls,
            trust_env=False,  # a proxy from the environment would resolve the host itself
            follow_redirects=False,
            timeout=httpx.Timeout(policy.timeout_seconds, connect=policy.connect_timeout_seconds),
        ) as client:
            request = client.build_request(
                "POST",
                target.pinned_url(address),
                content=body,
                headers={**headers, "Host": target.host_header},
                extensions=_tls_extensions(target),
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last = exc
                continue
            await response.aclose()  # the answer's body is not needed, however large
            return response.status_code
    assert last is not None
    raise last


def _tls_extensions(target: CallbackTarget) -> dict[str, Any]:
    """For https to a host name: send it as SNI and verify the certificate against it, not the IP."""
    if target.scheme != "https" or target.host_is_ip:
        return {}
    return {"sni_hostname": target.host}


def _describe(exc: BaseException, url: str) -> str:
    """A short error for callback_last_error: no URL (it may carry a token in its path or query)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if url:
        text = text.replace(url, "<callback_url>")
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return redact(message)[:MAX_RESULT_ERROR]
