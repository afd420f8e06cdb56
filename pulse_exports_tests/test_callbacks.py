"""Signed callbacks: the trigger, signing, delivery with bounded retries, and the SSRF guard at creation and send."""

from __future__ import annotations

import json
import random
import re
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner

from pulse_exports.callbacks import (
    CallbackPolicy,
    backoff_delay,
    deliver_due_callbacks,
    event_id,
    signature,
)
from pulse_exports.catalog import Catalog, ExportRequestError
from pulse_exports.cli import main
from pulse_exports.jobstore import ExportJob, JobStore
from pulse_exports.netguard import Allowlist, resolve_callback_target, validate_callback_url
from pulse_exports.sensors import export_callbacks_sensor

from .exports_harness import ExportHarness
from .servers import S3Endpoint
from .test_api import LiveApi, live_api, s3_env

TENANT = "tenant-002"
LOOPBACK = Allowlist.parse("127.0.0.0/8")
README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real HTTP(S) server on loopback that records what it is sent and answers as told."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None, delay: float = 0.0) -> None:
        self.status = status
        self.response_headers = headers or {}
        self.delay = delay
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(Received(self.command, self.path, dict(self.headers.items()), body))
                time.sleep(receiver.delay)
                self.send_response(receiver.status)
                for key, value in receiver.response_headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        self.thread: threading.Thread | None = None

    def serve_tls(self, context: ssl.SSLContext) -> None:
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https"

    def start(self) -> Receiver:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(**kwargs: Any) -> Receiver:
        started.append(Receiver(**kwargs).start())
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def readme_verifier() -> Callable[..., bool]:
    """The receiver verification snippet exactly as the README's "Callbacks" section shows it."""
    section = README.read_text(encoding="utf-8").split("\n## Callbacks\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README's Callbacks section has no python snippet"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(README), "exec"), namespace)
    return namespace["verify_pulse_signature"]


def create_with_callback(jobs: JobStore, callback_url: str | None, **request: Any) -> ExportJob:
    spec = {"tenant_id": TENANT, "export_type": "devices", "format": "csv", **request}
    job, created = jobs.create(Catalog.load().validate(**spec), callback_url=callback_url, created_by="test")
    assert created
    return job


def make_due_now(database_url: str) -> None:
    """Skip the backoff wait: every pending callback becomes due."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE export_jobs SET callback_next_at = now() - interval '1 second' WHERE callback_status = 'pending'"
        )


# -- end to end through a real export --------------------------------------------------------


def test_completed_export_posts_one_signed_event_that_the_readme_code_verifies(
    exports: ExportHarness,
    receivers: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PULSE_CALLBACK_ALLOWLIST", "127.0.0.1/32")
    monkeypatch.setenv("PULSE_API_PUBLIC_URL", "https://exports.example.com/")
    receiver = receivers()
    url = validate_callback_url(receiver.url("/hooks/pulse?token=abc"), Allowlist.from_env())
    job = create_with_callback(exports.jobs, url)
    assert exports.jobs.callback_state(job.id).status is None  # nothing until the export ends

    assert [r.success for r in exports.run_sensor_and_runs()] == [True]
    done = exports.jobs.get(job.id)
    assert done.status == "COMPLETED"
    assert exports.jobs.callback_state(job.id).status == "pending"

    defs = exports.defs
    with dg.build_sensor_context(instance=exports.instance, resources=dict(defs.resources or {})) as context:
        tick = export_callbacks_sensor(context)
    assert isinstance(tick, dg.SkipReason) and tick.skip_message == "1 delivered, 0 retrying, 0 failed"

    (request,) = receiver.requests
    assert request.method == "POST" and request.path == "/hooks/pulse?token=abc"
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("pulse-exports-callbacks/")
    assert headers["host"] == f"127.0.0.1:{receiver.server.server_address[1]}"
    event = json.loads(request.body)
    assert datetime.fromisoformat(event.pop("occurred_at")) == done.completed_at
    assert event == {
        "event_id": str(event_id(job.id, "COMPLETED")),
        "type": "export.completed",
        "export_id": str(job.id),
        "tenant_id": TENANT,
        "export_type": "devices",
        "format": "csv",
        "status": "COMPLETED",
        "row_count": done.row_count,
        "bytes": done.file_size_bytes,
        "error": None,
        "download_url": f"https://exports.example.com/api/v1/exports/{job.id}/download",
    }
    assert done.row_count > 0 and headers["x-pulse-event-id"] == event["event_id"]

    verify = readme_verifier()
    secret = exports.jobs.callback_secret(TENANT)
    timestamp, sig = headers["x-pulse-timestamp"], headers["x-pulse-signature"]
    assert abs(int(timestamp) - time.time()) < 60
    assert verify(secret, timestamp, sig, request.body)
    assert not verify(secret, timestamp, sig, request.body.replace(b"COMPLETED", b"FAILED"))
    assert not verify("another tenant's secret", timestamp, sig, request.body)
    old = str(int(time.time()) - 301)
    assert not verify(secret, old, signature(secret, int(old), request.body), request.body)  # replayed late

    state = exports.jobs.callback_state(job.id)
    assert (state.status, state.attempts, state.last_error) == ("delivered", 1, None)
    assert state.delivered_at is not None
    with dg.build_sensor_context(instance=exports.instance, resources=dict(defs.resources or {})) as context:
        assert export_callbacks_sensor(context).skip_message == "no callbacks due"
    assert len(receiver.requests) == 1
    assert secret not in caplog.text and sig not in caplog.text


def test_receiver_answering_500_gets_bounded_retries_then_failed(
    exports: ExportHarness, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(status=500)
    policy = CallbackPolicy(allowlist=LOOPBACK, max_attempts=3)
    job = create_with_callback(exports.jobs, receiver.url())
    exports.run_sensor_and_runs()

    outcomes = []
    for attempt in (1, 2, 3):
        (result,) = deliver_due_callbacks(exports.jobs, policy)
        outcomes.append((result.attempt, result.outcome, result.status_code))
        if attempt < 3:
            assert result.retry_in is not None and timedelta(0) <= result.retry_in <= timedelta(seconds=5 * attempt)
            state = exports.jobs.callback_state(job.id)
            assert state.status == "pending" and state.next_at is not None
            if result.retry_in > timedelta(seconds=1):
                assert deliver_due_callbacks(exports.jobs, policy) == []  # not due yet: the backoff holds
        make_due_now(exports.database_url)
    assert outcomes == [(1, "retrying", 500), (2, "retrying", 500), (3, "failed", 500)]

    state = exports.jobs.callback_state(job.id)
    assert (state.status, state.attempts, state.last_error) == ("failed", 3, "receiver answered HTTP 500")
    assert state.next_at is None and state.delivered_at is None
    assert exports.jobs.get(job.id).status == "COMPLETED"  # the export itself is unaffected
    assert deliver_due_callbacks(exports.jobs, policy) == []
    assert len(receiver.requests) == 3
    assert {r.headers["X-Pulse-Event-Id"] for r in receiver.requests} == {str(event_id(job.id, "COMPLETED"))}
    assert len({r.body for r in receiver.requests}) == 1  # the same event each time


def test_redirect_is_not_followed_and_counts_as_a_failed_attempt(
    exports: ExportHarness, receivers: Callable[..., Receiver]
) -> None:
    target = receivers()
    redirector = receivers(status=302, headers={"Location": target.url("/stolen")})
    job = create_with_callback(exports.jobs, redirector.url())
    exports.jobs.cancel(job.id, reason="cancelled by the user")

    (result,) = deliver_due_callbacks(exports.jobs, CallbackPolicy(allowlist=LOOPBACK, max_attempts=1))
    assert (result.outcome, result.status_code) == ("failed", 302)
    assert result.error == "receiver answered HTTP 302 (redirects are not followed)"
    assert len(redirector.requests) == 1 and target.requests == []
    assert exports.jobs.callback_state(job.id).status == "failed"


def test_failed_and_cancelled_exports_send_their_events(
    exports: ExportHarness, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    exports.fail_uploads_after(0)
    failed = create_with_callback(exports.jobs, receiver.url("/failed"))
    assert [r.success for r in exports.run_sensor_and_runs()] == [False]
    cancelled = create_with_callback(exports.jobs, receiver.url("/cancelled"), export_type="alerts")
    assert exports.jobs.cancel(cancelled.id, reason="cancelled by the user")

    results = deliver_due_callbacks(exports.jobs, CallbackPolicy(allowlist=LOOPBACK))
    assert sorted((r.export_id, r.outcome) for r in results) == sorted(
        [(failed.id, "delivered"), (cancelled.id, "delivered")]
    )
    events = {r.path: json.loads(r.body) for r in receiver.requests}
    assert events["/failed"]["type"] == "export.failed" and events["/failed"]["status"] == "FAILED"
    assert "storage" in events["/failed"]["error"]
    assert events["/cancelled"]["type"] == "export.cancelled"
    assert events["/cancelled"]["error"] == "cancelled by the user"
    for event in events.values():
        assert event["row_count"] is None and event["bytes"] is None and event["download_url"] is None
    assert events["/failed"]["event_id"] == str(event_id(failed.id, "FAILED"))


def test_export_without_callback_url_sends_nothing(exports: ExportHarness, receivers: Callable[..., Receiver]) -> None:
    receiver = receivers()
    job = create_with_callback(exports.jobs, None)
    exports.run_sensor_and_runs()
    assert exports.jobs.get(job.id).status == "COMPLETED"
    assert exports.jobs.callback_state(job.id).status is None
    assert deliver_due_callbacks(exports.jobs, CallbackPolicy(allowlist=LOOPBACK)) == []
    assert receiver.requests == []


# -- the product API ---------------------------------------------------------------------------
@pytest.fixture
def api(exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveApi]:
    """The API over real HTTP, allowing loopback callback URLs (the receivers here)."""
    s3_env(monkeypatch, s3_endpoint)
    with live_api(exports, s3_endpoint_url=s3_endpoint.url, callback_allowlist="127.0.0.1/32") as live:
        yield live


def test_export_status_shows_where_its_callback_delivery_stands(
    api: LiveApi, receivers: Callable[..., Receiver]
) -> None:
    ok, refusing = receivers(), receivers(status=500)
    delivered = api.create(export_type="devices", callback_url=ok.url())["export_id"]
    failed = api.create(export_type="devices", callback_url=refusing.url())["export_id"]
    silent = api.create(export_type="devices")["export_id"]

    def callback_of(export_id: str) -> tuple[Any, ...]:
        with api.http() as http:
            body = http.get(f"/exports/{export_id}").json()
        return tuple(body[k] for k in ("callback_status", "callback_attempts", "callback_last_error"))

    assert callback_of(delivered) == (None, 0, None)  # nothing until the export ends
    assert api.run_exports() == [True, True, True]
    assert callback_of(delivered) == callback_of(failed) == ("pending", 0, None)
    deliver_due_callbacks(api.exports.jobs, CallbackPolicy(allowlist=LOOPBACK, max_attempts=1))

    assert callback_of(delivered) == ("delivered", 1, None)
    assert callback_of(failed) == ("failed", 1, "receiver answered HTTP 500")
    assert callback_of(silent) == (None, 0, None)
    with api.http() as http:
        shown = http.get(f"/exports/{delivered}").json()["callback_delivered_at"]
        assert http.get(f"/exports/{failed}").json()["callback_delivered_at"] is None
    assert datetime.fromisoformat(shown) == api.exports.jobs.callback_state(delivered).delivered_at
    assert len(ok.requests) == 1 and len(refusing.requests) == 1


def test_callback_secret_is_shown_and_rotated_for_the_keys_tenant_only(
    api: LiveApi, caplog: pytest.LogCaptureFixture
) -> None:
    other = api.exports.jobs.callback_secret("tenant-001")
    with api.http() as http:
        shown = http.get("/callback-secret")
        assert shown.status_code == 200 and shown.headers["cache-control"] == "no-store"
        assert shown.json() == {"tenant_id": TENANT, "secret": api.exports.jobs.callback_secret(TENANT)}
        first = shown.json()["secret"]
        assert first != other and http.get("/callback-secret").json()["secret"] == first  # stable

        rotated = http.post("/callback-secret/rotate")
        assert rotated.status_code == 200 and rotated.headers["cache-control"] == "no-store"
        new = rotated.json()["secret"]
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", new) and new != first
        assert http.get("/callback-secret").json() == {"tenant_id": TENANT, "secret": new}
    assert api.exports.jobs.callback_secret(TENANT) == new  # what deliveries are signed with from now on
    assert api.exports.jobs.callback_secret("tenant-001") == other  # another tenant's is untouched
    with api.http("tenant-001") as http:
        assert http.get("/callback-secret").json() == {"tenant_id": "tenant-001", "secret": other}
    with api.http(tenant=None) as http:
        for response in (
            http.get("/callback-secret"),
            http.post("/callback-secret/rotate"),
            http.get("/callback-secret", headers={"Authorization": "Bearer pex_00000000_nope"}),
        ):
            assert response.status_code == 401 and "secret" not in response.json()
    assert api.exports.jobs.callback_secret(TENANT) == new  # refused rotations changed nothing
    assert first not in caplog.text and new not in caplog.text and other not in caplog.text


# -- delivery mechanics ----------------------------------------------------------------------


def test_two_concurrent_deliveries_never_send_an_event_twice(
    seeded_database_url: str, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(delay=0.2)
    jobs = JobStore(seeded_database_url)
    created = [create_with_callback(jobs, receiver.url(f"/{i}")) for i in range(8)]
    for job in created:
        jobs.cancel(job.id)
    policy = CallbackPolicy(allowlist=LOOPBACK, batch_size=5, concurrency=2)
    start = threading.Barrier(2)

    def deliver() -> list[Any]:
        start.wait()
        return deliver_due_callbacks(seeded_database_url, policy) + deliver_due_callbacks(seeded_database_url, policy)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: deliver(), range(2))
    assert first and second  # both took part
    delivered = [r.export_id for r in first + second]
    assert sorted(delivered) == sorted(j.id for j in created)  # each exactly once
    assert sorted(r.path for r in receiver.requests) == sorted(f"/{i}" for i in range(8))
    assert {jobs.callback_state(j.id).attempts for j in created} == {1}


def test_send_time_check_refuses_an_address_allowed_at_creation(
    seeded_database_url: str, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    jobs = JobStore(seeded_database_url)
    job = create_with_callback(jobs, validate_callback_url(receiver.url(), LOOPBACK))
    jobs.cancel(job.id)
    (result,) = deliver_due_callbacks(jobs, CallbackPolicy(max_attempts=1))  # the allowlist is gone
    assert result.outcome == "failed"
    assert result.error == (
        "refused at send time: resolves to a loopback address, which callbacks may not reach"
        " unless an operator allowlists it"
    )
    assert receiver.requests == []


def test_request_goes_to_the_checked_address_with_the_host_name_in_the_host_header(
    seeded_database_url: str, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    url = receiver.url(host="localhost")
    target = resolve_callback_target(url, "localhost")
    assert target.addresses and all(a.is_loopback for a in target.addresses)
    port = receiver.server.server_address[1]
    pinned = urlsplit(target.pinned_url(target.addresses[0]))
    assert (pinned.hostname, pinned.port, pinned.path) == (str(target.addresses[0]), port, "/hook")
    jobs = JobStore(seeded_database_url)
    jobs.cancel(create_with_callback(jobs, url).id)
    (result,) = deliver_due_callbacks(jobs, CallbackPolicy(allowlist=Allowlist.parse("localhost")))
    assert result.outcome == "delivered", result.error
    (request,) = receiver.requests
    assert request.headers["Host"] == f"localhost:{port}"


def test_slow_receiver_is_cut_off_at_the_attempt_deadline(
    seeded_database_url: str, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(delay=1.5)
    jobs = JobStore(seeded_database_url)
    jobs.cancel(create_with_callback(jobs, receiver.url()).id)
    began = time.monotonic()
    (result,) = deliver_due_callbacks(jobs, CallbackPolicy(allowlist=LOOPBACK, timeout_seconds=0.5))
    assert time.monotonic() - began < 1.4
    assert (result.outcome, result.error) == ("retrying", "no answer within 0.5 s")


def test_retry_budget_in_time_ends_retries_before_the_attempt_budget(
    seeded_database_url: str, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(status=503)
    jobs = JobStore(seeded_database_url)
    job = create_with_callback(jobs, receiver.url())
    jobs.cancel(job.id)
    ended = jobs.get(job.id).completed_at
    policy = CallbackPolicy(allowlist=LOOPBACK, max_attempts=8, max_age_seconds=3600)
    (result,) = deliver_due_callbacks(jobs, policy, now=ended + timedelta(hours=1))
    assert (result.attempt, result.outcome) == (1, "failed")  # the hour is spent: no retry, 7 attempts unused
    assert jobs.callback_state(job.id).status == "failed"


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    class Highest:
        def uniform(self, low: float, high: float) -> float:
            return high

    policy = CallbackPolicy(backoff_base_seconds=5, backoff_cap_seconds=600)
    ceilings = [backoff_delay(n, policy, Highest()).total_seconds() for n in range(1, 10)]  # type: ignore[arg-type]
    assert ceilings == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    rng = random.Random(7)
    samples = [backoff_delay(4, policy, rng).total_seconds() for _ in range(200)]
    assert all(0 <= s <= 40 for s in samples) and min(samples) < 5 and max(samples) > 35


def test_https_receiver_is_verified_against_the_host_name_not_the_pinned_ip(
    seeded_database_url: str, receivers: Callable[..., Receiver], tmp_path: Path
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    receiver = Receiver()
    receiver.serve_tls(context)
    receiver.start()
    try:
        jobs = JobStore(seeded_database_url)
        by_name = create_with_callback(jobs, receiver.url("/by-name", host="localhost"))
        by_ip = create_with_callback(jobs, receiver.url("/by-ip", host="127.0.0.1"))
        jobs.cancel(by_name.id)
        jobs.cancel(by_ip.id)
        policy = CallbackPolicy(allowlist=Allowlist.parse("localhost,127.0.0.1/32"), ca_bundle=str(cert))
        results = {r.export_id: r for r in deliver_due_callbacks(jobs, policy)}
    finally:
        receiver.close()
    assert results[by_name.id].outcome == "delivered", results[by_name.id].error
    assert results[by_ip.id].outcome == "retrying"  # the certificate names localhost, not 127.0.0.1
    assert "certificate" in (results[by_ip.id].error or "").lower()
    assert [r.path for r in receiver.requests] == ["/by-name"]


# -- the SSRF guard --------------------------------------------------------------------------

REFUSED = {
    "http://127.0.0.1/hook": "loopback",
    "http://[::1]/hook": "loopback",
    "http://10.0.0.1/hook": "private",
    "http://172.16.5.4/hook": "private",
    "http://192.168.1.1/hook": "private",
    "http://100.64.0.1/hook": "carrier-grade NAT",
    "http://[fc00::1]/hook": "private",
    "http://169.254.169.254/latest/meta-data/": "link-local",
    "http://[fe80::1]/hook": "link-local",
    "http://224.0.0.1/hook": "multicast",
    "http://0.0.0.0/hook": "unspecified",
    "http://[::]/hook": "unspecified",
    "http://240.0.0.1/hook": "reserved",
    "http://2130706433/": "loopback",
    "http://0x7f000001/": "loopback",
    "http://0177.0.0.1/": "loopback",
    "http://127.1/": "loopback",
    "http://[::ffff:127.0.0.1]/": "loopback",
    "http://[::ffff:169.254.169.254]/": "link-local",
    "http://[2002:7f00:1::]/": "loopback",  # 6to4 wrapping 127.0.0.1
    "http://localhost/hook": "loopback",
    "http://localhost./hook": "loopback",
    "ftp://example.com/hook": "http or https",
    "file:///etc/passwd": "http or https",
    "javascript:alert(1)": "http or https",
    "https://user:s3cr3t@example.com/hook": "credentials",
    "https://example.com\\@127.0.0.1/hook": "credentials",
    "http:///hook": "must name a host",
    "http://exa mple.com/": "whitespace",
    "": "http or https",
}


@pytest.mark.parametrize("url", list(REFUSED))
def test_callback_urls_aimed_inside_are_refused_naming_the_field(url: str) -> None:
    with pytest.raises(ExportRequestError) as refused:
        validate_callback_url(url, None)
    assert refused.value.field == "callback_url"
    assert str(refused.value).startswith("callback_url: ")
    assert REFUSED[url] in refused.value.message
    assert "s3cr3t" not in refused.value.message


def test_allowlist_permits_internal_hosts_by_name_or_network_only() -> None:
    allowlist = Allowlist.parse(" localhost , 10.20.0.0/16,*.corp.example, fd00::/8")
    assert validate_callback_url("http://localhost:8080/x", allowlist) == "http://localhost:8080/x"
    assert validate_callback_url("http://10.20.3.4/x", allowlist) == "http://10.20.3.4/x"
    assert validate_callback_url("http://[fd00::5]/x", allowlist) == "http://[fd00::5]/x"
    assert validate_callback_url("http://[::ffff:10.20.0.9]/x", allowlist) == "http://[::ffff:10.20.0.9]/x"
    for url in ("http://10.21.0.1/x", "http://127.0.0.1/x", "http://169.254.169.254/"):
        with pytest.raises(ExportRequestError):
            validate_callback_url(url, allowlist)
    assert allowlist.permits_host("hooks.corp.example") and not allowlist.permits_host("corp.example.evil")
    assert validate_callback_url("https://93.184.215.14/hook", None) == "https://93.184.215.14/hook"


def test_odd_ip_spellings_are_sent_to_their_one_canonical_address() -> None:
    target = resolve_callback_target("http://0x7f000001:8080/a?b=c", "127.0.0.0/8")
    assert (target.host, target.host_header) == ("127.0.0.1", "127.0.0.1:8080")
    assert target.pinned_url(target.addresses[0]) == "http://127.0.0.1:8080/a?b=c"


# -- the trigger and the secret --------------------------------------------------------------


def test_trigger_schedules_terminal_states_only_and_drops_abandoned_events(seeded_database_url: str) -> None:
    jobs = JobStore(seeded_database_url)
    job = create_with_callback(jobs, "https://93.184.215.14/hook")
    with psycopg.connect(seeded_database_url, autocommit=True) as conn:
        for status, expected in [
            ("QUEUED", None),
            ("RUNNING", None),
            ("FAILED", "pending"),
            ("QUEUED", None),  # re-queued for a retry before the FAILED event went out
            ("COMPLETED", "pending"),
            ("EXPIRED", "failed"),
        ]:
            conn.execute("UPDATE export_jobs SET status = %s WHERE id = %s", (status, job.id))
            assert jobs.callback_state(job.id).status == expected, status
    assert jobs.callback_state(job.id).last_error == "the export expired before its callback was delivered"


def test_tenant_secret_cli_shows_a_stable_secret_and_rotates_it(seeded_database_url: str) -> None:
    env = {"PULSE_DATABASE_URL": seeded_database_url}

    def cli(*args: str) -> str:
        result = CliRunner().invoke(main, ["tenant-secret", *args], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output.strip()

    first = cli("show", "--tenant", TENANT)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", first)  # 32 random bytes, urlsafe
    assert cli("show", "--tenant", TENANT) == first
    assert cli("show", "--tenant", "tenant-001") != first
    rotated = cli("rotate", "--tenant", TENANT)
    assert rotated != first and cli("show", "--tenant", TENANT) == rotated
    assert JobStore(seeded_database_url).callback_secret(TENANT) == rotated
    with psycopg.connect(seeded_database_url) as conn:
        row = conn.execute("SELECT rotated_at IS NOT NULL FROM tenant_secrets WHERE tenant_id = %s", (TENANT,))
        assert row.fetchone() == (True,)


def test_event_ids_are_stable_per_export_and_status() -> None:
    export = uuid.uuid4()
    assert event_id(export, "COMPLETED") == event_id(export, "COMPLETED")
    assert event_id(export, "COMPLETED") != event_id(export, "FAILED") != event_id(uuid.uuid4(), "FAILED")
