"""Offline checks of the Dockerfile, docker-compose.yml and the Helm chart.

The chart is linted and rendered by a real helm binary that `dev/helm.sh
install` builds with Go, and the rendered manifests are validated against the
Kubernetes API schemas bundled in the kubernetes-validate package. The compose
file is validated against the Compose specification's JSON schema, vendored in
tests/data. No Docker engine, cluster or network is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import types
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from pydantic import BaseModel

from autopull.streams.settings import Settings

# The helm build inside the first test that needs it may take minutes.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "autopull"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
HELM_SCRIPT = REPO_ROOT / "dev" / "helm.sh"
COMPOSE_SCHEMA = REPO_ROOT / "tests" / "data" / "compose-spec.json"
DEMO_SETTINGS = REPO_ROOT / "examples" / "demo.yaml"

# A cold `go install` of helm took about 4 minutes on two cores. The limit
# leaves room for downloading the modules over a slow link.
HELM_INSTALL_TIMEOUT_S = 1200
HELM_TIMEOUT_S = 60

# The chart's kubeVersion floor, and the newest release kubernetes-validate has.
OLDEST_KUBERNETES = "1.29"
NEWEST_KUBERNETES = kubernetes_validate.utils.latest_version()

# The path of the YAML settings file, read before the settings model is built.
NON_FIELD_VARIABLES = {"AUTOPULL_CONFIG"}
VARIABLE_PATTERN = re.compile(r"\bAUTOPULL_[A-Z0-9_]*[A-Z0-9]")

# Settings in which the compose worker differs from examples/demo.yaml, because
# it runs in a container next to a containerised broker and serves its health
# check over the web server.
COMPOSE_ONLY_SETTINGS = {"kafka_bootstrap", "data_dir", "web_enabled", "web_host"}

FULL_VALUES: dict[str, Any] = {
    "kafka": {"bootstrap": "kafka-0.kafka.svc:9092,kafka-1.kafka.svc:9092"},
    "replicas": 5,
    "config": {
        "topic_partitions": 12,
        "policy": {"quarantine_mailbox": "quarantine@example.com"},
        "graph": {
            "tenant_id": "8d1c6a2e-0c4b-4f4e-9a51-2f6c0b7d3e15",
            "client_id": "5f0e3c9a-7b2d-4c61-8e14-9d3a6b2c1f70",
            "quarantine_mailbox": "quarantine@example.com",
        },
    },
    "secretEnv": [
        {
            "name": "AUTOPULL_GRAPH__CLIENT_SECRET",
            "secretName": "autopull-graph",
            "key": "client-secret",
        },
        {
            "name": "AUTOPULL_WEBHOOK__TOKENS__TAP",
            "secretName": "autopull-webhook",
            "key": "tap-token",
            "optional": True,
        },
    ],
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
}


# ---------------------------------------------------------------------------
# Settings names
# ---------------------------------------------------------------------------


def _members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _annotation_accepts(annotation: Any, path: list[str]) -> bool:
    if not path:
        return True
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            accepted = _model_accepts(member, path)
        elif get_origin(member) is dict:
            # The first part is a key of the mapping, such as a source name.
            accepted = bool(path[0]) and _annotation_accepts(
                get_args(member)[1], path[1:]
            )
        else:
            accepted = False
        if accepted:
            return True
    return False


def _model_accepts(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0])
    return field is not None and _annotation_accepts(field.annotation, path[1:])


def names_setting(variable: str) -> bool:
    """Return whether an AUTOPULL_* environment variable sets a settings field.

    Nested fields are joined with `__`, as pydantic-settings reads them.
    """
    if not variable.startswith("AUTOPULL_"):
        return False
    path = variable.removeprefix("AUTOPULL_").lower().split("__")
    return _model_accepts(Settings, path)


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("AUTOPULL_KAFKA_BOOTSTRAP", True),
        ("AUTOPULL_GRAPH__CLIENT_SECRET", True),
        ("AUTOPULL_POLICY__QUARANTINE_MAILBOX", True),
        ("AUTOPULL_WEBHOOK__TOKENS__TAP", True),
        ("AUTOPULL_ROUTING__EXAMPLE_COM", True),
        ("AUTOPULL_GRAPH__CLIENT_SECRETS", False),
        ("AUTOPULL_GRAPH_CLIENT_SECRET", False),
        ("AUTOPULL_TOPIC_PREFIX__X", False),
        ("AUTOPULL_WEBHOOK__TOKENS", True),
        ("AUTOPULL_WEBHOOK__TOKENS__TAP__X", False),
        ("AUTOPULL_CONFIG", False),
    ],
)
def test_names_setting_walks_nested_fields(variable: str, expected: bool) -> None:
    assert names_setting(variable) is expected


def _deploy_files() -> list[Path]:
    chart_files = sorted(path for path in CHART.rglob("*") if path.is_file())
    return [COMPOSE_FILE, DOCKERFILE, *chart_files]


@pytest.mark.parametrize(
    "path", _deploy_files(), ids=lambda path: str(path.relative_to(REPO_ROOT))
)
def test_deploy_file_variables_name_settings(path: Path) -> None:
    variables = set(VARIABLE_PATTERN.findall(path.read_text())) - NON_FIELD_VARIABLES
    unknown = sorted(name for name in variables if not names_setting(name))

    assert unknown == [], f"{path.name} sets variables that name no settings field"


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, arguments = stripped.partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(
        index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"
    )
    return instructions[last_from:]


def test_dockerfile_pins_exact_python_base() -> None:
    instructions = dockerfile_instructions()
    args = dict(
        arguments.split("=", 1)
        for keyword, arguments in instructions
        if keyword == "ARG" and "=" in arguments
    )
    bases = [
        arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"
    ]

    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    assert bases == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]


def test_dockerfile_installs_lock_with_hashes() -> None:
    runs = [
        arguments
        for keyword, arguments in dockerfile_instructions()
        if keyword == "RUN"
    ]

    assert any("--require-hashes -r /src/requirements.lock" in run for run in runs)


def test_dockerfile_final_stage_has_no_build_tools() -> None:
    runs = [arguments for keyword, arguments in final_stage() if keyword == "RUN"]
    tools = re.compile(r"\b(apt-get|apt|gcc|g\+\+|make|build-essential|pip)\b")

    assert [run for run in runs if tools.search(run)] == []


def test_dockerfile_runs_autopull_as_non_root() -> None:
    stage = dict(final_stage())
    user, _, group = stage["USER"].partition(":")

    assert user.isdigit()
    assert int(user) != 0
    assert group.isdigit()
    assert json.loads(stage["ENTRYPOINT"]) == ["autopull"]
    assert json.loads(stage["CMD"]) == ["worker"]


def test_dockerfile_exposes_default_web_port() -> None:
    stage = dict(final_stage())

    assert int(stage["EXPOSE"]) == Settings.model_fields["web_port"].default


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> set[str]:
    """Return the installed distributions that `autopull` needs without extras."""
    needed: set[str] = set()
    pending = [(_canonical("autopull"), "")]
    while pending:
        name, extra = pending.pop()
        for spec in metadata.distribution(name).requires or []:
            requirement = Requirement(spec)
            marker = requirement.marker
            if marker is not None and not marker.evaluate({"extra": extra}):
                continue
            child = _canonical(requirement.name)
            pending += [(child, child_extra) for child_extra in requirement.extras]
            if child not in needed:
                needed.add(child)
                pending.append((child, ""))
    return needed


def test_dockerfile_removes_dev_only_packages() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    dev_extra = pyproject["project"]["optional-dependencies"]["dev"]
    dev_names = {_canonical(Requirement(spec).name) for spec in dev_extra}
    uninstalls = [
        arguments
        for keyword, arguments in dockerfile_instructions()
        if keyword == "RUN" and "pip uninstall --yes" in arguments
    ]
    first_command = uninstalls[0].split("&&")[0]
    removed = {_canonical(word) for word in first_command.split()[3:]}

    # A dev tool that a runtime dependency also needs, such as cryptography,
    # must stay in the image.
    assert removed == dev_names - runtime_closure()


def test_dockerignore_admits_every_copied_path() -> None:
    admitted = {
        line.removeprefix("!").rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    copied = set()
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and not arguments.startswith("--from"):
            copied.update(Path(source).as_posix() for source in arguments.split()[:-1])

    assert copied - admitted == set()


# ---------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(schema)


def test_compose_file_matches_compose_spec(
    compose: dict[str, Any], compose_validator: jsonschema.Draft202012Validator
) -> None:
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in compose_validator.iter_errors(compose)
    ]

    assert errors == []


def test_compose_spec_rejects_unknown_service_key(
    compose: dict[str, Any], compose_validator: jsonschema.Draft202012Validator
) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["enviroment"] = {"AUTOPULL_STORE": "memory://"}

    assert not compose_validator.is_valid(broken)


def _docker_compose_missing(output: str) -> bool:
    markers = ("unknown command", "is not a docker command", "unknown shorthand")
    return any(marker in output for marker in markers)


def test_compose_config_accepted_by_docker_compose() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip(
            "not applicable: no docker client on PATH, so `docker compose config` "
            "cannot run here; test_compose_file_matches_compose_spec validated "
            "docker-compose.yml against the Compose specification instead."
        )
    version = subprocess.run(
        [docker, "compose", "version"],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_S,
        check=False,
    )
    output = version.stdout + version.stderr
    if version.returncode != 0:
        assert _docker_compose_missing(output), (
            f"`docker compose version` failed for a reason other than a missing "
            f"compose plugin:\n{output}"
        )
        first_line = output.strip().splitlines()[0]
        pytest.skip(
            f"not applicable: the docker client has no compose plugin ({first_line}); "
            "test_compose_file_matches_compose_spec validated docker-compose.yml "
            "against the Compose specification instead."
        )

    result = subprocess.run(
        [docker, "compose", "--file", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_S,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_ports_bind_loopback_only(compose: dict[str, Any]) -> None:
    ports = [
        (name, port)
        for name, service in compose["services"].items()
        for port in service.get("ports", [])
    ]

    assert ports != []
    assert [entry for entry in ports if not entry[1].startswith("127.0.0.1:")] == []


def test_compose_kafka_pinned_without_auto_create(
    compose: dict[str, Any],
) -> None:
    kafka = compose["services"]["kafka"]
    environment = kafka["environment"]

    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"])
    assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert environment["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def _clear_autopull_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AUTOPULL_"):
            monkeypatch.delenv(name)


def test_compose_worker_settings_match_demo(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_autopull_environment(monkeypatch)
    monkeypatch.setenv("AUTOPULL_CONFIG", str(DEMO_SETTINGS))
    demo = Settings().model_dump()

    monkeypatch.delenv("AUTOPULL_CONFIG")
    for name, value in compose["services"]["worker"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    worker = Settings().model_dump()

    differing = {key for key in demo if demo[key] != worker[key]}
    assert differing == COMPOSE_ONLY_SETTINGS
    assert worker["kafka_bootstrap"] == "kafka:19092"


def test_compose_worker_shares_simulator_loopback(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]

    assert worker["network_mode"] == "service:graph-sim"
    assert worker["environment"]["AUTOPULL_GRAPH__GRAPH_URL"].startswith(
        "http://127.0.0.1:8765/"
    )


def test_compose_simulator_serves_bundled_world(compose: dict[str, Any]) -> None:
    simulator = compose["services"]["graph-sim"]
    command = simulator["command"]
    world = command[command.index("--world") + 1]

    assert simulator["entrypoint"] == ["python", "-m", "autopull.sim"]
    assert command[0] == "graph"
    assert (REPO_ROOT / Path(world).relative_to("/app")).is_file()
    assert command[command.index("--port") + 1] == "8765"


def test_compose_ingest_waits_for_worker(
    compose: dict[str, Any],
) -> None:
    ingest = compose["services"]["ingest"]
    command = ingest["command"][0]
    pattern = command.split()[-1]

    assert ingest["entrypoint"] == ["sh", "-c"]
    assert command.startswith("autopull ingest ")
    assert sorted(REPO_ROOT.glob(pattern)) != []
    assert ingest["depends_on"]["worker"]["condition"] == "service_healthy"
    assert (
        ingest["environment"]["AUTOPULL_TOPIC_PREFIX"]
        == compose["services"]["worker"]["environment"]["AUTOPULL_TOPIC_PREFIX"]
    )


# ---------------------------------------------------------------------------
# Helm chart
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> list[str]:
    """Build or find the pinned helm binary; return its command prefix."""
    try:
        result = subprocess.run(
            ["bash", str(HELM_SCRIPT), "install"],
            capture_output=True,
            text=True,
            timeout=HELM_INSTALL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(
            f"dev/helm.sh install timed out after {HELM_INSTALL_TIMEOUT_S}s:\n"
            f"{error.stdout or ''}{error.stderr or ''}",
            pytrace=False,
        )
    if result.returncode != 0:
        pytest.fail(
            f"dev/helm.sh install failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}",
            pytrace=False,
        )
    return [result.stdout.strip().splitlines()[-1]]


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Return an environment whose helm caches and config live in a temp folder."""
    home = tmp_path_factory.mktemp("helm-home")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


HelmRunner = Callable[..., "subprocess.CompletedProcess[str]"]
Renderer = Callable[..., list[dict[str, Any]]]


@pytest.fixture
def run_helm(helm: list[str], helm_env: dict[str, str], tmp_path: Path) -> HelmRunner:
    """Return a function that runs `helm lint` or `helm template` on the chart.

    It takes the command, a values mapping and extra arguments.
    """

    def run(
        command: str, values: dict[str, Any], *extra: str
    ) -> subprocess.CompletedProcess[str]:
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        arguments = [command]
        if command == "template":
            arguments += ["autopull", "--namespace", "mail-security"]
        arguments += [str(CHART), "--values", str(values_file), *extra]
        return subprocess.run(
            [*helm, *arguments],
            env=helm_env,
            capture_output=True,
            text=True,
            timeout=HELM_TIMEOUT_S,
            check=False,
        )

    return run


@pytest.fixture
def render(run_helm: HelmRunner) -> Renderer:
    """Return a function that renders the chart and returns its manifests."""

    def manifests(values: dict[str, Any], *extra: str) -> list[dict[str, Any]]:
        result = run_helm("template", values, *extra)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return manifests


def one(manifests: list[dict[str, Any]], kind: str, name: str = "") -> dict[str, Any]:
    """Return the only manifest of `kind` (and `name`, when given)."""
    found = [
        doc
        for doc in manifests
        if doc["kind"] == kind and (not name or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def worker_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(manifests, "StatefulSet")["spec"]["template"]["spec"]
    container: dict[str, Any] = pod["containers"][0]
    return container


def test_helm_lint_passes_strict(run_helm: HelmRunner) -> None:
    result = run_helm("lint", FULL_VALUES, "--strict")

    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_template_without_bootstrap_fails(run_helm: HelmRunner) -> None:
    result = run_helm("template", {"replicas": 1})

    assert result.returncode != 0
    assert "bootstrap" in result.stderr


@pytest.mark.parametrize(
    "bootstrap", ["", "kafka", "kafka:9092,", "kafka:9092 kafka-1:9092", "kafka:port"]
)
def test_helm_template_rejects_malformed_bootstrap(
    run_helm: HelmRunner, bootstrap: str
) -> None:
    result = run_helm("template", {"kafka": {"bootstrap": bootstrap}})

    assert result.returncode != 0
    assert "/kafka/bootstrap" in result.stderr


def test_bootstrap_required_without_schema_validation(
    run_helm: HelmRunner,
) -> None:
    result = run_helm("template", {"replicas": 1}, "--skip-schema-validation")

    assert result.returncode != 0
    assert "kafka.bootstrap is required" in result.stderr


@pytest.mark.parametrize("key", ["kafka_bootstrap", "data_dir", "web_port"])
def test_helm_template_rejects_reserved_config_key(
    run_helm: HelmRunner, key: str
) -> None:
    values = {"kafka": {"bootstrap": "kafka:9092"}, "config": {key: "x"}}

    result = run_helm("template", values)

    assert result.returncode != 0
    assert f"invalid propertyName '{key}'" in result.stderr


def test_helm_template_rejects_misspelt_value(run_helm: HelmRunner) -> None:
    values = {"kafka": {"bootstrap": "kafka:9092"}, "replica": 2}

    result = run_helm("template", values)

    assert result.returncode != 0
    assert "replica" in result.stderr


def test_helm_template_rejects_both_disruption_limits(run_helm: HelmRunner) -> None:
    values = {
        "kafka": {"bootstrap": "kafka:9092"},
        "podDisruptionBudget": {
            "enabled": True,
            "minAvailable": 2,
            "maxUnavailable": 1,
        },
    }

    result = run_helm("template", values)

    assert result.returncode != 0
    assert "podDisruptionBudget" in result.stderr


@pytest.mark.parametrize("kubernetes", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_rendered_manifests_match_kubernetes_schemas(
    render: Renderer, kubernetes: str
) -> None:
    manifests = render(FULL_VALUES, "--kube-version", kubernetes)
    kinds = sorted(doc["kind"] for doc in manifests)
    errors = []
    for doc in manifests:
        if doc["kind"] == "ServiceMonitor":
            continue
        try:
            kubernetes_validate.validate(doc, kubernetes, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            errors.append(f"{doc['kind']} {path}: {error.message}")

    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "StatefulSet",
    ]
    assert errors == []


def test_kubernetes_schema_rejects_misspelt_field(render: Renderer) -> None:
    statefulset = one(render(FULL_VALUES), "StatefulSet")
    statefulset["spec"]["podManagmentPolicy"] = "Parallel"

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, NEWEST_KUBERNETES, strict=True)


def test_statefulset_runs_replicas_in_parallel(render: Renderer) -> None:
    manifests = render(FULL_VALUES)
    spec = one(manifests, "StatefulSet")["spec"]
    headless = one(manifests, "Service", "autopull-headless")

    assert spec["replicas"] == 5
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == "autopull-headless"
    assert headless["spec"]["clusterIP"] == "None"


def test_statefulset_keeps_tables_on_persistent_volumes(render: Renderer) -> None:
    manifests = render(FULL_VALUES)
    spec = one(manifests, "StatefulSet")["spec"]
    mounts = {
        m["name"]: m["mountPath"] for m in worker_container(manifests)["volumeMounts"]
    }
    claims = [claim["metadata"]["name"] for claim in spec["volumeClaimTemplates"]]
    pod_volumes = [volume["name"] for volume in spec["template"]["spec"]["volumes"]]

    assert claims == ["data"]
    assert "data" not in pod_volumes
    assert mounts["data"] == "/var/lib/autopull"


def test_statefulset_without_persistence_uses_empty_dir(render: Renderer) -> None:
    values = {**FULL_VALUES, "persistence": {"enabled": False}}

    spec = one(render(values), "StatefulSet")["spec"]
    volumes = {volume["name"]: volume for volume in spec["template"]["spec"]["volumes"]}

    assert "volumeClaimTemplates" not in spec
    assert volumes["data"] == {"name": "data", "emptyDir": {}}


def test_statefulset_probes_use_livez_and_readyz(render: Renderer) -> None:
    container = worker_container(render(FULL_VALUES))
    port_names = [port["name"] for port in container["ports"]]

    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "http",
    }
    assert port_names == ["http"]


def test_statefulset_reads_secrets_from_existing_secrets(render: Renderer) -> None:
    container = worker_container(render(FULL_VALUES))
    env = {entry["name"]: entry for entry in container["env"]}

    assert env["AUTOPULL_GRAPH__CLIENT_SECRET"]["valueFrom"] == {
        "secretKeyRef": {"name": "autopull-graph", "key": "client-secret"}
    }
    assert env["AUTOPULL_WEBHOOK__TOKENS__TAP"]["valueFrom"] == {
        "secretKeyRef": {
            "name": "autopull-webhook",
            "key": "tap-token",
            "optional": True,
        }
    }


def test_statefulset_runs_non_root_with_read_only_root(render: Renderer) -> None:
    manifests = render(FULL_VALUES)
    pod = one(manifests, "StatefulSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "/tmp" in mounts
    assert pod["automountServiceAccountToken"] is False


def test_statefulset_config_change_rolls_pods(render: Renderer) -> None:
    def checksum(values: dict[str, Any]) -> str:
        template = one(render(values), "StatefulSet")["spec"]["template"]
        value: str = template["metadata"]["annotations"]["checksum/config"]
        return value

    changed = {**FULL_VALUES, "config": {**FULL_VALUES["config"], "log_level": "DEBUG"}}

    assert checksum(FULL_VALUES) != checksum(changed)


def test_pod_environment_loads_settings(
    render: Renderer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(FULL_VALUES)
    container = worker_container(manifests)
    settings_yaml = one(manifests, "ConfigMap")["data"]["settings.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {entry["name"]: entry for entry in container["env"]}
    _clear_autopull_environment(monkeypatch)

    # The pod sees the ConfigMap at the mount path; here the file is in tmp_path.
    assert env["AUTOPULL_CONFIG"]["value"] == f"{mounts['config']}/settings.yaml"
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(settings_yaml)
    for name, entry in env.items():
        if name == "AUTOPULL_CONFIG":
            monkeypatch.setenv(name, str(settings_file))
        elif "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        else:
            secret = entry["valueFrom"]["secretKeyRef"]
            monkeypatch.setenv(name, f"{secret['name']}/{secret['key']}")
    settings = Settings()

    assert settings.kafka_bootstrap == FULL_VALUES["kafka"]["bootstrap"]
    assert settings.topic_partitions == 12
    assert settings.data_dir == Path(mounts["data"])
    assert settings.web_enabled is True
    assert settings.web_host == "0.0.0.0"
    assert settings.web_port == container["ports"][0]["containerPort"]
    assert settings.graph is not None
    assert settings.graph.client_secret.get_secret_value() == (
        "autopull-graph/client-secret"
    )
    assert settings.webhook.tokens["tap"].get_secret_value() == (
        "autopull-webhook/tap-token"
    )


def test_default_values_load_as_settings(
    render: Renderer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render({"kafka": {"bootstrap": "kafka:9092"}})
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(one(manifests, "ConfigMap")["data"]["settings.yaml"])
    _clear_autopull_environment(monkeypatch)
    monkeypatch.setenv("AUTOPULL_CONFIG", str(settings_file))

    settings = Settings()

    assert settings.topic_replication == 3
    assert settings.log_format == "json"


def test_service_monitor_off_by_default(render: Renderer) -> None:
    kinds = {doc["kind"] for doc in render({"kafka": {"bootstrap": "kafka:9092"}})}

    assert "ServiceMonitor" not in kinds


def test_service_monitor_selects_web_service_only(render: Renderer) -> None:
    manifests = render(FULL_VALUES)
    monitor = one(manifests, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        doc["metadata"]["name"]
        for doc in manifests
        if doc["kind"] == "Service"
        and selector.items() <= doc["metadata"]["labels"].items()
    ]

    assert selected == ["autopull"]
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_services_select_worker_pods(render: Renderer) -> None:
    manifests = render(FULL_VALUES)
    pod_labels = one(manifests, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    services = [doc for doc in manifests if doc["kind"] == "Service"]

    assert len(services) == 2
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({"enabled": True}, {"maxUnavailable": 1}),
        ({"enabled": True, "minAvailable": 2}, {"minAvailable": 2}),
        ({"enabled": True, "maxUnavailable": "50%"}, {"maxUnavailable": "50%"}),
    ],
)
def test_disruption_budget_limits(
    render: Renderer, budget: dict[str, Any], expected: dict[str, Any]
) -> None:
    values = {"kafka": {"bootstrap": "kafka:9092"}, "podDisruptionBudget": budget}

    spec = one(render(values), "PodDisruptionBudget")["spec"]

    assert {key: spec[key] for key in spec if key != "selector"} == expected


def test_chart_web_port_matches_settings_default() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    assert values["web"]["port"] == Settings.model_fields["web_port"].default
    assert values["service"]["port"] == values["web"]["port"]
