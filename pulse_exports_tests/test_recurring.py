"""Recurring exports against real PostgreSQL: one job per tick, missed ticks, timezones, pausing,
validation, the sensor, the CLI, the API router, the pipeline, and a real daemon across a restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner

from pulse_exports.catalog import Catalog, ExportRequestError, builtin_types
from pulse_exports.cli import main as cli_main
from pulse_exports.jobstore import schedule_idempotency_key
from pulse_exports.recurring import (
    ExportSchedule,
    ScheduleNameTaken,
    ScheduleStore,
    enqueue_due_schedules,
)
from pulse_exports.sensors import export_schedules_sensor
from pulse_exports_tests.dagster_processes import DagsterServices, wait_for
from pulse_exports_tests.exports_harness import ExportHarness
from pulse_exports_tests.servers import S3Endpoint

from .test_api import LiveApi, live_api, s3_env

TENANT = "tenant-002"
OTHER = "tenant-001"
UTC = timezone.utc
# A Monday noon, well away from any DST change.
BASE = datetime(2026, 1, 5, 12, 0, 30, tzinfo=UTC)
CATALOG = Catalog.load()


def at(minute: int, second: int = 5, base: datetime = BASE) -> datetime:
    """``base``'s hour at ``minute``:``second`` (minute may run past 59)."""
    return base.replace(minute=0, second=0) + timedelta(minutes=minute, seconds=second)


def make_schedule(
    database_url: str,
    *,
    cron: str = "* * * * *",
    tz: str = "UTC",
    now: datetime = BASE,
    tenant: str = TENANT,
    name: str = "every minute",
    **spec: Any,
) -> ExportSchedule:
    request = CATALOG.validate(tenant_id=tenant, **({"export_type": "devices", "format": "csv"} | spec))
    return ScheduleStore(database_url).create(request, name=name, cron=cron, timezone=tz, now=now)


def scheduled_jobs(database_url: str, schedule_id: Any = None) -> list[tuple[Any, ...]]:
    """(scheduled_for, idempotency_key, status, created_by) of every job a schedule made, by tick."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT scheduled_for, idempotency_key, status, created_by FROM export_jobs"
            " WHERE scheduled_for IS NOT NULL AND (%s::uuid IS NULL OR schedule_id = %s) ORDER BY scheduled_for",
            (schedule_id, schedule_id),
        ).fetchall()


def job_count(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM export_jobs").fetchone()
    assert row is not None
    return int(row[0])


# -- exactly one job per tick ----------------------------------------------------------------
def test_every_minute_schedule_makes_one_job_per_tick(seeded_database_url: str) -> None:
    schedule = make_schedule(seeded_database_url)
    assert schedule.next_run_at == at(1, 0)
    for minute in range(1, 6):
        ticks = enqueue_due_schedules(seeded_database_url, CATALOG, now=at(minute))
        assert [(t.scheduled_for, t.created) for t in ticks] == [(at(minute, 0), True)]
        for _ in range(3):  # evaluated again within the same minute: nothing is due
            assert enqueue_due_schedules(seeded_database_url, CATALOG, now=at(minute, 40)) == []

    jobs = scheduled_jobs(seeded_database_url, schedule.id)
    assert [j[0] for j in jobs] == [at(m, 0) for m in range(1, 6)]
    assert [j[1] for j in jobs] == [schedule_idempotency_key(schedule.id, at(m, 0)) for m in range(1, 6)]
    assert jobs[0][1] == f"schedule:{schedule.id}:2026-01-05T12:01:00+00:00"
    assert {(j[2], j[3]) for j in jobs} == {("PENDING", f"schedule:{schedule.id}")}
    after = ScheduleStore(seeded_database_url).get(schedule.id)
    assert after is not None and after.next_run_at == at(6, 0) and after.last_run_at == at(5, 0)
    assert after.last_export_id == ticks[0].export_id


def evaluate_concurrently(database_url: str, now: datetime, evaluations: int) -> list[int]:
    """Jobs created by each of ``evaluations`` evaluations started at once, in ascending order."""
    barrier = threading.Barrier(evaluations)

    def evaluate() -> int:
        barrier.wait()
        return sum(t.created for t in enqueue_due_schedules(database_url, CATALOG, now=now))

    with ThreadPoolExecutor(evaluations) as pool:
        return sorted(pool.map(lambda _: evaluate(), range(evaluations)))


def test_concurrent_evaluations_of_a_tick_make_one_job(seeded_database_url: str) -> None:
    schedule = make_schedule(seeded_database_url)
    for minute in range(1, 6):
        assert evaluate_concurrently(seeded_database_url, at(minute), 4) == [0, 0, 0, 1]
    assert [j[0] for j in scheduled_jobs(seeded_database_url, schedule.id)] == [at(m, 0) for m in range(1, 6)]


def test_a_tick_evaluated_again_after_a_lost_advance_reuses_its_job(seeded_database_url: str) -> None:
    """The idempotency key is the safety net: even a schedule put back on a tick it already made gets no twin."""
    schedule = make_schedule(seeded_database_url)
    (first,) = enqueue_due_schedules(seeded_database_url, CATALOG, now=at(1))
    with psycopg.connect(seeded_database_url) as conn:
        conn.execute("UPDATE export_schedules SET next_run_at = %s WHERE id = %s", (at(1, 0), schedule.id))
    (again,) = enqueue_due_schedules(seeded_database_url, CATALOG, now=at(1, 30))
    assert (again.created, again.export_id, again.scheduled_for) == (False, first.export_id, at(1, 0))
    assert len(scheduled_jobs(seeded_database_url, schedule.id)) == 1


def test_after_ten_minutes_of_downtime_only_the_latest_missed_tick_runs(seeded_database_url: str) -> None:
    schedule = make_schedule(seeded_database_url)
    (tick,) = enqueue_due_schedules(seeded_database_url, CATALOG, now=at(11, 20))  # 12:01 ... 12:11 were missed
    assert (tick.scheduled_for, tick.created) == (at(11, 0), True)
    assert [j[0] for j in scheduled_jobs(seeded_database_url, schedule.id)] == [at(11, 0)]
    after = ScheduleStore(seeded_database_url).get(schedule.id)
    assert after is not None and after.next_run_at == at(12, 0)
    assert enqueue_due_schedules(seeded_database_url, CATALOG, now=at(11, 50)) == []
    (tick,) = enqueue_due_schedules(seeded_database_url, CATALOG, now=at(12))
    assert tick.scheduled_for == at(12, 0)


def test_due_schedules_of_several_tenants_each_get_their_tick(seeded_database_url: str) -> None:
    every_minute = make_schedule(seeded_database_url)
    every_five = make_schedule(seeded_database_url, cron="*/5 * * * *", tenant=OTHER, name="every five")
    made = {t.schedule_id: t.scheduled_for for t in enqueue_due_schedules(seeded_database_url, CATALOG, now=at(5))}
    assert made == {every_minute.id: at(5, 0), every_five.id: at(5, 0)}
    made = {t.schedule_id: t.scheduled_for for t in enqueue_due_schedules(seeded_database_url, CATALOG, now=at(6))}
    assert made == {every_minute.id: at(6, 0)}


# -- timezones --------------------------------------------------------------------------------
def test_daily_tick_stays_at_nine_in_paris_across_the_spring_dst_change(seeded_database_url: str) -> None:
    schedule = make_schedule(
        seeded_database_url, cron="0 9 * * *", tz="Europe/Paris", now=datetime(2026, 3, 27, 12, 0, tzinfo=UTC)
    )
    assert schedule.next_run_at == datetime(2026, 3, 28, 8, 0, tzinfo=UTC)  # 09:00 CET
    (tick,) = enqueue_due_schedules(seeded_database_url, CATALOG, now=datetime(2026, 3, 28, 8, 0, 10, tzinfo=UTC))
    assert tick.scheduled_for == datetime(2026, 3, 28, 8, 0, tzinfo=UTC)
    after = ScheduleStore(seeded_database_url).get(schedule.id)
    assert after is not None and after.next_run_at == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)  # 09:00 CEST


def test_a_wall_time_that_happens_twice_in_the_autumn_makes_one_job(seeded_database_url: str) -> None:
    """02:30 happens twice in Paris on 25 October 2026 (CEST, then CET): the schedule ticks once, as Dagster's do."""
    schedule = make_schedule(
        seeded_database_url, cron="30 2 * * *", tz="Europe/Paris", now=datetime(2026, 10, 24, 12, 0, tzinfo=UTC)
    )
    made = []
    now = datetime(2026, 10, 25, 0, 0, tzinfo=UTC)
    while now < datetime(2026, 10, 25, 4, 0, tzinfo=UTC):
        made += enqueue_due_schedules(seeded_database_url, CATALOG, now=now)
        now += timedelta(minutes=15)
    assert [t.scheduled_for for t in made] == [datetime(2026, 10, 25, 1, 30, tzinfo=UTC)]  # 02:30 CET
    after = ScheduleStore(seeded_database_url).get(schedule.id)
    assert after is not None and after.next_run_at == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


# -- pausing, deleting ------------------------------------------------------------------------
def test_paused_schedule_makes_nothing_and_resumes_at_the_next_tick(seeded_database_url: str) -> None:
    store = ScheduleStore(seeded_database_url)
    schedule = make_schedule(seeded_database_url)
    paused = store.pause(schedule.id)
    assert paused is not None and (paused.enabled, paused.next_run_at) == (False, None)
    for minute in range(1, 6):
        assert enqueue_due_schedules(seeded_database_url, CATALOG, now=at(minute)) == []
    resumed = store.resume(schedule.id, now=at(5, 30))
    assert resumed is not None and (resumed.enabled, resumed.next_run_at) == (True, at(6, 0))
    again = store.resume(schedule.id, now=at(9, 30))  # resuming a running schedule keeps its due tick
    assert again is not None and again.next_run_at == at(6, 0)
    (tick,) = enqueue_due_schedules(seeded_database_url, CATALOG, now=at(6))
    assert tick.scheduled_for == at(6, 0)
    assert [j[0] for j in scheduled_jobs(seeded_database_url, schedule.id)] == [at(6, 0)]


def test_deleting_a_schedule_keeps_its_jobs(seeded_database_url: str) -> None:
    store = ScheduleStore(seeded_database_url)
    schedule = make_schedule(seeded_database_url)
    (tick,) = enqueue_due_schedules(seeded_database_url, CATALOG, now=at(1))
    assert store.delete(schedule.id, tenant_id=OTHER) is False
    assert store.delete(schedule.id) is True
    assert store.get(schedule.id) is None
    with psycopg.connect(seeded_database_url) as conn:
        row = conn.execute("SELECT schedule_id, scheduled_for FROM export_jobs WHERE id = %s", (tick.export_id,))
        assert row.fetchone() == (None, at(1, 0))


def test_other_tenants_schedule_is_not_found(seeded_database_url: str) -> None:
    store = ScheduleStore(seeded_database_url)
    schedule = make_schedule(seeded_database_url)
    assert store.get(schedule.id, tenant_id=OTHER) is None
    assert store.pause(schedule.id, tenant_id=OTHER) is None
    assert store.resume(schedule.id, tenant_id=OTHER) is None
    assert store.get("not-a-uuid") is None
    assert [s.id for s in store.list_schedules(OTHER)] == []
    assert [s.id for s in store.list_schedules(TENANT)] == [schedule.id]


def test_row_level_security_hides_other_tenants_schedules(seeded_database_url: str) -> None:
    make_schedule(seeded_database_url, tenant=TENANT)
    make_schedule(seeded_database_url, tenant=OTHER)
    with psycopg.connect(seeded_database_url, autocommit=True) as conn:
        conn.execute("CREATE ROLE pulse_sched_t NOLOGIN")
        conn.execute("GRANT SELECT ON export_schedules TO pulse_sched_t")
        try:
            conn.execute("SET ROLE pulse_sched_t")
            conn.execute("SET pulse.tenant_id = 'tenant-001'")
            assert conn.execute("SELECT tenant_id FROM export_schedules").fetchall() == [(OTHER,)]
        finally:
            conn.execute("RESET ROLE")
            conn.execute("RESET pulse.tenant_id")
            conn.execute("DROP OWNED BY pulse_sched_t")
            conn.execute("DROP ROLE pulse_sched_t")


# -- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * *"}, "cron"),
        ({"cron": "0 0 31 4 *"}, "cron"),  # 31 April: never fires
        ({"tz": "Mars/Olympus_Mons"}, "timezone"),
        ({"tz": "localtime"}, "timezone"),
        ({"name": "  "}, "name"),
        ({"name": "bell\x07"}, "name"),
        ({"columns": ["device_id", "nope"]}, "columns[1]"),
        ({"export_type": "invoices"}, "export_type"),
        ({"filters": {"time_range": "2y"}}, "filters.time_range"),
    ],
)
def test_invalid_schedule_is_refused_naming_the_field(
    seeded_database_url: str, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ExportRequestError) as refused:
        make_schedule(seeded_database_url, **changes)
    assert refused.value.field == field
    assert ScheduleStore(seeded_database_url).list_schedules() == []


def test_a_second_schedule_with_the_same_name_is_refused(seeded_database_url: str) -> None:
    make_schedule(seeded_database_url, name="nightly")
    with pytest.raises(ScheduleNameTaken) as refused:
        make_schedule(seeded_database_url, name="nightly")
    assert refused.value.field == "name"
    make_schedule(seeded_database_url, name="nightly", tenant=OTHER)  # names are per tenant


def test_schedule_whose_spec_no_longer_validates_is_paused_and_others_still_run(seeded_database_url: str) -> None:
    broken = make_schedule(seeded_database_url, name="telemetry", export_type="telemetry")
    healthy = make_schedule(seeded_database_url, name="devices")
    without_telemetry = Catalog({k: v for k, v in builtin_types().items() if k != "telemetry"})
    ticks = {t.schedule_id: t for t in enqueue_due_schedules(seeded_database_url, without_telemetry, now=at(1))}
    assert ticks[healthy.id].created and ticks[healthy.id].error is None
    assert ticks[broken.id].export_id is None and "export_type" in (ticks[broken.id].error or "")
    paused = ScheduleStore(seeded_database_url).get(broken.id)
    assert paused is not None and (paused.enabled, paused.next_run_at) == (False, None)
    assert paused.last_error and paused.last_error.startswith("paused: export_type: unknown export type 'telemetry'")
    assert scheduled_jobs(seeded_database_url, broken.id) == []
    resumed = ScheduleStore(seeded_database_url).resume(broken.id, now=at(1, 30))
    assert resumed is not None and resumed.last_error is None and resumed.next_run_at == at(2, 0)


# -- the sensor and the pipeline --------------------------------------------------------------
def test_sensor_enqueues_a_due_tick_once_on_the_database_clock(exports: ExportHarness) -> None:
    now = datetime.now(UTC)
    schedule = make_schedule(exports.database_url, cron="* * * * *", now=now - timedelta(minutes=3))
    defs = exports.defs
    for expected in ("1 exports created, 0 schedules paused", "no schedules due"):
        with dg.build_sensor_context(
            instance=exports.instance, definitions=defs, resources=dict(defs.resources or {})
        ) as context:
            result = export_schedules_sensor(context)
        assert isinstance(result, dg.SkipReason) and result.skip_message == expected
    (job,) = scheduled_jobs(exports.database_url, schedule.id)
    assert now - timedelta(minutes=1) <= job[0] <= datetime.now(UTC)  # the latest tick, not the missed ones


def test_scheduled_jobs_run_through_the_pipeline_to_completed(exports: ExportHarness) -> None:
    schedule = make_schedule(exports.database_url, format="ndjson", columns=["device_id", "site_id"])
    for minute in (1, 2):
        enqueue_due_schedules(exports.database_url, CATALOG, now=at(minute))
    runs = exports.run_sensor_and_runs()
    assert [r.success for r in runs] == [True, True]
    listed = ScheduleStore(exports.database_url).exports(schedule.id, tenant_id=TENANT)
    assert [(e.scheduled_for, e.job.status) for e in listed] == [(at(2, 0), "COMPLETED"), (at(1, 0), "COMPLETED")]
    with psycopg.connect(exports.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM device_registry WHERE tenant_id = %s", (TENANT,)).fetchone()
    assert row is not None and {e.job.row_count for e in listed} == {row[0]}
    assert ScheduleStore(exports.database_url).exports(schedule.id, tenant_id=OTHER) == []


# -- the CLI ----------------------------------------------------------------------------------
def cli(database_url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, list(args), env={"PULSE_DATABASE_URL": database_url})
    return result.exit_code, result.output


def test_cli_creates_lists_shows_pauses_resumes_and_deletes_a_schedule(seeded_database_url: str) -> None:
    code, out = cli(
        seeded_database_url, "schedule", "create", "--tenant", TENANT, "--name", "paris morning",
        "--cron", "0 6 * * mon-fri", "--timezone", "Europe/Paris", "--type", "alerts", "--format", "parquet",
        "--filters", '{"time_range": "24h"}', "--expires-in", "3600",
    )  # fmt: skip
    assert code == 0, out
    created = json.loads(out)
    assert (created["cron"], created["timezone"], created["compression"]) == ("0 6 * * mon-fri", "Europe/Paris", "zstd")
    assert created["options"] == {"expires_in": 3600} and created["filters"] == {"time_range": "24h"}
    assert datetime.fromisoformat(created["next_run_at"]).astimezone(UTC).hour in (4, 5)  # 06:00 Paris
    sid = created["id"]

    code, out = cli(seeded_database_url, "schedule", "list", "--tenant", TENANT)
    assert code == 0 and [s["id"] for s in json.loads(out)] == [sid]
    code, out = cli(seeded_database_url, "schedule", "pause", sid)
    assert code == 0 and json.loads(out)["enabled"] is False
    code, out = cli(seeded_database_url, "schedule", "resume", sid)
    assert code == 0 and json.loads(out)["enabled"] is True

    with psycopg.connect(seeded_database_url) as conn:  # make it due, and let an evaluation make a job
        conn.execute("UPDATE export_schedules SET next_run_at = now() - interval '1 minute' WHERE id = %s", (sid,))
    (tick,) = enqueue_due_schedules(seeded_database_url, CATALOG)
    code, out = cli(seeded_database_url, "schedule", "show", sid)
    shown = json.loads(out)
    assert code == 0 and [e["id"] for e in shown["exports"]] == [str(tick.export_id)]
    assert shown["exports"][0]["status"] == "PENDING"
    code, out = cli(seeded_database_url, "schedule", "show", sid, "--tenant", OTHER)
    assert code == 1 and "not found" in out

    code, out = cli(seeded_database_url, "schedule", "delete", sid)
    assert code == 0, out
    code, out = cli(seeded_database_url, "schedule", "show", sid)
    assert code == 1 and "not found" in out
    code, out = cli(seeded_database_url, "status", str(tick.export_id))
    assert code == 0 and json.loads(out)["status"] == "PENDING"  # the job outlives its schedule


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "every day"], "cron: 'every day' is not a cron expression"),
        (["--cron", "* * * * *", "--timezone", "Paris"], "timezone: 'Paris' is not an IANA timezone"),
        (["--cron", "* * * * *", "--columns", "device_id,colour"], "columns[1]: unknown column 'colour'"),
        (["--cron", "* * * * *", "--callback-url", "http://127.0.0.1/hook"], "callback_url"),
    ],
)
def test_cli_refuses_an_invalid_schedule_naming_the_field(
    seeded_database_url: str, args: list[str], message: str
) -> None:
    code, out = cli(
        seeded_database_url, "schedule", "create", "--tenant", TENANT, "--name", "x", "--type", "devices", *args
    )
    assert code == 2 and message in out, out


# -- the API ----------------------------------------------------------------------------------
@pytest.fixture
def api(exports: ExportHarness, s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveApi]:
    s3_env(monkeypatch, s3_endpoint)
    with live_api(exports, s3_endpoint_url=s3_endpoint.url) as live:
        yield live


BODY = {"name": "hourly devices", "cron": "0 * * * *", "timezone": "Europe/Paris", "export_type": "devices"}


def test_api_creates_gets_lists_pauses_resumes_and_deletes_a_schedule(api: LiveApi) -> None:
    with api.http() as http:
        created = http.post("/export-schedules", json={**BODY, "format": "json", "expires_in": 600})
        assert created.status_code == 201, created.text
        schedule = created.json()
        sid = schedule["id"]
        assert created.headers["location"].endswith(f"/api/v1/export-schedules/{sid}")
        assert schedule["enabled"] is True and schedule["options"] == {"expires_in": 600}
        assert datetime.fromisoformat(schedule["next_run_at"]).minute == 0
        assert schedule["exports_url"].endswith(f"/api/v1/export-schedules/{sid}/exports")

        assert http.get(f"/export-schedules/{sid}").json() == schedule
        assert http.post("/export-schedules", json=BODY).status_code == 409  # same name
        second = http.post("/export-schedules", json={**BODY, "name": "second"}).json()
        first_page = http.get("/export-schedules", params={"limit": 1}).json()
        assert [s["id"] for s in first_page["items"]] == [sid]
        rest = http.get("/export-schedules", params={"limit": 1, "cursor": first_page["next_cursor"]}).json()
        assert [s["id"] for s in rest["items"]] == [second["id"]] and rest["next_cursor"] is None

        paused = http.post(f"/export-schedules/{sid}/pause").json()
        assert (paused["enabled"], paused["next_run_at"]) == (False, None)
        resumed = http.post(f"/export-schedules/{sid}/resume").json()
        assert resumed["enabled"] is True and resumed["next_run_at"] is not None

        assert http.delete(f"/export-schedules/{sid}").status_code == 204
        assert http.get(f"/export-schedules/{sid}").status_code == 404
        assert http.delete(f"/export-schedules/{sid}").status_code == 404


def test_api_lists_a_schedules_exports_latest_tick_first(api: LiveApi) -> None:
    with api.http() as http:
        sid = http.post("/export-schedules", json={**BODY, "cron": "* * * * *", "timezone": "UTC"}).json()["id"]
    with psycopg.connect(api.exports.database_url) as conn:
        conn.execute("UPDATE export_schedules SET next_run_at = %s WHERE id = %s", (at(1, 0), sid))
    for minute in (1, 2, 3):
        enqueue_due_schedules(api.exports.database_url, CATALOG, now=at(minute))
    assert api.run_exports() == [True, True, True]
    with api.http() as http:
        page = http.get(f"/export-schedules/{sid}/exports", params={"limit": 2}).json()
        assert [datetime.fromisoformat(e["scheduled_for"]) for e in page["items"]] == [at(3, 0), at(2, 0)]
        assert {e["status"] for e in page["items"]} == {"COMPLETED"}
        assert page["items"][0]["download_url"].endswith("/download")
        rest = http.get(f"/export-schedules/{sid}/exports", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        assert [datetime.fromisoformat(e["scheduled_for"]) for e in rest["items"]] == [at(1, 0)]
        assert rest["next_cursor"] is None
        listed = {e["id"] for e in http.get("/exports").json()["items"]}
        assert {e["id"] for e in page["items"] + rest["items"]} <= listed  # ordinary exports too


def test_api_answers_404_for_another_tenants_schedule(api: LiveApi) -> None:
    with api.http(OTHER) as http:
        sid = http.post("/export-schedules", json=BODY).json()["id"]
    with api.http() as http:
        for method, path in [
            ("GET", f"/export-schedules/{sid}"),
            ("GET", f"/export-schedules/{sid}/exports"),
            ("POST", f"/export-schedules/{sid}/pause"),
            ("POST", f"/export-schedules/{sid}/resume"),
            ("DELETE", f"/export-schedules/{sid}"),
            ("GET", "/export-schedules/not-a-uuid"),
        ]:
            assert http.request(method, path).status_code == 404, (method, path)
        assert http.get("/export-schedules").json()["items"] == []
    with api.http(OTHER) as http:
        assert http.get(f"/export-schedules/{sid}").json()["enabled"] is True  # untouched


@pytest.mark.parametrize(
    ("changes", "loc"),
    [
        ({"cron": "*/90 * * * *"}, ["body", "cron"]),
        ({"timezone": "Europe/Atlantis"}, ["body", "timezone"]),
        ({"columns": ["device_id", "nope"]}, ["body", "columns", 1]),
        ({"filters": {"colour": ["red"]}}, ["body", "filters", "colour"]),
        ({"expires_in": 10}, ["body", "expires_in"]),
        ({"callback_url": "http://169.254.169.254/latest"}, ["body", "callback_url"]),
        ({"tenant_id": OTHER}, ["body", "tenant_id"]),  # the tenant comes from the key only
    ],
)
def test_api_refuses_an_invalid_schedule_with_the_field_in_loc(
    api: LiveApi, changes: dict[str, Any], loc: list
) -> None:
    with api.http() as http:
        response = http.post("/export-schedules", json={**BODY, **changes})
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["detail"]] == [loc]


def test_api_refuses_a_cursor_it_did_not_make(api: LiveApi) -> None:
    with api.http() as http:
        assert http.get("/export-schedules", params={"cursor": "bm90IGEgY3Vyc29y"}).status_code == 422


# -- a real daemon across a restart -----------------------------------------------------------
@pytest.mark.slow
def test_real_daemon_makes_one_job_per_minute_across_a_restart(dagster_services: DagsterServices) -> None:
    url = dagster_services.database_url
    request = CATALOG.validate(tenant_id=TENANT, export_type="devices", format="csv", columns=["device_id"])
    schedule = ScheduleStore(url).create(request, name="daemon restart", cron="* * * * *")

    def made() -> list[tuple[datetime, datetime, str]]:
        """(tick, created_at, status) of the schedule's jobs, by tick."""
        with psycopg.connect(url) as conn:
            return conn.execute(
                "SELECT scheduled_for, created_at, status FROM export_jobs WHERE schedule_id = %s"
                " ORDER BY scheduled_for",
                (schedule.id,),
            ).fetchall()

    processes = dagster_services.processes
    wait_for("the first tick's job", made, processes, timeout=150)
    down_at = datetime.now(UTC)
    dagster_services.daemon.stop()
    time.sleep(5)
    dagster_services.daemon.start()
    restarted_at = datetime.now(UTC)
    wait_for("two ticks after the restart", lambda: sum(j[1] > restarted_at for j in made()) >= 2, processes, 240)
    dagster_services.stop_sensor("export_schedules_sensor")  # freeze the set of ticks

    jobs = made()
    ticks = [j[0] for j in jobs]
    assert len(ticks) == len(set(ticks))  # one job per tick
    # Each job is for the latest tick when it was made: no stale catch-up, no burst after the restart.
    assert all(timedelta(0) <= created - tick < timedelta(minutes=1) for tick, created, _ in jobs), jobs
    first_after_restart = next(created for _, created, _ in jobs if created > restarted_at)
    for earlier, later in zip(ticks, ticks[1:], strict=False):  # consecutive minutes, except across the downtime
        assert later - earlier == timedelta(minutes=1) or (later > down_at and earlier < first_after_restart), jobs
    wait_for(  # the daemon's export_jobs_sensor launched their runs
        "the scheduled exports to complete", lambda: {j[2] for j in made()} == {"COMPLETED"}, processes, timeout=360
    )
