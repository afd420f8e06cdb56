"""The ``pulse-exports`` command line: database setup, demo data, and exports by hand."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from dagster_shared.cli import workspace_options

from pulse_exports import migrations
from pulse_exports.catalog import ExportRequestError


def _env_url(name: str, fallback: str | None = None) -> str:
    value = os.environ.get(name) or (os.environ.get(fallback) if fallback else None)
    if not value:
        raise click.UsageError(f"set {name} (for a local try-out, `pulse-exports demo` sets everything up)")
    return value


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
def main() -> None:
    """Asynchronous, large-scale data exports orchestrated by Dagster."""


@main.group()
def db() -> None:
    """The job database (export_jobs and its migrations)."""


@db.command("upgrade")
@click.option("--database-url", envvar="PULSE_DATABASE_URL", required=True, help="Defaults to PULSE_DATABASE_URL.")
def db_upgrade(database_url: str) -> None:
    """Apply pending migrations (idempotent)."""
    applied = migrations.upgrade(database_url)
    version = migrations.current_version(database_url)
    click.echo(
        f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}; at version {version}"
    )


@main.command("seed-demo")
@click.option("--tenants", default=3, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--devices", default=300, show_default=True, type=click.IntRange(1))
@click.option("--telemetry-rows", default=200_000, show_default=True, type=click.IntRange(0))
@click.option("--big-tenant-share", type=click.FloatRange(0, 1), help="Share of telemetry for tenant-001.")
@click.option("--database-url", envvar=["PULSE_SOURCE_DATABASE_URL", "PULSE_DATABASE_URL"], required=True)
def seed_demo_command(
    tenants: int, devices: int, telemetry_rows: int, big_tenant_share: float | None, database_url: str
) -> None:
    """Create the sample product schema and fill it with generated data (replacing what is there)."""
    from pulse_exports.sample_data import seed_demo

    result = seed_demo(
        database_url, tenants=tenants, devices=devices, telemetry_rows=telemetry_rows, big_tenant_share=big_tenant_share
    )
    click.echo(
        f"seeded {result.tenants} tenants, {result.devices} devices, {result.alerts} alerts, "
        f"{result.telemetry_rows} telemetry rows in {result.seconds:.1f}s"
    )


@main.command("export-types")
def export_types() -> None:
    """Print the catalog: export types with their columns, filters and formats."""
    _echo_json(_database().catalog().describe())


def _export_spec_options(filters_help: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options that describe an export, shared by `submit` and `schedule create`."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(
            (
                click.option("--type", "export_type", required=True),
                click.option("--format", "fmt", default="csv", show_default=True),
                click.option("--compression"),
                click.option("--columns", help="Comma-separated column names."),
                click.option("--filters", help=filters_help),
                click.option("--row-limit", type=int),
            )
        ):
            command = option(command)
        return command

    return decorate


def _validated(database: Any, tenant: str, spec: dict[str, Any], options: dict[str, Any], hint: str) -> Any:
    """The catalog's ExportRequest for a command's export options; its errors end the command naming the field."""
    try:
        return database.catalog().validate(
            tenant_id=tenant,
            export_type=spec["export_type"],
            format=spec["fmt"],
            compression=spec["compression"],
            columns=spec["columns"],
            filters=_json_object(spec["filters"], "--filters"),
            row_limit=spec["row_limit"],
            options=options,
        )
    except ExportRequestError as exc:
        raise click.UsageError(f"invalid {hint}: {exc}") from None


@main.command()
@click.option("--tenant", help="Required without PULSE_API_URL; through the API, the API key names the tenant.")
@_export_spec_options('JSON object, e.g. {"time_range": "24h"}.')
@click.option("--option", "options", multiple=True, help="key=value, e.g. part_max_rows=100000.")
@click.option("--idempotency-key")
def submit(tenant: str | None, options: tuple[str, ...], idempotency_key: str | None, **spec: Any) -> None:
    """Create an export job (PENDING); the sensor launches its run. Prints the job as JSON."""
    parsed_options: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--option")
        try:
            parsed_options[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed_options[key] = value
    if os.environ.get("PULSE_API_URL"):
        columns = spec["columns"]
        with _through_api() as client:
            created = client.create(
                spec["export_type"],
                format=spec["fmt"],
                compression=spec["compression"],
                columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
                filters=_json_object(spec["filters"], "--filters"),
                row_limit=spec["row_limit"],
                options=parsed_options or None,
                idempotency_key=idempotency_key,
            )
        _echo_json(created.model_dump(mode="json"))
        return
    if not tenant:
        raise click.UsageError("--tenant is required (or set PULSE_API_URL and PULSE_API_KEY to go through the API)")
    database = _database()
    request = _validated(database, tenant, spec, parsed_options, "request")
    job, _ = database.jobs().create(request, created_by="cli", idempotency_key=idempotency_key)
    _echo_json(job.to_dict())


@main.command()
@click.argument("export_id")
@click.option("--tenant", help="Answer only if the export belongs to this tenant.")
def status(export_id: str, tenant: str | None) -> None:
    """Print an export job as JSON."""
    if os.environ.get("PULSE_API_URL"):
        with _through_api() as client:
            _echo_json(client.get(export_id).model_dump(mode="json"))
        return
    job = _database().jobs().get(export_id, tenant_id=tenant)
    if job is None:
        raise click.ClickException(f"export {export_id} not found")
    _echo_json(job.to_dict())


@main.command()
@click.argument("export_id")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--tenant", help="Answer only if the export belongs to this tenant.")
def download(export_id: str, out_dir: Path, tenant: str | None) -> None:
    """Fetch every part of a COMPLETED export and check each sha256 against the manifest."""
    if os.environ.get("PULSE_API_URL"):
        with _through_api() as client:
            manifest = client.manifest(export_id)
            for path, part in zip(client.download(export_id, out_dir), manifest.parts, strict=True):
                click.echo(f"{path}  {part.rows} rows  {part.bytes} bytes  sha256 ok")
        without_urls = manifest.model_dump(mode="json", exclude={"parts": {"__all__": {"url"}}})
        (out_dir / "manifest.json").write_text(json.dumps(without_urls, indent=2))
        return
    job = _database().jobs().get(export_id, tenant_id=tenant)
    if job is None:
        raise click.ClickException(f"export {export_id} not found")
    if job.status != "COMPLETED" or not job.manifest:
        raise click.ClickException(f"export {export_id} is {job.status}, not COMPLETED")
    store = _storage().get_store()
    out_dir.mkdir(parents=True, exist_ok=True)
    for part in job.manifest["parts"]:
        target = out_dir / part["file"]
        store.download_file(part["key"], target)
        digest = _sha256(target)
        if digest != part["sha256"]:
            target.unlink()
            raise click.ClickException(f"{part['file']}: sha256 {digest} does not match the manifest")
        click.echo(f"{target}  {part['rows']} rows  {part['bytes']} bytes  sha256 ok")
    (out_dir / "manifest.json").write_text(json.dumps(job.manifest, indent=2))


@main.command()
def purge() -> None:
    """Delete the files of expired exports now (the hourly schedule does the same)."""
    from pulse_exports.purge import purge_expired

    result = purge_expired(_database().jobs(), _storage().get_store())
    click.echo(f"expired {len(result.expired)} exports, deleted {result.objects_deleted} objects")


# The options `demo` and `dev` share: both run on the embedded defaults kept in one folder.
_home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".pulse"),
    show_default=True,
    help="Folder for the embedded PostgreSQL, Dagster home and exported files.",
)
_telemetry_rows_option = click.option("--telemetry-rows", default=1_000_000, show_default=True, type=click.IntRange(0))


@main.command()
@_home_option
@_telemetry_rows_option
def demo(home: Path, telemetry_rows: int) -> None:
    """One command: embedded PostgreSQL, migrations, sample data, two exports through Dagster."""
    from pulse_exports.demo import run_demo

    sys.exit(run_demo(home.resolve(), telemetry_rows=telemetry_rows))


@main.command()
@_home_option
@click.option("--api-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--dagster-port", default=3000, show_default=True, type=click.IntRange(1, 65535))
@_telemetry_rows_option
def dev(home: Path, api_port: int, dagster_port: int, telemetry_rows: int) -> None:
    """The whole system on loopback: Dagster's code server, UI and daemon, and the product API, on embedded defaults."""
    from pulse_exports.devstack import run_dev_stack

    home.mkdir(parents=True, exist_ok=True)
    sys.exit(run_dev_stack(home.resolve(), api_port=api_port, dagster_port=dagster_port, telemetry_rows=telemetry_rows))


@main.group("api-key")
def api_key() -> None:
    """Keys of the product API: each belongs to one tenant and is stored hashed."""


@api_key.command("create")
@click.option("--tenant", required=True)
@click.option("--name", help="What the key is for, shown in listings.")
def api_key_create(tenant: str, name: str | None) -> None:
    """Make a key for a tenant and print it as JSON: the secret is shown this once."""
    try:
        made = _api_keys().create(tenant, name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tenant") from None
    _echo_json({**made.key.to_dict(), "secret": made.secret})
    click.echo("Store the secret now: only its hash is kept, it cannot be shown again.", err=True)


@api_key.command("revoke")
@click.argument("key_id_or_prefix")
def api_key_revoke(key_id_or_prefix: str) -> None:
    """Revoke a key, named by its id or its prefix (pex_xxxxxxxx); requests with it get 401 at once."""
    revoked = _api_keys().revoke(key_id_or_prefix)
    if revoked is None:
        raise click.ClickException(f"no live API key {key_id_or_prefix!r}")
    _echo_json(revoked.to_dict())


@api_key.command("list")
@click.option("--tenant")
def api_key_list(tenant: str | None) -> None:
    """Print the keys (never their secrets), live and revoked."""
    _echo_json([k.to_dict() for k in _api_keys().list(tenant)])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1))
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    envvar="PULSE_LOG_FORMAT",
    default="json",
    show_default=True,
    help="Log lines as JSON objects or readable text; defaults to PULSE_LOG_FORMAT.",
)
def serve(host: str, port: int, workers: int, log_format: str) -> None:
    """Serve the product API (FastAPI under uvicorn), configured from the PULSE_* variables."""
    import uvicorn

    from pulse_exports.logs import logging_config

    _env_url("PULSE_DATABASE_URL")
    _env_url("PULSE_STORAGE_URL")
    uvicorn.run(
        "pulse_exports.api:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=logging_config(log_format),
        access_log=False,  # the API logs each request itself, with its tenant and export id
    )


@main.command(context_settings={"show_default": True})
@click.option(
    "--sensor-loop-seconds",
    type=click.FloatRange(min=0.05),
    default=0.5,
    help="How often due sensors are evaluated after a new export (or always, without a database URL); each "
    "still honours its minimum interval.",
)
@click.option(
    "--sensor-idle-seconds",
    type=click.FloatRange(min=0.05),
    default=5.0,
    help="How often due sensors are evaluated while no export arrives (dagster-daemon: always 5 s).",
)
@click.option(
    "--database-url",
    envvar="PULSE_DATABASE_URL",
    help="export_jobs' database, LISTENed to for new exports. Defaults to PULSE_DATABASE_URL; without it the "
    "sensors are polled every --sensor-loop-seconds.",
)
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info")
@click.option("--log-format", type=click.Choice(["colored", "json", "rich"]), default="colored")
@workspace_options
def daemon(
    sensor_loop_seconds: float,
    sensor_idle_seconds: float,
    database_url: str | None,
    log_level: str,
    log_format: str,
    **workspace: Any,
) -> None:
    """Dagster's daemon (`dagster-daemon run`), woken by each new export and with a short run-queue loop: an
    export inserted into export_jobs starts within a second. Takes dagster-daemon's workspace options
    (-w workspace.yaml, -m ...)."""
    from dagster_shared.cli import WorkspaceOpts

    from pulse_exports.daemon import run_daemon

    if sensor_idle_seconds < sensor_loop_seconds:
        raise click.BadParameter("must be at least --sensor-loop-seconds", param_hint="--sensor-idle-seconds")
    opts = WorkspaceOpts.extract_from_cli_options(workspace)
    run_daemon(
        opts,
        sensor_loop_seconds=sensor_loop_seconds,
        database_url=database_url or None,
        sensor_idle_seconds=sensor_idle_seconds,
        log_level=log_level,
        log_format=log_format,
    )


def _api_keys() -> Any:
    from pulse_exports.apikeys import ApiKeyStore

    return ApiKeyStore(_env_url("PULSE_DATABASE_URL"))


@contextmanager
def _through_api() -> Iterator[Any]:
    """A client of the product API (PULSE_API_URL, PULSE_API_KEY); its error answers end the command."""
    from pulse_exports.client import PulseExportsClient, PulseExportsError

    if not os.environ.get("PULSE_API_KEY"):
        raise click.UsageError("set PULSE_API_KEY too (make one with `pulse-exports api-key create`)")
    try:
        with PulseExportsClient.from_env() as client:
            yield client
    except PulseExportsError as exc:
        raise click.ClickException(f"the API answered {exc.status_code}: {exc.detail}") from None


def _database() -> Any:
    from pulse_exports.resources import PulseDatabase

    return PulseDatabase(url=_env_url("PULSE_DATABASE_URL"))


def _storage() -> Any:
    from pulse_exports.resources import ExportStorage

    return ExportStorage(url=_env_url("PULSE_STORAGE_URL"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@main.group("tenant-secret")
def tenant_secret() -> None:
    """The per-tenant secret that signs callbacks (X-Pulse-Signature); give it to the tenant's receiver."""


@tenant_secret.command("show")
@click.option("--tenant", required=True)
def tenant_secret_show(tenant: str) -> None:
    """Print the tenant's callback signing secret, creating it on first use."""
    click.echo(_database().jobs().callback_secret(tenant))


@tenant_secret.command("rotate")
@click.option("--tenant", required=True)
def tenant_secret_rotate(tenant: str) -> None:
    """Replace the tenant's secret and print the new one; deliveries from now on use it."""
    click.echo(_database().jobs().rotate_callback_secret(tenant))


@main.group()
def schedule() -> None:
    """Recurring exports: one export job per cron tick, in the schedule's timezone."""


def _schedules() -> Any:
    from pulse_exports.recurring import ScheduleStore

    return ScheduleStore(_env_url("PULSE_DATABASE_URL"))


def _json_object(value: str | None, hint: str) -> Any:
    try:
        return json.loads(value) if value else None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=hint) from None


@schedule.command("create")
@click.option("--tenant", required=True)
@click.option("--name", required=True, help="Unique per tenant.")
@click.option("--cron", required=True, help='Five fields, e.g. "*/15 * * * *" or "0 6 * * mon-fri".')
@click.option("--timezone", "tz", default="UTC", show_default=True, help="IANA name the cron is read in.")
@_export_spec_options('JSON object, e.g. {"time_range": "24h"}: relative ranges move with each tick.')
@click.option("--options", "options_json", help='JSON object, e.g. {"part_max_rows": 100000}.')
@click.option("--expires-in", type=int, help="Seconds each export's files are kept.")
@click.option("--callback-url", help="Told when each export ends (PULSE_CALLBACK_ALLOWLIST applies).")
def schedule_create(
    tenant: str,
    name: str,
    cron: str,
    tz: str,
    options_json: str | None,
    expires_in: int | None,
    callback_url: str | None,
    **spec: Any,
) -> None:
    """Create a schedule and print it as JSON; its first export is at the next tick."""
    from pulse_exports.netguard import Allowlist, validate_callback_url

    options = dict(_json_object(options_json, "--options") or {})
    if expires_in is not None:
        options["expires_in"] = expires_in
    request = _validated(_database(), tenant, spec, options, "schedule")
    try:
        checked_url = validate_callback_url(callback_url, Allowlist.from_env()) if callback_url else None
        created = _schedules().create(
            request, name=name, cron=cron, timezone=tz, callback_url=checked_url, created_by="cli"
        )
    except ExportRequestError as exc:
        raise click.UsageError(f"invalid schedule: {exc}") from None
    _echo_json(created.to_dict())


@schedule.command("list")
@click.option("--tenant", help="Only this tenant's schedules.")
def schedule_list(tenant: str | None) -> None:
    """Print the schedules as JSON, oldest first."""
    _echo_json([s.to_dict() for s in _schedules().list_schedules(tenant, limit=10_000)])


@schedule.command("show")
@click.argument("schedule_id")
@click.option("--tenant", help="Answer only if the schedule belongs to this tenant.")
@click.option("--exports", "limit", default=20, show_default=True, type=click.IntRange(0, 1000), help="Recent jobs.")
def schedule_show(schedule_id: str, tenant: str | None, limit: int) -> None:
    """Print a schedule and its latest exports (id, tick, status) as JSON."""
    store = _schedules()
    found = store.get(schedule_id, tenant_id=tenant)
    if found is None:
        raise click.ClickException(f"schedule {schedule_id} not found")
    exports = store.exports(found.id, limit=limit) if limit else []
    _echo_json(
        {
            **found.to_dict(),
            "exports": [
                {
                    "id": str(e.job.id),
                    "scheduled_for": e.scheduled_for.isoformat(),
                    "status": e.job.status,
                    "row_count": e.job.row_count,
                    "error": e.job.error,
                }
                for e in exports
            ],
        }
    )


def _echo_schedule(changed: Any, schedule_id: str) -> None:
    if changed is None:
        raise click.ClickException(f"schedule {schedule_id} not found")
    _echo_json(changed.to_dict())


@schedule.command("pause")
@click.argument("schedule_id")
@click.option("--tenant", help="Act only if the schedule belongs to this tenant.")
def schedule_pause(schedule_id: str, tenant: str | None) -> None:
    """Stop making exports; ticks while paused are skipped."""
    _echo_schedule(_schedules().pause(schedule_id, tenant_id=tenant), schedule_id)


@schedule.command("resume")
@click.argument("schedule_id")
@click.option("--tenant", help="Act only if the schedule belongs to this tenant.")
def schedule_resume(schedule_id: str, tenant: str | None) -> None:
    """Start again from the next tick (clears the error it was paused with)."""
    _echo_schedule(_schedules().resume(schedule_id, tenant_id=tenant), schedule_id)


@schedule.command("delete")
@click.argument("schedule_id")
@click.option("--tenant", help="Act only if the schedule belongs to this tenant.")
def schedule_delete(schedule_id: str, tenant: str | None) -> None:
    """Delete a schedule; the exports it made stay (no longer linked to it)."""
    if not _schedules().delete(schedule_id, tenant_id=tenant):
        raise click.ClickException(f"schedule {schedule_id} not found")
    click.echo(f"deleted schedule {schedule_id}")


if __name__ == "__main__":
    main()
