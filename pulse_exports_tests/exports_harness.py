"""A test harness around one export setup: a seeded database, a real S3 bucket and a Dagster instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg

from pulse_exports.catalog import Catalog
from pulse_exports.definitions import build_definitions
from pulse_exports.jobs import export_job
from pulse_exports.jobstore import ExportJob, JobStore
from pulse_exports.local_runs import LocalRun, run_pending_exports
from pulse_exports.resources import ExportSettings, ExportStorage, PulseDatabase
from pulse_exports.sensors import export_run_failure_sensor
from pulse_exports.storage import ExportStore, PartUpload


class InjectedStorageFault(ConnectionError):
    """Raised by FaultyStore: the storage 'goes away' after a number of uploads."""


class WrappedStore:
    """A real store whose begun uploads finish through ``finish_upload`` (a fault to inject there);
    everything else is the inner store's."""

    def __init__(self, inner: ExportStore) -> None:
        self._inner = inner

    def begin_upload(self, key: str, path: Path, content_type: str | None = None) -> PartUpload:
        upload, store = self._inner.begin_upload(key, path, content_type=content_type), self

        class Wrapped:
            def finish(self) -> None:
                store.finish_upload(key, upload)

            def abort(self) -> None:
                upload.abort()

        return Wrapped()

    def finish_upload(self, key: str, upload: PartUpload) -> None:
        upload.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FaultyStore(WrappedStore):
    """A real store whose uploads (put_file, begun uploads) start failing after ``fail_after`` succeeded."""

    def __init__(self, inner: ExportStore, fail_after: int) -> None:
        super().__init__(inner)
        self._left = fail_after

    def _spend(self) -> None:
        if self._left <= 0:
            raise InjectedStorageFault("injected: connection to the storage endpoint was reset")
        self._left -= 1

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        self._spend()
        self._inner.put_file(key, path, content_type=content_type)

    def finish_upload(self, key: str, upload: PartUpload) -> None:
        try:
            self._spend()
        except InjectedStorageFault:
            upload.abort()
            raise
        upload.finish()


class FaultyExportStorage(ExportStorage):
    fail_after: int = 0

    def get_store(self) -> ExportStore:
        return FaultyStore(super().get_store(), self.fail_after)  # type: ignore[return-value]


class OverwritingStore(WrappedStore):
    """A real store where, right after each part is published, "another run" writes that key again."""

    def finish_upload(self, key: str, upload: PartUpload) -> None:
        upload.finish()
        self._inner.put_bytes(key, b"another run's part")


class OverwritingExportStorage(ExportStorage):
    def get_store(self) -> ExportStore:
        return OverwritingStore(super().get_store())  # type: ignore[return-value]


@dataclass
class ExportHarness:
    database_url: str
    storage: ExportStorage
    instance: dg.DagsterInstance
    settings: ExportSettings = field(default_factory=ExportSettings)

    def __post_init__(self) -> None:
        self.jobs = JobStore(self.database_url)
        self.catalog = Catalog.load()
        self.store = self.storage.get_store()

    @property
    def defs(self) -> dg.Definitions:
        return build_definitions(PulseDatabase(url=self.database_url), self.storage, self.settings)

    def submit(self, **request: Any) -> ExportJob:
        job, created = self.jobs.create(self.catalog.validate(**request), created_by="test")
        assert created
        return job

    def run_sensor_and_runs(self) -> list[LocalRun]:
        return run_pending_exports(self.defs, self.instance)

    def run_purge(self) -> dg.ExecuteInProcessResult:
        return self.defs.get_job_def("purge_job").execute_in_process(instance=self.instance)

    def fail_uploads_after(self, count: int) -> None:
        self.storage = FaultyExportStorage(**self.storage.model_dump(), fail_after=count)

    def overwrite_parts_after_publish(self) -> None:
        self.storage = OverwritingExportStorage(**self.storage.model_dump())

    def simulate_crashed_run(self, request: dg.RunRequest) -> None:
        """A run that dies outside op code: created, then reported failed, then seen by the sensor."""
        run = self.instance.create_run_for_job(job_def=export_job, tags=dict(request.tags))
        event = self.instance.report_run_failed(run, message="run worker process exited unexpectedly")
        context = dg.build_run_status_sensor_context(
            sensor_name=export_run_failure_sensor.name,
            dagster_event=event,
            dagster_instance=self.instance,
            dagster_run=self.instance.get_run_by_id(run.run_id),
            resources={"database": PulseDatabase(url=self.database_url), "storage": self.storage},
        ).for_run_failure()
        export_run_failure_sensor(context)

    def table_counts(self) -> dict[str, int]:
        with psycopg.connect(self.database_url) as conn:
            return {
                t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608 - fixed names
                for t in ("tenants", "device_registry", "device_state", "fleet_alert", "telemetry")
            }

    def job_rows(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url) as conn:
            return conn.execute("SELECT * FROM export_jobs ORDER BY id").fetchall()
