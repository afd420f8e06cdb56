"""docker-compose.yml, Dockerfile, dagster.yaml and the workspace files agree with each other and the code."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml
from dagster import DefaultRunLauncher, QueuedRunCoordinator
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import ConcurrencyConfig
from dagster._core.instance.ref import InstanceRef
from dagster._core.workspace.config_schema import process_workspace_config
from dagster._serdes.config_class import ConfigurableClassData

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pulse_exports"

# The console scripts that compose commands and healthchecks run, and the click object behind each.
CLIS = {
    "pulse-exports": ("pulse_exports.cli", "main"),
    "dagster": ("dagster._cli", "cli"),
    "dagster-webserver": ("dagster_webserver.cli", "cli"),
}
DAGSTER_CLIS = ("dagster", "dagster-webserver")
PULSE_SERVICES = ("migrate", "dagster-code", "dagster-webserver", "dagster-daemon", "api")
DAGSTER_SERVICES = ("dagster-code", "dagster-webserver", "dagster-daemon")
# Read by the settings and resources of the code location, whatever definitions.py calls them.
ENV_READ_BY_CODE = {
    "PULSE_DATABASE_URL",
    "PULSE_STORAGE_URL",
    "PULSE_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "DAGSTER_HOME",
}
LOCATION_NAME = "pulse_exports"

_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: object) -> str:
    """A compose value as `docker compose up` sees it with no .env file: defaults applied, $$ -> $."""
    text = str(value).replace("$$", "\0")
    return _COMPOSE_VARIABLE.sub(lambda m: m.group(2) or "", text).replace("\0", "$")


# --- parsed files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):  # the `- NAME=value` form
        environment = dict(item.partition("=")[::2] for item in environment)
    return {name: _interpolate(value) for name, value in environment.items()}


def _published_ports(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port, from short (`[ip:]host:container`) or long port syntax."""
    published: dict[int, int] = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published[int(port["target"])] = int(port["published"])
        else:
            *_, host, container = str(port).split("/")[0].split(":")
            published[int(container)] = int(host)
    return published


def _argv(command: object) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _commands(services: dict[str, dict[str, Any]]) -> Iterator[tuple[str, list[str]]]:
    """(service, argv) of every service command and exec-form healthcheck."""
    for name, service in services.items():
        if "command" in service:
            yield name, _argv(service["command"])
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[0] == "CMD":
            yield name, test[1:]
        elif isinstance(test, list) and test[0] == "CMD-SHELL":
            yield name, shlex.split(test[1])


def _option(argv: list[str], *names: str) -> str | None:
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in names:
            return value
    return None


class Dockerfile:
    """The few Dockerfile instructions the deployment relies on (no multi-stage, no ARG)."""

    def __init__(self, text: str) -> None:
        self.from_images: list[str] = []
        self.runs: list[str] = []
        self.env: dict[str, str] = {}
        self.workdir = "/"
        self.copies: list[tuple[str, PurePosixPath]] = []  # (repo source, image destination)
        for line in re.sub(r"\\\n", " ", text).splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            instruction, _, rest = line.strip().partition(" ")
            instruction = instruction.upper()
            if instruction == "FROM":
                self.from_images.append(rest.split()[0])
            elif instruction == "RUN":
                self.runs.append(rest)
            elif instruction == "WORKDIR":
                self.workdir = str(PurePosixPath(self.workdir, self._expand(rest)))
            elif instruction == "ENV":
                tokens = shlex.split(rest)
                if "=" in tokens[0]:
                    self.env.update(token.split("=", 1) for token in tokens)
                else:  # legacy `ENV KEY value`
                    self.env[tokens[0]] = " ".join(tokens[1:])
            elif instruction == "COPY":
                *sources, dest = [t for t in shlex.split(rest) if not t.startswith("--")]
                expanded = self._expand(dest)
                target = PurePosixPath(self.workdir, expanded)
                # a trailing slash (or several sources) makes the destination a directory
                is_dir = expanded.endswith("/") or len(sources) > 1
                self.copies.extend(
                    (source.rstrip("/"), target / PurePosixPath(source).name if is_dir else target)
                    for source in sources
                )

    def _expand(self, value: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.env.get(m.group(1), ""), value)

    def image_path(self, repo_relative: str) -> PurePosixPath | None:
        """Where a repo file lands in the image, if some COPY puts it there."""
        for source, dest in self.copies:
            if repo_relative == source:
                return dest
            if repo_relative.startswith(source + "/"):
                return dest / repo_relative[len(source) + 1 :]
        return None

    def repo_path(self, image_path: str) -> Path | None:
        """The repo file an image path was copied from, if some COPY put it there."""
        path = PurePosixPath(image_path)
        for source, dest in self.copies:
            if path == dest:
                return REPO / source
            if path.is_relative_to(dest):
                return REPO / source / path.relative_to(dest)
        return None


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile((REPO / "Dockerfile").read_text())


def _dagster_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "dagster.yaml").read_text())


def _env_references(node: object) -> Iterator[str]:
    """Names in dagster.yaml's `{env: NAME}` config sources."""
    if isinstance(node, dict):
        if set(node) == {"env"}:
            yield node["env"]
        else:
            for value in node.values():
                yield from _env_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_references(value)


def _env_required_by_package() -> set[str]:
    """`EnvVar("X")` (fails at run time when unset) and `os.environ["X"]` reads in pulse_exports."""

    def dotted(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"{dotted(node.value)}.{node.attr}"
        return node.id if isinstance(node, ast.Name) else ""

    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and node.args:
                first, function = node.args[0], dotted(node.func)
                is_env_var = function.endswith(("EnvVar", "EnvVar.int"))
                if is_env_var and isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names.add(first.value)
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
                key = node.slice
                if dotted(node.value) in {"os.environ", "environ"} and isinstance(key, ast.Constant):
                    names.add(str(key.value))
    return names


# --- compose: services, ports, wiring --------------------------------------------------------------


def test_services_run_the_expected_images_or_the_project_build(services):
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert services["minio-init"]["image"].startswith("minio/mc:RELEASE.")
    for name in PULSE_SERVICES:
        assert services[name].get("build") == ".", name
        assert "image" not in services[name], name


def test_postgres_minio_and_webserver_publish_their_ports_and_the_code_server_stays_internal(services):
    assert _published_ports(services["postgres"])[5432] == 5432
    assert _published_ports(services["minio"])[9000] == 9000
    assert _published_ports(services["dagster-webserver"])[3000] == 3000
    assert _published_ports(services["api"])[8000] == 8000
    assert _published_ports(services["dagster-code"]) == {}
    assert "4000" in [str(port) for port in services["dagster-code"].get("expose", [])]


def test_pulse_services_get_every_env_var_the_code_and_dagster_yaml_read(services):
    dagster_yaml_env = set(_env_references(_dagster_yaml()))
    assert {name for name in dagster_yaml_env if name.startswith("DAGSTER_PG_")} == {
        "DAGSTER_PG_USER",
        "DAGSTER_PG_PASSWORD",
        "DAGSTER_PG_HOST",
        "DAGSTER_PG_DB",
        "DAGSTER_PG_PORT",
    }
    required = ENV_READ_BY_CODE | dagster_yaml_env | _env_required_by_package()
    for name in PULSE_SERVICES:
        env = _env(services[name])
        missing = sorted(var for var in required if not env.get(var))
        assert not missing, f"{name} lacks {missing}"


def test_database_url_and_dagster_pg_vars_name_the_postgres_service_and_its_credentials(services):
    postgres = _env(services["postgres"])
    for name in PULSE_SERVICES:
        env = _env(services[name])
        url = urlparse(env["PULSE_DATABASE_URL"])
        assert url.scheme.startswith("postgres")
        assert (url.hostname, url.port or 5432) == ("postgres", 5432)
        assert (url.username, url.password, url.path.lstrip("/")) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"],
        )
        assert (env["DAGSTER_PG_HOST"], env["DAGSTER_PG_PORT"]) == ("postgres", "5432")
        assert (env["DAGSTER_PG_USER"], env["DAGSTER_PG_PASSWORD"], env["DAGSTER_PG_DB"]) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"],
        )


def test_storage_url_bucket_is_the_bucket_minio_init_creates_on_the_minio_service(services):
    script = "\n".join(
        _argv(services["minio-init"].get("entrypoint", [])) + _argv(services["minio-init"].get("command", []))
    )
    alias = re.search(r"mc alias set (\S+) (\S+)", script)
    bucket = re.search(r"mc mb (?:--\S+ )*([^/\s]+)/([^/\s]+)", script)
    assert alias and bucket, script
    assert bucket.group(1) == alias.group(1)
    assert urlparse(alias.group(2)).netloc == "minio:9000"
    for name in PULSE_SERVICES:
        storage = urlparse(_env(services[name])["PULSE_STORAGE_URL"])
        assert (storage.scheme, storage.netloc) == ("s3", bucket.group(2)), name


def test_s3_endpoint_and_credentials_are_the_minio_service_and_its_root_user(services):
    minio = _env(services["minio"])
    assert "--address" not in _argv(services["minio"]["command"])  # so the S3 API is on MinIO's :9000
    assert _env(services["minio-init"]) == minio
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses to start otherwise
    for name in PULSE_SERVICES:
        env = _env(services[name])
        endpoint = urlparse(env["PULSE_S3_ENDPOINT_URL"])
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", 9000), name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio["MINIO_ROOT_USER"],
            minio["MINIO_ROOT_PASSWORD"],
        )


def test_services_wait_for_the_database_migration_and_the_bucket(services):
    def depends_on(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name].get("depends_on", {}).items()}

    assert depends_on("migrate")["postgres"] == "service_healthy"
    assert depends_on("minio-init")["minio"] == "service_healthy"
    for name in (*DAGSTER_SERVICES, "api"):
        assert depends_on(name)["migrate"] == "service_completed_successfully", name
        assert depends_on(name)["minio-init"] == "service_completed_successfully", name
    for name in services:
        for dependency, condition in depends_on(name).items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}'s healthcheck"


# --- commands --------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> click.Context:
    """Resolve argv through the console script's click groups and parse the leaf command's options."""
    module_name, attribute = CLIS[argv[0]]
    command: click.Command = getattr(importlib.import_module(module_name), attribute)
    ctx = click.Context(command, info_name=argv[0])
    args = argv[1:]
    while isinstance(command, click.Group):
        assert args and not args[0].startswith("-"), f"{shlex.join(argv)} stops at group {ctx.command_path}"
        name, args = args[0], args[1:]
        subcommand = command.get_command(ctx, name)
        assert subcommand is not None, f"{shlex.join(argv)}: no {name!r} under {ctx.command_path}"
        command = subcommand
        ctx = click.Context(command, info_name=name, parent=ctx)
    return command.make_context(ctx.info_name, args, parent=ctx.parent)


def _in_repo(argv: list[str], dockerfile: Dockerfile) -> list[str]:
    """argv with image paths replaced by the repo files they are copied from."""
    return [str(dockerfile.repo_path(arg) or arg) if arg.startswith("/") else arg for arg in argv]


def _parse_in_service(service: dict[str, Any], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse argv with the service's environment, which fills options declared with `envvar=`."""
    with monkeypatch.context() as patch:
        for name, value in _env(service).items():
            patch.setenv(name, value)
        _parse(argv)


def _takes_workspace(argv: list[str]) -> bool:
    """The commands that load the code location from a workspace file: webserver and daemon."""
    return argv[0] == "dagster-webserver" or argv[:2] == ["pulse-exports", "daemon"]


def test_pulse_exports_commands_name_real_cli_subcommands_and_get_their_options(services, dockerfile, monkeypatch):
    commands = [(name, argv) for name, argv in _commands(services) if argv[0] == "pulse-exports"]
    assert ("migrate", ["pulse-exports", "db", "upgrade"]) in commands
    for name, argv in commands:
        _parse_in_service(services[name], _in_repo(argv, dockerfile), monkeypatch)


def test_the_daemon_is_dagster_daemon_with_short_sensor_and_queue_loops(services):
    # pulse-exports daemon (pulse_exports/daemon.py): woken by each new export, not a 5 s sensor loop
    assert _argv(services["dagster-daemon"]["command"])[:2] == ["pulse-exports", "daemon"]


def test_dagster_commands_parse_with_the_installed_dagster_clis(services, dockerfile, monkeypatch):
    commands = [(name, argv) for name, argv in _commands(services) if argv[0] in DAGSTER_CLIS]
    assert {argv[0] for _, argv in commands} == set(DAGSTER_CLIS)
    for name, argv in commands:
        _parse_in_service(services[name], _in_repo(argv, dockerfile), monkeypatch)


def test_code_location_modules_are_importable(services):
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    modules = {entry["python_module"]["module_name"] for entry in workspace["load_from"]}
    modules |= {_option(argv, "-m", "--module-name") for _, argv in _commands(services) if argv[0] == "dagster"}
    modules.discard(None)
    assert modules == {"pulse_exports.definitions"}
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"{module} is not importable"


def test_workspace_files_exist_in_the_image_and_name_one_code_location(services, dockerfile):
    referenced = {_option(argv, "-w", "--workspace") for _, argv in _commands(services) if _takes_workspace(argv)}
    referenced -= {None}
    assert referenced, "the webserver and daemon name a workspace file"
    workspace_files = {REPO / "workspace.yaml"}
    for image_path in referenced:
        repo_path = dockerfile.repo_path(image_path)
        assert repo_path is not None and repo_path.is_file(), f"{image_path} is not copied from the repo"
        workspace_files.add(repo_path)

    location_names = set()
    for path in workspace_files:
        config = yaml.safe_load(path.read_text())
        assert process_workspace_config(config).success, path
        for entry in config["load_from"]:
            (kind, target), *_ = entry.items()
            location_names.add(target["location_name"])
            if kind == "grpc_server":
                code_server = _argv(services[target["host"]]["command"])
                assert code_server[:3] == ["dagster", "code-server", "start"]
                assert int(_option(code_server, "-p", "--port")) == target["port"]
    code_server_names = {_option(argv, "--location-name") for _, argv in _commands(services) if argv[0] == "dagster"}
    assert location_names | (code_server_names - {None}) == {LOCATION_NAME}


# --- the product API ------------------------------------------------------------------------------


def test_api_serves_on_all_interfaces_at_the_port_it_publishes(services, monkeypatch):
    argv = _argv(services["api"]["command"])
    assert argv[:2] == ["pulse-exports", "serve"]
    _parse_in_service(services["api"], argv, monkeypatch)
    assert _option(argv, "--host") == "0.0.0.0"  # reachable from the host and the other containers
    port = int(_option(argv, "--port") or 0)
    assert _published_ports(services["api"]) == {port: 8000}
    health = next(arg for arg in services["api"]["healthcheck"]["test"] if "urlopen" in arg)
    url = urlparse(re.search(r"'(http[^']+)'", health).group(1))
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", port, "/api/v1/health")


def test_api_routes_its_healthcheck_and_docs_exist():
    from pulse_exports.api.app import build_app
    from pulse_exports.api.settings import ApiSettings

    app = build_app(ApiSettings(database_url="postgresql://unused/db", storage_url="file:///unused"))
    paths = app.openapi()["paths"]
    assert "get" in paths["/api/v1/health"] and "post" in paths["/api/v1/exports"]
    assert app.docs_url == "/docs"


def test_api_launches_through_the_webserver_graphql_and_links_to_published_ports(services):
    from pulse_exports.api.settings import ApiSettings

    env = _env(services["api"])
    known = {f"PULSE_{name.upper()}" for name in ApiSettings.model_fields}
    assert not {name for name in env if name.startswith("PULSE_")} - known, "every PULSE_* variable is a setting"
    webserver = _argv(services["dagster-webserver"]["command"])
    graphql = urlparse(env["PULSE_DAGSTER_GRAPHQL_URL"])
    assert (graphql.hostname, graphql.port, graphql.path) == (
        "dagster-webserver",
        int(_option(webserver, "-p", "--port")),
        "/graphql",
    )
    # links the API hands to a browser on the host go to the ports compose publishes there
    for variable, service, container_port in (
        ("PULSE_DAGSTER_UI_URL", "dagster-webserver", 3000),
        ("PULSE_S3_PUBLIC_ENDPOINT_URL", "minio", 9000),
        ("PULSE_API_PUBLIC_URL", "api", 8000),
    ):
        url = urlparse(env[variable])
        assert (url.hostname, url.port) == ("127.0.0.1", _published_ports(services[service])[container_port]), variable
    settings = ApiSettings(**{k.removeprefix("PULSE_").lower(): v for k, v in env.items() if k in known})
    assert settings.dagster_location_name == LOCATION_NAME  # the location the workspace files load
    assert {"dagster-webserver", "migrate", "minio-init"} <= set(services["api"]["depends_on"])


# --- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_installs_the_project_on_python_311_slim(dockerfile):
    assert dockerfile.from_images == ["python:3.11-slim"]
    assert any(re.search(r"\bpip install (--\S+ )*\.(\s|$)", run) for run in dockerfile.runs)


def test_dockerfile_copies_dagster_yaml_into_the_dagster_home_the_services_use(dockerfile, services):
    home = dockerfile.env["DAGSTER_HOME"]
    assert dockerfile.image_path("dagster.yaml") == PurePosixPath(home, "dagster.yaml")
    for name in PULSE_SERVICES:
        assert _env(services[name])["DAGSTER_HOME"] == home, name


def test_dockerfile_copies_only_files_that_exist_in_the_repo(dockerfile):
    missing = [source for source, _ in dockerfile.copies if not (REPO / source).exists()]
    assert not missing, f"COPY sources missing from the repo: {missing}"


# --- dagster.yaml ----------------------------------------------------------------------------------


@pytest.fixture
def instance_ref(services, monkeypatch, tmp_path) -> InstanceRef:
    """dagster.yaml loaded the way the Dagster services load it, with their compose environment."""
    for name, value in _env(services["dagster-daemon"]).items():
        monkeypatch.setenv(name, value)
    # raises DagsterInvalidConfigError unless dagster.yaml matches Dagster's instance schema
    return InstanceRef.from_dir(str(tmp_path), config_dir=str(REPO))


def _resolved_config(data: ConfigurableClassData) -> tuple[type, dict[str, Any]]:
    """The configured class and its config with env sources resolved, without instantiating it."""
    klass = getattr(importlib.import_module(data.module_name), data.class_name)
    result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
    assert result.success, f"{data.module_name}.{data.class_name}: {result.errors}"
    return klass, dict(result.value)


def test_dagster_yaml_stores_runs_in_the_compose_postgres(instance_ref, services):
    storage, config = _resolved_config(instance_ref.storage_data)
    assert f"{storage.__module__.split('.')[0]}.{storage.__name__}" == "dagster_postgres.DagsterPostgresStorage"
    postgres = _env(services["postgres"])
    assert {key: config["postgres_db"][key] for key in ("username", "password", "hostname", "db_name", "port")} == {
        "username": postgres["POSTGRES_USER"],
        "password": postgres["POSTGRES_PASSWORD"],
        "hostname": "postgres",
        "db_name": postgres["POSTGRES_DB"],
        "port": 5432,
    }


def test_dagster_yaml_names_the_queued_coordinator_and_default_launcher(instance_ref):
    coordinator, _ = _resolved_config(instance_ref.run_coordinator_data)
    launcher, _ = _resolved_config(instance_ref.run_launcher_data)
    assert issubclass(coordinator, QueuedRunCoordinator)
    assert launcher is DefaultRunLauncher


def test_dagster_yaml_runs_ten_exports_at_once_and_two_per_tenant(instance_ref):
    coordinator = instance_ref.run_coordinator_data.rehydrate(as_type=QueuedRunCoordinator)
    concurrency = ConcurrencyConfig.from_concurrency_settings(
        instance_ref.settings["concurrency"], coordinator.get_run_queue_config()
    )
    queue = concurrency.run_queue_config
    assert queue is not None and queue.max_concurrent_runs == 10
    assert {"key": "pulse/tenant", "value": {"applyLimitPerUniqueValue": True}, "limit": 2} in (
        queue.tag_concurrency_limits
    )


def test_dagster_yaml_monitors_and_retries_runs_without_resuming_them(instance_ref):
    settings = instance_ref.settings
    launcher = instance_ref.run_launcher_data.rehydrate()
    monitoring = settings["run_monitoring"]
    assert monitoring["enabled"] is True
    assert (monitoring["start_timeout_seconds"], monitoring["poll_interval_seconds"]) == (180, 60)
    if not launcher.supports_resume_run:
        assert monitoring["max_resume_run_attempts"] == 0
    assert {key: settings["run_retries"][key] for key in ("enabled", "max_retries")} == {
        "enabled": True,
        "max_retries": 1,
    }
    assert settings["telemetry"] == {"enabled": False}


def test_per_tenant_run_limit_keys_on_a_tag_the_export_code_sets(instance_ref):
    limits = instance_ref.settings["concurrency"]["runs"]["tag_concurrency_limits"]
    per_value_keys = {limit["key"] for limit in limits if isinstance(limit.get("value"), dict)}
    string_constants = {
        node.value
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert per_value_keys == {"pulse/tenant"}
    assert per_value_keys <= string_constants, "no run carries the tag the tenant limit counts"
