"""deploy/: every instance config names real classes with valid config, and the Helm values agree with the code."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import ConcurrencyConfig
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher import RunLauncher
from dagster._core.run_coordinator import QueuedRunCoordinator, RunCoordinator
from dagster._core.storage.compute_log_manager import ComputeLogManager
from dagster._core.storage.event_log import EventLogStorage
from dagster._core.storage.runs import RunStorage
from dagster._core.storage.schedules import ScheduleStorage
from dagster._serdes.config_class import ConfigurableClass, ConfigurableClassData

from pulse_exports.jobs import TAG_TENANT
from pulse_exports_tests.test_compose import (
    ENV_READ_BY_CODE,
    PACKAGE,
    PULSE_SERVICES,
    REPO,
    _env,
    _env_references,
    _env_required_by_package,
    _parse,
)

DEPLOY = REPO / "deploy"
# Every Dagster instance file of the repo: the production profile and one per deploy/ target.
INSTANCE_FILES = sorted([REPO / "dagster.yaml", *DEPLOY.rglob("dagster.yaml")])
HELM_VALUES = DEPLOY / "k8s" / "values.yaml"
DOCKER_INSTANCE = DEPLOY / "docker" / "dagster.yaml"
DOCKER_OVERRIDE = DEPLOY / "docker" / "compose.docker-launcher.yml"
ECS_INSTANCE = DEPLOY / "ecs" / "dagster.yaml"
DEPLOY_DOCKERFILE = DEPLOY / "Dockerfile"

# Packages of the `deploy` extra: without them the checks of their classes skip instead of failing.
DEPLOY_EXTRA = {"dagster_k8s": "dagster-k8s", "dagster_docker": "dagster-docker"}
# The Dagster base class each instance-config key must name a subclass of.
KIND_OF = {
    "run_launcher": RunLauncher,
    "run_coordinator": RunCoordinator,
    "compute_logs": ComputeLogManager,
    "run_storage": RunStorage,
    "event_log_storage": EventLogStorage,
    "schedule_storage": ScheduleStorage,
}
# Fargate's valid memory (MiB) for each CPU size (CPU units) that fits one export.
FARGATE_MEMORY = {
    512: range(1024, 4096 + 1, 1024),
    1024: range(2048, 8192 + 1, 1024),
    2048: range(4096, 16384 + 1, 1024),
}
LOCATION_NAME = "pulse_exports"
# Set by every image (ENV in the Dockerfiles) and by the Helm chart, never passed per run.
FROM_THE_IMAGE = {"DAGSTER_HOME"}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _set_env_references(config: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Give every `{env: NAME}` the file reads a value of the right shape (ports are IntSource)."""
    for name in _env_references(config):
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else f"placeholder-{name.lower()}")


def _configured_classes(node: object, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """(path, {module, class, config}) of every configurable class the file names, at any depth."""
    if isinstance(node, dict):
        if {"module", "class"} <= set(node):
            yield path, node
        for key, value in node.items():
            yield from _configured_classes(value, (*path, str(key)))


def _import_class(module: str, name: str) -> type:
    package = module.split(".")[0]
    if package in DEPLOY_EXTRA:
        pytest.importorskip(
            package, reason=f"{DEPLOY_EXTRA[package]} comes with the deploy extra: pip install -e '.[deploy]'"
        )
    return getattr(importlib.import_module(module), name)


def _validated_config(klass: type, config: object) -> dict[str, Any]:
    """The class's config processed by its own config_type(), env sources resolved; fails on any error."""
    assert issubclass(klass, ConfigurableClass), f"{klass} is not a Dagster configurable class"
    result = process_config(resolve_to_config_type(klass.config_type()), config or {})
    assert result.success, f"{klass.__module__}.{klass.__name__}: {[error.message for error in result.errors]}"
    return dict(result.value)


def _instance_ref(path: Path, tmp_path: Path) -> InstanceRef:
    """The file loaded as a Dagster process loads DAGSTER_HOME/dagster.yaml (raises on schema errors)."""
    return InstanceRef.from_dir(str(tmp_path), config_dir=str(path.parent), config_filename=path.name)


def _class_params() -> Iterator[Any]:
    for path in INSTANCE_FILES:
        for key_path, node in _configured_classes(_load(path)):
            yield pytest.param(path, key_path, node, id=f"{_rel(path)}:{'.'.join(key_path)}")


# --- every instance file --------------------------------------------------------------------------


@pytest.mark.parametrize("path", INSTANCE_FILES, ids=_rel)
def test_instance_file_matches_dagsters_instance_schema_and_its_storage_config(path, monkeypatch, tmp_path):
    _set_env_references(_load(path), monkeypatch)
    ref = _instance_ref(path, tmp_path)
    storage = ref.storage_data
    _validated_config(_import_class(storage.module_name, storage.class_name), storage.config_dict)


@pytest.mark.parametrize(("path", "key_path", "node"), list(_class_params()))
def test_configured_class_exists_and_accepts_its_config(path, key_path, node, monkeypatch):
    _set_env_references(node, monkeypatch)
    klass = _import_class(node["module"], node["class"])
    if kind := KIND_OF.get(key_path[-1]):
        assert issubclass(klass, kind), f"{key_path[-1]} names {klass}, not a {kind.__name__}"
    _validated_config(klass, node.get("config"))


def _run_policy(settings: dict[str, Any], run_coordinator: ConfigurableClassData) -> dict[str, Any]:
    """The run queue, monitoring, retry and telemetry settings of one instance config, resolved."""
    coordinator = run_coordinator.rehydrate(as_type=QueuedRunCoordinator)
    queue = ConcurrencyConfig.from_concurrency_settings(
        settings.get("concurrency", {}), coordinator.get_run_queue_config()
    ).run_queue_config
    assert queue is not None
    return {
        "queue": queue,
        "monitoring": settings.get("run_monitoring", {}),
        "retries": settings.get("run_retries", {}),
        "telemetry": settings.get("telemetry", {}),
    }


def _assert_export_run_policy(policy: dict[str, Any]) -> None:
    """What issue 5 asks of every deployment: tenant fairness, monitored runs, crash-only retries."""
    queue = policy["queue"]
    assert 0 < queue.max_concurrent_runs < 1000, "a global cap on concurrent export runs"
    assert {"key": TAG_TENANT, "value": {"applyLimitPerUniqueValue": True}, "limit": 2} in queue.tag_concurrency_limits
    monitoring = policy["monitoring"]
    assert monitoring.get("enabled") is True
    assert monitoring.get("start_timeout_seconds", 0) > 0
    # resuming re-enters a half-written export under the same run id; a retry is a new run that claims it
    assert monitoring.get("max_resume_run_attempts", 0) == 0
    retries = policy["retries"]
    assert retries.get("enabled") is True and retries.get("max_retries", 0) >= 1
    assert retries.get("retry_on_asset_or_op_failure") is False
    assert policy["telemetry"] == {"enabled": False}


@pytest.mark.parametrize("path", INSTANCE_FILES, ids=_rel)
def test_instance_file_queues_per_tenant_monitors_and_retries_only_crashed_runs(path, monkeypatch, tmp_path):
    _set_env_references(_load(path), monkeypatch)
    ref = _instance_ref(path, tmp_path)
    _assert_export_run_policy(_run_policy(ref.settings, ref.run_coordinator_data))


# --- Docker run launcher --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(REPO / "docker-compose.yml")


@pytest.fixture(scope="module")
def override() -> dict[str, Any]:
    return _load(DOCKER_OVERRIDE)


def _docker_launcher() -> dict[str, Any]:
    launcher = _load(DOCKER_INSTANCE)["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    return launcher["config"]


def test_docker_launcher_starts_the_deploy_image_on_the_compose_network_and_storage_volume(compose, override):
    config = _docker_launcher()
    project = compose["name"]
    assert config["network"] == f"{project}_default"
    assert {service["image"] for service in override["services"].values()} == {config["image"]}
    # the webserver reads the compute logs the run containers write, from the same named volume
    storage_mounts = {m for m in compose["services"]["dagster-daemon"]["volumes"] if m.startswith("dagster-storage:")}
    assert storage_mounts, "docker-compose.yml's daemon mounts the dagster-storage volume"
    expected = {f"{project}_{mount}" for mount in storage_mounts}
    assert expected <= set(config["container_kwargs"]["volumes"])
    assert "dagster-storage" in compose["volumes"]


def test_docker_launcher_config_passes_the_launchers_own_checks():
    _import_class("dagster_docker", "DockerRunLauncher")
    from dagster_docker.utils import validate_docker_config, validate_docker_image

    config = _docker_launcher()
    validate_docker_config(config.get("network"), config.get("networks"), config.get("container_kwargs"))
    validate_docker_image(config["image"])


def test_docker_run_containers_get_every_variable_the_code_and_instance_need_from_the_daemon(compose):
    names = [entry.partition("=")[0] for entry in _docker_launcher()["env_vars"]]
    passed_through = {entry for entry in _docker_launcher()["env_vars"] if "=" not in entry}
    daemon = _env(compose["services"]["dagster-daemon"])
    # a pass-through name unset in the daemon's environment fails every launch
    missing = sorted(name for name in passed_through if not daemon.get(name))
    assert not missing, f"the daemon's environment lacks {missing}"
    needed = ENV_READ_BY_CODE | _env_required_by_package() | set(_env_references(_load(DOCKER_INSTANCE)))
    assert needed - FROM_THE_IMAGE <= set(names), (
        f"run containers would lack {sorted(needed - FROM_THE_IMAGE - set(names))}"
    )
    assert FROM_THE_IMAGE <= set(_dockerfile_env(DEPLOY_DOCKERFILE))


def test_compose_override_runs_every_pulse_service_from_the_deploy_image(compose, override):
    services = override["services"]
    assert set(services) == set(PULSE_SERVICES)
    assert set(services) <= set(compose["services"])
    for name, service in services.items():
        assert (REPO / service["build"]["context"]).resolve() == REPO, name
        assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DEPLOY_DOCKERFILE


def test_compose_override_gives_the_daemon_and_webserver_the_docker_socket(override):
    for name in ("dagster-daemon", "dagster-webserver"):
        service = override["services"][name]
        assert "/var/run/docker.sock:/var/run/docker.sock" in service["volumes"], name
        assert service.get("group_add"), f"{name} runs as a non-root user and needs the socket's group"
    for name in ("dagster-code", "migrate", "api"):
        assert "volumes" not in override["services"][name], f"{name} has no business with the Docker engine"


# --- deploy/Dockerfile ----------------------------------------------------------------------------


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions with continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in _instructions(path):
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
    return env


def test_deploy_dockerfile_is_the_repo_image_plus_the_deploy_extra_and_a_chosen_instance_config():
    main = _instructions(REPO / "Dockerfile")
    expected = []
    for line in main:
        if re.fullmatch(r"RUN pip install \.", line):
            line = 'RUN pip install ".[deploy]"'
        elif line.startswith("COPY dagster.yaml "):
            line = line.replace("COPY dagster.yaml ", "COPY ${INSTANCE_CONFIG} ", 1)
        expected.append(line)
        if line.startswith("FROM "):
            expected.append("ARG INSTANCE_CONFIG=deploy/docker/dagster.yaml")
    assert _instructions(DEPLOY_DOCKERFILE) == expected, (
        "deploy/Dockerfile is ../Dockerfile with the deploy extra and INSTANCE_CONFIG: update it along with it"
    )
    assert (REPO / "deploy/docker/dagster.yaml").is_file()


def test_deploy_extra_follows_the_dagster_integration_line_of_the_dependencies():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python 3.11+")
    import tomllib

    def specifiers(requirements: list[str]) -> dict[str, str]:
        return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", req).groups() for req in requirements)

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = specifiers(project["dependencies"])
    deploy = specifiers(project["optional-dependencies"]["deploy"])
    assert set(deploy) == set(DEPLOY_EXTRA.values())
    # the integrations pin dagster exactly; the same 0.x range as dagster-aws lets pip pick the matching release
    assert set(deploy.values()) == {specs["dagster-aws"]}


# --- ECS run launcher -----------------------------------------------------------------------------


def _readme_section(heading: str) -> str:
    text = (DEPLOY / "README.md").read_text()
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_ecs_run_tasks_get_credentials_from_secrets_manager_and_the_rest_from_the_daemon_task():
    config = _load(ECS_INSTANCE)["run_launcher"]["config"]
    assert config["use_current_ecs_task_config"] is True
    # appended to the environment the run task inherits from the daemon's container: duplicate names
    assert "env_vars" not in config
    secret = {entry["name"] for entry in config["secrets"]}
    assert {"PULSE_DATABASE_URL", "DAGSTER_PG_PASSWORD"} <= secret, "credentials come from Secrets Manager"
    assert config.get("secrets_tag", "dagster") is None, "only the listed secrets reach run tasks"
    arns = {entry["valueFrom"]["env"] for entry in config["secrets"]}
    needed = _env_required_by_package() | set(_env_references(_load(ECS_INSTANCE)))
    inherited = (needed - secret - FROM_THE_IMAGE) | arns
    section = _readme_section("Amazon ECS")
    undocumented = sorted(name for name in inherited if f"`{name}`" not in section)
    assert not undocumented, f"deploy/README.md does not tell the daemon task to carry {undocumented}"
    assert "AWS_ACCESS_KEY_ID" not in section, "S3 access is the task role's"


def test_ecs_run_tasks_are_one_fargate_size_and_carry_the_tenant_tag():
    config = _load(ECS_INSTANCE)["run_launcher"]["config"]
    cpu, memory = int(config["run_resources"]["cpu"]), int(config["run_resources"]["memory"])
    assert memory in FARGATE_MEMORY[cpu], f"{cpu} CPU units / {memory} MiB is not a Fargate size"
    assert TAG_TENANT in config["propagate_tags"]["allow_list"]


# --- Helm chart values ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return _load(HELM_VALUES)


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    """deploy/k8s/secret.example.yaml: Secret name -> its keys and placeholder values."""
    documents = yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text())
    return {doc["metadata"]["name"]: doc["stringData"] for doc in documents if doc and doc["kind"] == "Secret"}


def _user_deployment(values: dict[str, Any]) -> dict[str, Any]:
    user = values["dagster-user-deployments"]
    assert user["enabled"] and user["enableSubchart"]
    (deployment,) = user["deployments"]
    return deployment


def _image(deployment: dict[str, Any]) -> str:
    return f"{deployment['image']['repository']}:{deployment['image']['tag']}"


def _string_constants() -> set[str]:
    """Every string literal in pulse_exports: the names its code can read."""
    return {
        node.value
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_helm_values_launch_runs_with_the_k8s_run_launcher_sized_for_one_export(values):
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    resources = values["runLauncher"]["config"]["k8sRunLauncher"]["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert resources["limits"]["memory"] == resources["requests"]["memory"], "memory is not overcommitted"
    # the chart copies a user deployment's resources into its run pods, over the launcher's
    assert "resources" not in _user_deployment(values)


def test_helm_user_deployment_serves_pulse_exports_definitions_under_the_location_name_the_api_uses(values):
    from pulse_exports.api.settings import ApiSettings

    deployment = _user_deployment(values)
    argv = ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", str(deployment["port"])]
    argv += deployment["codeServerArgs"]
    params = _parse(argv).params  # the same parse as the real `dagster code-server start`
    assert params["module_name"] == "pulse_exports.definitions"
    assert importlib.util.find_spec("pulse_exports.definitions") is not None
    (server,) = values["dagsterWebserver"]["workspace"]["servers"]
    assert (server["host"], server["port"]) == (deployment["name"], deployment["port"])
    assert server["name"] == params["location_name"] == LOCATION_NAME
    assert ApiSettings.model_fields["dagster_location_name"].default == LOCATION_NAME


def test_helm_env_secret_carries_what_the_code_reads_to_the_code_server_and_every_run_pod(values, secrets):
    deployment = _user_deployment(values)
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    names = {ref["name"] for ref in deployment["envSecrets"]}
    names |= {ref["name"] for ref in values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]}
    assert names <= set(secrets), f"no example for {sorted(names - set(secrets))}"
    keys = {key for name in names for key in secrets[name]}
    assert _env_required_by_package() - FROM_THE_IMAGE <= keys  # the chart sets DAGSTER_HOME (global.dagsterHome)
    read_by_code = _string_constants() | ENV_READ_BY_CODE
    unread = sorted(key for key in keys if key not in read_by_code and not key.startswith("AWS_"))
    assert not unread, f"the code reads no {unread}"


def test_helm_dagster_storage_is_an_external_postgres_with_the_password_in_a_secret(values, secrets):
    postgresql = values["postgresql"]
    assert postgresql["enabled"] is False and postgresql["postgresqlHost"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresql-password" in secrets[values["global"]["postgresqlSecretName"]]
    assert values["global"]["dagsterHome"] == _dockerfile_env(DEPLOY_DOCKERFILE)["DAGSTER_HOME"]


def test_helm_migration_job_runs_the_cli_upgrade_from_the_user_deployment_image(values, secrets, monkeypatch):
    job = _load(DEPLOY / "k8s" / "migrate-job.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == _image(_user_deployment(values))
    assert container["command"] == ["pulse-exports", "db", "upgrade"]
    env_from = {ref["secretRef"]["name"] for ref in container["envFrom"]}
    assert env_from == {ref["name"] for ref in _user_deployment(values)["envSecrets"]}
    for name in env_from:  # the CLI's options read the Secret's variables (`envvar=`)
        for key, value in secrets[name].items():
            monkeypatch.setenv(key, value)
    _parse(container["command"])


def _chart_instance(values: dict[str, Any]) -> dict[str, Any]:
    """The part of dagster.yaml the chart's configmap-instance.yaml renders from these values.

    Transcribed from helm/dagster/templates (configmap-instance.yaml, helpers/_dagster_yaml.tpl) for
    the keys used here; a key this does not know fails the test rather than being skipped.
    """
    launcher = dict(values["runLauncher"]["config"]["k8sRunLauncher"])
    known = {"imagePullPolicy", "loadInclusterConfig", "envSecrets", "envVars", "resources", "labels"}
    assert set(launcher) <= known, f"teach _chart_instance {sorted(set(launcher) - known)}"
    postgresql = values["postgresql"]
    postgres_db = {
        "username": postgresql["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": postgresql["postgresqlHost"],
        "db_name": postgresql["postgresqlDatabase"],
        "port": postgresql["service"]["port"],
        **({"scheme": scheme} if (scheme := postgresql.get("postgresqlScheme")) else {}),
    }
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    retries = values["dagsterDaemon"]["runRetries"]
    return {
        **{
            key: {"module": f"dagster_postgres.{module}", "class": cls, "config": {"postgres_db": postgres_db}}
            for key, module, cls in (
                ("run_storage", "run_storage", "PostgresRunStorage"),
                ("event_log_storage", "event_log", "PostgresEventLogStorage"),
                ("schedule_storage", "schedule_storage", "PostgresScheduleStorage"),
            )
        },
        "run_launcher": {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": {
                "load_incluster_config": launcher["loadInclusterConfig"],
                "job_namespace": "pulse",
                "image_pull_policy": launcher["imagePullPolicy"],
                "service_account_name": "pulse-dagster-user-deployments",
                "dagster_home": {"env": "DAGSTER_HOME"},
                "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
                "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
                "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}],
                "env_secrets": [ref["name"] for ref in launcher.get("envSecrets", [])],
                **({"env_vars": launcher["envVars"]} if launcher.get("envVars") else {}),
                **({"labels": launcher["labels"]} if launcher.get("labels") else {}),
                **({"resources": launcher["resources"]} if launcher.get("resources") else {}),
            },
        },
        # the chart's templates have written `dagster.core.run_coordinator`, which 1.13 no longer has; the
        # 1.13 chart's own path is not checked here, only the config rendered under it
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": queued["maxConcurrentRuns"],
                "tag_concurrency_limits": queued["tagConcurrencyLimits"],
            },
        },
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            **({"max_resume_run_attempts": n} if (n := monitoring.get("maxResumeRunAttempts")) else {}),
        },
        "run_retries": {
            "enabled": retries["enabled"],
            "max_retries": retries["maxRetries"],
            "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"],
        },
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


@pytest.fixture
def chart_instance_file(values, tmp_path, monkeypatch) -> Path:
    """The rendered instance config as the chart's pods see it, with the env the chart gives them."""
    instance = _chart_instance(values)
    _set_env_references(instance, monkeypatch)
    path = tmp_path / "dagster.yaml"
    path.write_text(yaml.safe_dump(instance))
    return path


def test_helm_values_render_an_instance_config_dagster_accepts_with_the_same_run_policy(chart_instance_file, tmp_path):
    ref = _instance_ref(chart_instance_file, tmp_path)
    _assert_export_run_policy(_run_policy(ref.settings, ref.run_coordinator_data))


def test_helm_values_render_valid_config_for_every_class_they_name(chart_instance_file):
    nodes = list(_configured_classes(_load(chart_instance_file)))
    # the classes of the deploy extra last: without it, the others are still checked before the skip
    nodes.sort(key=lambda item: item[1]["module"].split(".")[0] in DEPLOY_EXTRA)
    for key_path, node in nodes:
        klass = _import_class(node["module"], node["class"])
        assert issubclass(klass, KIND_OF[key_path[-1]]), key_path
        _validated_config(klass, node["config"])


def test_every_deployment_logs_runs_as_json_like_the_root_dagster_yaml(values):
    python_logs = _load(REPO / "dagster.yaml")["python_logs"]
    formatter = python_logs["dagster_handler_config"]["formatters"]["pulse"]["()"]
    assert callable(getattr(importlib.import_module(formatter.rsplit(".", 1)[0]), formatter.rsplit(".", 1)[1]))
    for path in (DEPLOY / "docker" / "dagster.yaml", DEPLOY / "ecs" / "dagster.yaml"):
        assert _load(path)["python_logs"] == python_logs, path
    helm = values["pythonLogs"]
    assert (helm["pythonLogLevel"], helm["managedPythonLoggers"], helm["dagsterHandlerConfig"]) == (
        python_logs["python_log_level"],
        python_logs["managed_python_loggers"],
        python_logs["dagster_handler_config"],
    )
