"""The purge job and its hourly schedule."""

import dagster as dg

from pulse_exports.jobs import exports_partitions
from pulse_exports.purge import purge_expired
from pulse_exports.resources import ExportStorage, PulseDatabase


@dg.op(description="Delete expired exports' files, mark them EXPIRED and drop their partitions.")
def purge_expired_exports(context: dg.OpExecutionContext, database: PulseDatabase, storage: ExportStorage) -> None:
    instance = context.instance

    def forget_partition(export_id: str) -> None:
        if instance.has_dynamic_partition(exports_partitions.name, export_id):
            instance.delete_dynamic_partition(exports_partitions.name, export_id)

    result = purge_expired(database.jobs(), storage.get_store(), on_expired=forget_partition)
    context.log.info(f"purged {len(result.expired)} exports ({result.objects_deleted} objects)")
    context.add_output_metadata(
        {"expired": dg.MetadataValue.int(len(result.expired)), "objects": dg.MetadataValue.int(result.objects_deleted)}
    )


@dg.job(executor_def=dg.in_process_executor, description="Purge expired export artifacts.")
def purge_job() -> None:
    purge_expired_exports()


purge_schedule = dg.ScheduleDefinition(
    job=purge_job,
    cron_schedule="0 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly: delete the files of expired exports (rows stay, EXPIRED).",
)
