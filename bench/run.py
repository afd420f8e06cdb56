"""``python -m bench``: prepare the data, run the contenders alternately, write the report.

One invocation measures everything it reports: ratios are taken round by round (each round runs
every contender once, in rotated order), never against figures from another run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import report
from bench.contenders import ALL, BY_KEY, PSQL, Contender, ContenderFailed, Environment, Target, measure, warm_up
from bench.warm import KEY_NAME

DEFAULT_WORKDIR = Path(".pulse/bench")
DEFAULT_SCALING_CONTENDERS = "psql,naive,pulse-csv-file,pulse-parquet-file"


def parse_rows(text: str) -> int:
    """``500k``, ``2M``, ``10000`` -> rows."""
    text = text.strip().lower().replace("_", "")
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if factor > 1 else text) * factor)


def rows_label(rows: int) -> str:
    if rows >= 1_000_000 and rows % 100_000 == 0:
        return f"{rows / 1_000_000:g}M"
    if rows >= 1_000 and rows % 1_000 == 0:
        return f"{rows // 1_000}k"
    return str(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--database-url",
        help="a PostgreSQL database to export from (default: the embedded one); its sample tables are"
        " re-seeded unless already at the benchmark's scale, and --scaling above --rows creates databases beside it",
    )
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch files, local store, results")
    p.add_argument("--pg-dir", type=Path, default=Path(".pulse/bench-pg"), help="the embedded PostgreSQL's data")
    p.add_argument("--rows", type=parse_rows, default=2_000_000, help="rows of the big tenant (default 2M)")
    p.add_argument("--telemetry-rows", type=parse_rows, default=5_000_000, help="rows over all tenants (default 5M)")
    p.add_argument("--tenants", type=int, default=20)
    p.add_argument("--devices", type=int, default=5_000)
    p.add_argument("--repeat", type=int, default=3, help="rounds; each runs every contender once")
    p.add_argument("--warmup", type=int, default=1, help="untimed psql runs before the first round")
    p.add_argument("--contenders", default=",".join(c.key for c in ALL), help="comma-separated keys")
    p.add_argument(
        "--scaling",
        default="",
        help="extra sizes of the big tenant, e.g. 500k,1M,10M (above --rows a database is seeded with that many)",
    )
    p.add_argument("--scaling-contenders", default=DEFAULT_SCALING_CONTENDERS)
    p.add_argument("--naive-max-rows", type=parse_rows, default=2_000_000, help="skip the naive worker above this")
    p.add_argument("--s3-endpoint", help="use this S3 endpoint instead of starting SeaweedFS")
    p.add_argument("--s3-access-key", default=os.environ.get("AWS_ACCESS_KEY_ID", "any"))
    p.add_argument("--s3-secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY", "any"))
    p.add_argument("--docs", type=Path, default=Path("docs"), help="where benchmarks.md and img/ are written")
    p.add_argument("--results", type=Path, help="results JSON (default: <workdir>/results.json)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the results JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", module="dagster")  # beta/preview notices from sensor definitions
    # A terminated benchmark still stops the S3 server it started and removes its Dagster home.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    results_path = args.results or args.workdir / "results.json"
    if args.report_only:
        results = json.loads(results_path.read_text())
    else:
        results = run(args)
        results["command"] = " ".join(["python -m bench", *argv])
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
    written = report.write(results, args.docs)
    print(report.console_table(results))
    print("wrote " + ", ".join(str(p) for p in written))


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir: Path = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    contenders = _pick(args.contenders)
    scaling_contenders = _pick(args.scaling_contenders)
    sizes = [parse_rows(s) for s in args.scaling.split(",") if s.strip()]
    machine = _machine()
    with ExitStack() as stack:
        server_url = args.database_url or _embedded_server(args.pg_dir.absolute())
        main_db = _prepare_database(
            server_url, args.database_url is not None, "pulse_bench",
            tenants=args.tenants, devices=args.devices, telemetry_rows=args.telemetry_rows, tenant_rows=args.rows,
        )  # fmt: skip
        s3 = s3_pid = None
        if any(c.storage == "s3" and c.kind in ("pulse", "warm") for c in [*contenders, *scaling_contenders]):
            s3, s3_pid = _s3_endpoint(args, workdir, stack)
        dagster_home = Path(tempfile.mkdtemp(prefix="pulse-bench-dagster-"))
        stack.callback(shutil.rmtree, dagster_home, ignore_errors=True)
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ["DAGSTER_HOME"] = str(dagster_home)
        env = Environment(workdir=workdir, psql=_psql(), dagster_home=dagster_home, s3=s3, s3_server_pid=s3_pid)
        stack.callback(env.close)
        if s3 is not None:
            client = s3.client()
            if env.s3_bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                client.create_bucket(Bucket=env.s3_bucket)
        runs: list[dict[str, Any]] = []
        scales = [{"rows": args.rows, "contenders": [c.key for c in contenders], "main": True}]
        for size in sizes:
            if size != args.rows:
                keys = [c.key for c in scaling_contenders]
                scales.append({"rows": size, "contenders": keys, "main": False})
        for scale in sorted(scales, key=lambda s: s["rows"]):
            size = scale["rows"]
            if size <= args.rows:
                target = _target(main_db, "tenant-001", size, None if size == args.rows else size)
            else:
                db = _prepare_database(
                    server_url, args.database_url is not None, f"pulse_bench_{rows_label(size).lower()}",
                    tenants=1, devices=args.devices, telemetry_rows=size, tenant_rows=size,
                )  # fmt: skip
                target = _target(db, "tenant-001", size, None)
            chosen = [BY_KEY[k] for k in scale["contenders"]]
            chosen = [c for c in chosen if not (c.kind == "naive" and size > args.naive_max_rows)]
            scale["contenders"] = [c.key for c in chosen]
            runs += _rounds(chosen, target, env, args.repeat, args.warmup)
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine, "load_after": os.getloadavg()[0]},
        "dataset": {
            "telemetry_rows": args.telemetry_rows,
            "tenants": args.tenants,
            "devices": args.devices,
            "tenant_rows": args.rows,
        },
        "repeat": args.repeat,
        "main_rows": args.rows,
        "scales": scales,
        "runs": runs,
    }


def _pick(keys: str) -> list[Contender]:
    chosen = []
    for key in (k.strip() for k in keys.split(",") if k.strip()):
        if key not in BY_KEY:
            raise SystemExit(f"unknown contender {key!r}; known: {', '.join(BY_KEY)}")
        chosen.append(BY_KEY[key])
    if PSQL not in chosen:
        chosen.insert(0, PSQL)  # every ratio is to psql: it always runs
    return chosen


def _rounds(contenders: list[Contender], target: Target, env: Environment, repeat: int, warmup: int) -> list[dict]:
    """``repeat`` rounds; round r runs every contender once, starting at a rotated position.

    The warm contenders' services are started, and each stack's zygote warmed by one small untimed
    export, before anything is timed."""
    broken: dict[str, str] = {}
    for contender in contenders:
        if contender.kind == "warm":
            try:
                warm_up(contender, target, env)
            except ContenderFailed as exc:
                print(f"FAILED {contender.key} warm-up at {target.rows} rows: {exc}", file=sys.stderr)
                broken[contender.key] = str(exc)[:2000]
    for _ in range(warmup):
        measure(PSQL, target, env)
    records = []
    for r in range(repeat):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for contender in order:
            try:
                if contender.key in broken:
                    raise ContenderFailed(broken[contender.key])
                record = measure(contender, target, env)
            except ContenderFailed as exc:
                print(f"FAILED {contender.key} at {target.rows} rows: {exc}", file=sys.stderr)
                record = {"contender": contender.key, "failed": str(exc)[:2000]}
            record.update(scale=target.rows, round=r)
            records.append(record)
            print(_progress(record), flush=True)
    return records


def _progress(record: dict[str, Any]) -> str:
    if "failed" in record:
        return f"[{rows_label(record['scale'])} r{record['round']}] {record['contender']:<22} FAILED"
    first = record.get("first_row_seconds")
    return (
        f"[{rows_label(record['scale'])} r{record['round']}] {record['contender']:<22} {record['seconds']:7.2f} s"
        f"  {record['peak_rss'] / 2**20:7.1f} MiB  {record['bytes'] / 2**20:8.1f} MiB out"
        + (f"  first row {first:.2f} s" if first is not None else "")
    )


def _target(database_url: str, tenant: str, rows: int, row_limit: int | None) -> Target:
    import psycopg

    from pulse_exports.catalog import Catalog

    catalog = Catalog.load()
    request = catalog.validate(tenant_id=tenant, export_type="telemetry", row_limit=row_limit)
    with psycopg.connect(database_url) as conn:
        plan = catalog.plan(conn, request)
    return Target(database_url=database_url, tenant=tenant, rows=rows, row_limit=row_limit, query=plan.query)


def _embedded_server(data_dir: Path) -> str:
    from pulse_exports.embedded import EmbeddedPostgres

    return EmbeddedPostgres(data_dir).start()


def _prepare_database(
    server_url: str, given: bool, name: str, *, tenants: int, devices: int, telemetry_rows: int, tenant_rows: int
) -> str:
    """Migrate and seed (unless already seeded at this scale). A given URL is used as it is
    for the main data set; larger scaling data sets get their own database beside it."""
    import psycopg

    from pulse_exports import migrations
    from pulse_exports.demo import ensure_database
    from pulse_exports.sample_data import seed_demo

    url = server_url if given and name == "pulse_bench" else ensure_database(server_url, name)
    migrations.upgrade(url)
    want = (tenants, telemetry_rows, tenant_rows)
    if _seeded_scale(url) != want:
        print(f"seeding {name}: {telemetry_rows} telemetry rows, {tenant_rows} for tenant-001 ...", flush=True)
        # +0.5 row: seed_demo truncates rows * share, and the float share must not round it down.
        share = (tenant_rows + 0.5) / telemetry_rows if tenants > 1 else None
        seeded = seed_demo(url, tenants=tenants, devices=devices, telemetry_rows=telemetry_rows, big_tenant_share=share)
        print(f"seeded in {seeded.seconds:.0f} s", flush=True)
        if _seeded_scale(url) != want:
            raise SystemExit(f"seeding {name} did not give {want} (tenants, telemetry rows, tenant-001 rows)")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM export_jobs WHERE created_by = 'bench' OR created_by IN"
            " (SELECT 'api-key:' || id FROM api_keys WHERE name = %s)",
            (KEY_NAME,),
        )
        conn.execute("DELETE FROM api_keys WHERE name = %s", (KEY_NAME,))
    return url


def _seeded_scale(url: str) -> tuple[int, int, int] | None:
    import psycopg

    with psycopg.connect(url) as conn:
        if not conn.execute("SELECT to_regclass('telemetry') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
            return None
        row = conn.execute(
            "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM telemetry),"
            " (SELECT count(*) FROM telemetry WHERE tenant_id = 'tenant-001')"
        ).fetchone()
    assert row is not None
    return (int(row[0]), int(row[1]), int(row[2]))


def _s3_endpoint(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> tuple[Any, int | None]:
    """The S3 endpoint, and the pid of its server when that runs on this machine (its CPU is measured)."""
    from pulse_exports_tests.servers import S3Endpoint, SeaweedS3

    if args.s3_endpoint:
        return S3Endpoint(args.s3_endpoint, args.s3_access_key, args.s3_secret_key), local_server_pid(args.s3_endpoint)
    shutil.rmtree(workdir / "seaweedfs", ignore_errors=True)
    server = SeaweedS3(workdir / "seaweedfs")
    endpoint = stack.enter_context(server)
    return endpoint, server.pid


def local_server_pid(url: str) -> int | None:
    """The process listening on a loopback URL's port, or None (another host, or not visible to us)."""
    import ipaddress
    from urllib.parse import urlsplit

    import psutil

    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    except psutil.AccessDenied:
        pass
    return None


def _psql() -> Path:
    from pulse_exports.embedded import bin_dir

    return bin_dir() / "psql"


def _machine() -> dict[str, Any]:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "load_before": os.getloadavg()[0],
        "started_at": time.strftime("%Y-%m-%d %H:%M"),
    }
