"""Launching and terminating export runs through the Dagster webserver's GraphQL API.

Plain HTTP (httpx) rather than dagster-graphql's client: the product API does not take on
dagster-graphql's exact ``dagster==`` pin. A launch runs ``launchRun`` with the sensor's tags plus
``dagster/partition``; GraphQL launches have no run_key, so duplicate work is prevented by the
atomic claim in ``export_jobs``.

The export's dynamic partition key is offered first with ``addDynamicPartition``, but Dagster 1.13
only accepts that mutation for partitions definitions that assets use, and ``export_job`` is an op
job: the webserver answers UnauthorizedError ("The repository does not contain a dynamic partitions
definition with the given name"). The run works without the key registered (only
``execute_in_process`` validates it), so that refusal is remembered and later launches skip the call.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from pulse_exports.jobs import export_job, export_tags, exports_partitions
from pulse_exports.jobstore import ExportJob

_log = logging.getLogger(__name__)

PARTITION_TAG = "dagster/partition"
# Dagster's refusal of addDynamicPartition for a partitions definition no asset uses
_OP_JOB_REFUSAL = "does not contain a dynamic partitions definition"

_ADD_PARTITION = """
mutation AddExportPartition($repositorySelector: RepositorySelector!, $partitionsDefName: String!,
                            $partitionKey: String!) {
  addDynamicPartition(repositorySelector: $repositorySelector, partitionsDefName: $partitionsDefName,
                      partitionKey: $partitionKey) {
    __typename
    ... on Error { message }
  }
}
"""

_LAUNCH_RUN = """
mutation LaunchExportRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""

_TERMINATE_RUN = """
mutation TerminateExportRun($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunSuccess { run { runId } }
    ... on TerminateRunFailure { message }
    ... on Error { message }
  }
}
"""

_RUN_STATUS = """
query ExportRunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status }
    ... on Error { message }
  }
}
"""


class DagsterUnavailable(Exception):
    """The webserver could not be reached or did not answer GraphQL."""


class LaunchRefused(Exception):
    """The webserver answered, but with an error result (unknown job, bad config, Python error)."""


class DagsterLauncher:
    """Launches, terminates and looks up export runs through ``graphql_url`` (``.../graphql``)."""

    def __init__(
        self,
        graphql_url: str,
        *,
        location_name: str = "pulse_exports",
        repository_name: str = "__repository__",
        timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.graphql_url = graphql_url
        self.location_name = location_name
        self.repository_name = repository_name
        self._http = httpx.Client(timeout=timeout, transport=transport)
        self._partitions_through_graphql = True  # until Dagster refuses it for this op job (see above)

    def close(self) -> None:
        self._http.close()

    def _call(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self._http.post(self.graphql_url, json={"query": query, "variables": variables or {}})
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise DagsterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if body.get("errors"):
            raise DagsterUnavailable(f"GraphQL errors: {body['errors'][0].get('message')}")
        return dict(body["data"])

    def launch(self, job: ExportJob) -> str:
        """Register the export's partition and launch its run; returns the run id."""
        key = str(job.id)
        repository = {"repositoryLocationName": self.location_name, "repositoryName": self.repository_name}
        if self._partitions_through_graphql:
            added = self._call(
                _ADD_PARTITION,
                {"repositorySelector": repository, "partitionsDefName": exports_partitions.name, "partitionKey": key},
            )["addDynamicPartition"]
            if _OP_JOB_REFUSAL in (added.get("message") or ""):
                self._partitions_through_graphql = False
            elif added["__typename"] not in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"):
                raise LaunchRefused(f"addDynamicPartition: {added['__typename']}: {added.get('message')}")
        tags = {**export_tags(job), PARTITION_TAG: key}
        params = {
            "selector": {**repository, "jobName": export_job.name},
            "runConfigData": {},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        result = self._call(_LAUNCH_RUN, {"executionParams": params})["launchRun"]
        if result["__typename"] == "LaunchRunSuccess":
            return str(result["run"]["runId"])
        detail = result.get("message") or "; ".join(e["message"] for e in result.get("errors", []))
        raise LaunchRefused(f"launchRun: {result['__typename']}: {detail}")

    def terminate(self, run_id: str) -> bool:
        """Ask Dagster to terminate a run; False when it cannot (already finished, unknown)."""
        result = self._call(_TERMINATE_RUN, {"runId": run_id})["terminateRun"]
        if result["__typename"] != "TerminateRunSuccess":
            _log.info("run %s not terminated: %s: %s", run_id, result["__typename"], result.get("message"))
            return False
        return True

    def run_status(self, run_id: str) -> str | None:
        """The run's status (QUEUED, STARTED, SUCCESS, CANCELED, ...), or None for an unknown run."""
        result = self._call(_RUN_STATUS, {"runId": run_id})["runOrError"]
        return str(result["status"]) if result["__typename"] == "Run" else None

    def version(self) -> str:
        """Dagster's version: a cheap reachability probe."""
        return str(self._call("{ version }")["version"])
