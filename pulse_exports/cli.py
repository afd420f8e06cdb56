"""The ``pulse-exports`` command line: database setup, demo data, and exports by hand."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

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


@main.command()
@click.option("--tenant", required=True)
@click.option("--type", "export_type", required=True)
@click.option("--format", "fmt", default="csv", show_default=True)
@click.option("--compression")
@click.option("--columns", help="Comma-separated column names.")
@click.option("--filters", help='JSON object, e.g. {"time_range": "24h"}.')
@click.option("--row-limit", type=int)
@click.option("--option", "options", multiple=True, help="key=value, e.g. part_max_rows=100000.")
@click.option("--idempotency-key")
def submit(
    tenant: str,
    export_type: str,
    fmt: str,
    compression: str | None,
    columns: str | None,
    filters: str | None,
    row_limit: int | None,
    options: tuple[str, ...],
    idempotency_key: str | None,
) -> None:
    """Create an export job (PENDING); the sensor launches its run. Prints the job as JSON."""
    try:
        parsed_filters = json.loads(filters) if filters else None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--filters") from None
    parsed_options: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--option")
        try:
            parsed_options[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed_options[key] = value
    database = _database()
    try:
        request = database.catalog().validate(
            tenant_id=tenant,
            export_type=export_type,
            format=fmt,
            compression=compression,
            columns=columns,
            filters=parsed_filters,
            row_limit=row_limit,
            options=parsed_options,
        )
    except ExportRequestError as exc:
        raise click.UsageError(f"invalid request: {exc}") from None
    job, _ = database.jobs().create(request, created_by="cli", idempotency_key=idempotency_key)
    _echo_json(job.to_dict())


@main.command()
@click.argument("export_id")
@click.option("--tenant", help="Answer only if the export belongs to this tenant.")
def status(export_id: str, tenant: str | None) -> None:
    """Print an export job as JSON."""
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


@main.command()
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".pulse"),
    show_default=True,
    help="Folder for the embedded PostgreSQL, Dagster home and exported files.",
)
@click.option("--telemetry-rows", default=1_000_000, show_default=True, type=click.IntRange(0))
def demo(home: Path, telemetry_rows: int) -> None:
    """One command: embedded PostgreSQL, migrations, sample data, two exports through Dagster."""
    from pulse_exports.demo import run_demo

    sys.exit(run_demo(home.resolve(), telemetry_rows=telemetry_rows))


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


if __name__ == "__main__":
    main()
