"""The deployment files, checked without a Docker engine: docker-compose.yml, .env.example, the
Dockerfiles in docker/ and the healthcheck script they install.

``docker-compose.yml`` is validated against the Compose specification's JSON schema, shipped as
``docker/compose-spec.schema.json`` (where it comes from: docs/deploy.md, "Validating the files"),
after the interpolation Compose itself does, with the values of ``.env.example``. The invariants
the schema cannot express are plain Python over the parsed YAML. Services are recognised by what
they run, not by their names: ``maskd db upgrade`` is the migration job, ``maskd serve`` the
API, ``maskd worker`` a worker, ``maskd reconcile`` the reconciler, ``maskd mlflow`` MLflow.

The rules:

- Every service defines a healthcheck. The one exception is a one-shot job (restart ``"no"`` or
  ``on-failure``) that other services wait for with ``service_completed_successfully``: its
  success is its health, so it may disable the check.
- Every ``depends_on`` has a condition: ``service_completed_successfully`` on a one-shot job,
  ``service_healthy`` on anything else (PostgreSQL, Redis, MLflow).
- The migration job gates the API, every worker and the reconciler.
- Each worker reserves exactly one GPU by explicit ``device_ids``, no two workers the same one.
- MLflow publishes no port and sits on internal networks only, unless MLflow's basic-auth app
  is on; every other published port but the API's is bound to loopback.
- Every service has a restart policy.
- Every variable the compose file reads is listed, with a comment, in .env.example, and
  passwords in the compose file come from variables, never literals.
- Each Dockerfile runs as a non-root USER, pins its base images (a full version tag or a
  digest, never ``latest``), has a HEALTHCHECK, installs the package from a wheel built in an
  earlier stage (never ``pip install .`` from the source tree) and pins the torch and torchvision
  of pyproject.toml.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import os
import re
import shlex
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA_FILE = ROOT / "docker" / "compose-spec.schema.json"
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"
PYPROJECT = ROOT / "pyproject.toml"
DOCKERFILES = {
    "api": ROOT / "docker" / "api.Dockerfile",
    "worker": ROOT / "docker" / "worker.Dockerfile",
}

SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
"""compose-spec's schema/compose-spec.json at commit 58a2548 (2025-07-21), as npm's dclint 3.1.0
ships it. Replacing the schema is deliberate: update this hash and docs/deploy.md together."""

ONE_SHOT_RESTARTS = re.compile(r"^(no|on-failure(:\d+)?)$")
LONG_RUNNING_RESTARTS = re.compile(r"^(always|unless-stopped|on-failure(:\d+)?)$")
PINNED_TAG = re.compile(r"^v?\d+\.\d+\.\d+")
"""A full version (major.minor.patch), optionally followed by a variant: 3.11.16-slim-bookworm."""
PINNED_SERVICE_TAG = re.compile(r"^v?\d+\.\d+")
"""Images of third-party servers: their full release version (PostgreSQL's is two numbers)."""
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
MASKD_HEALTHCHECK = "maskd-healthcheck"


# --- Compose: loading and interpolation ---------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


def _parse_braced(content: str, where: str) -> tuple[str, str | None, str]:
    match = _BRACED.match(content)
    assert match, f"{where}: cannot read the variable reference ${{{content}}}"
    assert "$" not in (match["arg"] or ""), (
        f"{where}: nested variable references (${{{content}}}) are not supported here"
    )
    return match["name"], match["op"], match["arg"] or ""


def variables_in(text: str, where: str) -> set[str]:
    """The variables a compose string reads (``$$`` is a literal dollar)."""
    names = set()
    for match in _VARIABLE.finditer(text):
        if match["named"]:
            names.add(match["named"])
        elif match["braced"] is not None:
            names.add(_parse_braced(match["braced"], where)[0])
    return names


def interpolate(text: str, env: dict[str, str], where: str) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ..."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        name, op, arg = _parse_braced(match["braced"], where)
        value = env.get(name)
        if op is None:
            return value or ""
        unset_or_empty = not value if op.startswith(":") else value is None
        if op.endswith("-"):
            return arg if unset_or_empty else (value or "")
        if op.endswith("?"):
            assert not unset_or_empty, f"{where}: ${{{name}}} is required: {arg}"
            return value or ""
        return "" if unset_or_empty else arg  # ":+" / "+"

    return _VARIABLE.sub(substitute, text)


def _walk_strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk_strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk_strings(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def _map_strings(node: Any, convert: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        return {key: _map_strings(value, convert, f"{path}.{key}") for key, value in node.items()}
    if isinstance(node, list):
        return [_map_strings(value, convert, f"{path}[{i}]") for i, value in enumerate(node)]
    if isinstance(node, str):
        return convert(node, path)
    return node


def read_env_example() -> tuple[dict[str, str], dict[str, int]]:
    """The variables of .env.example with their values, and those without a comment above them.

    Documented means: the assignment, or the run of consecutive assignments it belongs to, sits
    right under a comment line.
    """
    values: dict[str, str] = {}
    undocumented: dict[str, int] = {}
    previous = ""
    group_documented = False
    for number, raw in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#"):
            previous = "comment"
            continue
        if not line:
            previous = ""
            continue
        name, equals, value = line.partition("=")
        assert equals and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), (
            f".env.example line {number} is neither a comment nor NAME=value: {raw!r}"
        )
        if previous != "assignment":
            group_documented = previous == "comment"
        if not group_documented:
            undocumented[name] = number
        values[name] = value.strip().strip("'\"")
        previous = "assignment"
    return values, undocumented


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as written (anchors and merge keys resolved, variables not)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict), (
        "docker-compose.yml must be a mapping with a `services:` mapping"
    )
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_example()[0]


@pytest.fixture(scope="module")
def interpolated(compose: dict[str, Any], env_example: dict[str, str]) -> dict[str, Any]:
    """The compose model after interpolation, with .env.example's values (a stand-in for the
    secrets it leaves empty), as Compose has it when it validates."""
    env = {name: value or f"example-{name.lower()}" for name, value in env_example.items()}
    model: dict[str, Any] = _map_strings(compose, lambda text, path: interpolate(text, env, path))
    return model


# --- Compose: recognising services --------------------------------------------------------------


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def runs(service: dict[str, Any], *words: str) -> bool:
    """Whether the service's command starts with these words (``runs(s, "maskd", "worker")``)."""
    return command_of(service)[: len(words)] == list(words)


def is_one_shot(service: dict[str, Any]) -> bool:
    return bool(ONE_SHOT_RESTARTS.match(str(service.get("restart", ""))))


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``depends_on`` in its long form; the short (list) form has no condition, shown as {}."""
    dependencies = service.get("depends_on") or {}
    if isinstance(dependencies, list):
        return {name: {} for name in dependencies}
    return {name: (spec or {}) for name, spec in dependencies.items()}


def completed_successfully_targets(services: dict[str, dict[str, Any]]) -> set[str]:
    return {
        target
        for service in services.values()
        for target, spec in depends_on(service).items()
        if spec.get("condition") == "service_completed_successfully"
    }


def role_services(services: dict[str, dict[str, Any]], *words: str) -> list[str]:
    return [name for name, service in services.items() if runs(service, *words)]


def uses_maskd_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else None
    return dockerfile is not None and (ROOT / dockerfile).resolve() in {
        path.resolve() for path in DOCKERFILES.values()
    }


# --- Compose: the schema ------------------------------------------------------------------------


def test_the_shipped_schema_is_the_recorded_compose_spec_schema() -> None:
    digest = hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest()
    assert digest == SCHEMA_SHA256, (
        f"{SCHEMA_FILE.name} is not the recorded compose-spec schema (sha256 {digest}); if it "
        "was replaced on purpose, update SCHEMA_SHA256 here and the source in docs/deploy.md"
    )
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))


def test_compose_file_matches_the_compose_specification(interpolated: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA_FILE.read_text()))
    errors = sorted(validator.iter_errors(interpolated), key=lambda error: list(error.path))
    problems = [
        f"  at {'.'.join(str(part) for part in error.path) or '(top level)'}: {error.message}"
        for error in errors
    ]
    assert not problems, "docker-compose.yml breaks the Compose specification:\n" + "\n".join(
        problems
    )


def test_compose_file_has_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, (
        "docker-compose.yml has a top-level `version:`; the Compose specification made it "
        "obsolete (Compose warns and ignores it): remove it"
    )


# --- Compose: startup order and health ----------------------------------------------------------


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    gates = completed_successfully_targets(services)
    missing = []
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        if is_one_shot(service) and name in gates:
            continue  # its health is its exit status, which its dependants wait for
        test = check.get("test")
        if check.get("disable") or not test or test in (["NONE"], "NONE"):
            missing.append(name)
    assert not missing, (
        f"services without a healthcheck: {missing}. Give each one `healthcheck.test` (only a "
        "one-shot job that others wait for with service_completed_successfully may go without)"
    )


def test_dependencies_wait_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    wrong = []
    for name, service in services.items():
        for target, spec in depends_on(service).items():
            assert target in services, f"{name} depends on {target!r}, which is no service"
            expected = (
                "service_completed_successfully"
                if is_one_shot(services[target])
                else "service_healthy"
            )
            if spec.get("condition") != expected:
                wrong.append(f"{name} -> {target}: {spec.get('condition')!r}, want {expected!r}")
    assert not wrong, (
        "depends_on without the right condition (starting is not being ready: the database, "
        "the broker and MLflow must be healthy, a one-shot job must have exited 0):\n  "
        + "\n  ".join(wrong)
    )


def test_the_migration_job_gates_every_database_user(services: dict[str, dict[str, Any]]) -> None:
    migrations = role_services(services, "maskd", "db", "upgrade")
    assert len(migrations) == 1, (
        f"expected exactly one service running `maskd db upgrade`, found {migrations}"
    )
    migrate = migrations[0]
    assert is_one_shot(services[migrate]), (
        f'{migrate} runs once: give it `restart: "no"` (or on-failure), not '
        f"{services[migrate].get('restart')!r}"
    )
    gated = (
        role_services(services, "maskd", "serve")
        + role_services(services, "maskd", "worker")
        + role_services(services, "maskd", "reconcile")
    )
    for role in ("serve", "worker", "reconcile"):
        assert role_services(services, "maskd", role), f"no service runs `maskd {role}`"
    ungated = [
        name
        for name in gated
        if depends_on(services[name]).get(migrate, {}).get("condition")
        != "service_completed_successfully"
    ]
    assert not ungated, (
        f"{ungated} may start before the schema is migrated: add `depends_on: {migrate}: "
        "condition: service_completed_successfully`"
    )


def test_every_service_has_a_restart_policy(services: dict[str, dict[str, Any]]) -> None:
    one_shots = completed_successfully_targets(services)
    wrong = []
    for name, service in services.items():
        restart = str(service.get("restart", ""))
        pattern = ONE_SHOT_RESTARTS if name in one_shots else LONG_RUNNING_RESTARTS
        if not pattern.match(restart):
            wrong.append(f"{name}: {restart or 'none'}")
    assert not wrong, (
        "restart policies missing or wrong (long-running services: unless-stopped, always or "
        'on-failure; one-shot jobs others wait for: "no" or on-failure):\n  ' + "\n  ".join(wrong)
    )


# --- Compose: GPUs ------------------------------------------------------------------------------


def test_each_worker_pins_its_own_gpu(services: dict[str, dict[str, Any]]) -> None:
    workers = role_services(services, "maskd", "worker")
    assert workers, "no service runs `maskd worker`"
    owner_of: dict[str, str] = {}
    problems = []
    for name in workers:
        deploy = services[name].get("deploy") or {}
        replicas = deploy.get("replicas", services[name].get("scale", 1))
        if int(replicas) != 1:
            problems.append(f"{name} has {replicas} replicas: they would all share its GPU")
        devices = (deploy.get("resources") or {}).get("reservations", {}).get("devices") or []
        ids = [str(i) for device in devices for i in (device.get("device_ids") or [])]
        if any("count" in device for device in devices):
            problems.append(f"{name} reserves GPUs by `count`: pin them with `device_ids`")
        if len(ids) != 1:
            problems.append(f"{name} must reserve exactly one GPU by device_ids, has {ids}")
        for gpu in ids:
            if gpu in owner_of:
                problems.append(f"{name} and {owner_of[gpu]} both use GPU {gpu}")
            owner_of.setdefault(gpu, name)
    assert not problems, "workers and GPUs:\n  " + "\n  ".join(problems)


# --- Compose: exposure --------------------------------------------------------------------------


def _published(service: dict[str, Any]) -> list[str]:
    return [
        json.dumps(port) if isinstance(port, dict) else str(port)
        for port in service.get("ports") or []
    ]


def _binds_loopback_only(port: Any) -> bool:
    if isinstance(port, dict):
        return str(port.get("host_ip", "")) in ("127.0.0.1", "::1")
    return str(port).startswith(("127.0.0.1:", "[::1]:"))


def test_mlflow_is_not_reachable_without_authentication(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mlflows = role_services(services, "maskd", "mlflow") + role_services(services, "mlflow")
    assert mlflows, "no service runs the MLflow tracking server (`maskd mlflow`)"
    networks = compose.get("networks") or {}
    for name in mlflows:
        command = command_of(services[name])
        with_auth = "--app-name" in command and "basic-auth" in command
        if with_auth:
            continue
        assert not services[name].get("ports"), (
            f"{name} publishes {_published(services[name])} without authentication: MLflow "
            "holds every project's runs and models, so anyone reaching it bypasses the API's "
            "per-project isolation. Remove `ports:` or run MLflow's basic-auth app"
        )
        attached = services[name].get("networks") or ["default"]
        open_networks = [
            network
            for network in attached
            if not (networks.get(network) or {}).get("internal", False)
        ]
        assert not open_networks, (
            f"{name} is on non-internal networks {open_networks}: keep it on `internal: true` "
            "networks only (or run MLflow's basic-auth app)"
        )


def test_only_the_api_is_published_beyond_loopback(services: dict[str, dict[str, Any]]) -> None:
    api = set(role_services(services, "maskd", "serve"))
    exposed = [
        f"{name}: {_published({'ports': [port]})[0]}"
        for name, service in services.items()
        if name not in api
        for port in service.get("ports") or []
        if not _binds_loopback_only(port)
    ]
    assert not exposed, (
        "only the API may publish a port on all interfaces; bind these to 127.0.0.1 or drop "
        "them:\n  " + "\n  ".join(exposed)
    )


# --- Compose: variables and secrets -------------------------------------------------------------


def test_every_variable_is_documented_in_env_example(compose: dict[str, Any]) -> None:
    used: dict[str, str] = {}
    for path, text in _walk_strings(compose, ""):
        for name in variables_in(text, path):
            used.setdefault(name, path.lstrip("."))
    documented, undocumented = read_env_example()
    missing = {name: where for name, where in used.items() if name not in documented}
    assert not missing, (
        "docker-compose.yml reads variables that .env.example does not list (add each, with a "
        f"comment saying what it is): {missing}"
    )
    assert not undocumented, f".env.example variables without a comment above them: {undocumented}"
    stale = sorted(set(documented) - set(used))
    assert not stale, f".env.example lists variables docker-compose.yml never reads: {stale}"


def test_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    literal = []
    for path, text in _walk_strings(compose, ""):
        key = path.rsplit(".", 1)[-1].upper()
        if re.search(r"PASSWORD|SECRET|TOKEN|AUTH", key) and not re.fullmatch(r"\$\{[^}]+\}", text):
            literal.append(path.lstrip("."))
        for password in re.findall(r"://[^/:@\s]*:([^@/\s]+)@", text):
            if not password.startswith("${"):
                literal.append(f"{path.lstrip('.')} (password in a URL)")
    assert not literal, (
        f"hard-coded secrets in docker-compose.yml: {literal}; read them from .env as ${{VAR}}"
    )


def test_third_party_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    unpinned = []
    for name, service in services.items():
        image = str(service.get("image", ""))
        if service.get("build") or DIGEST.search(image):
            continue
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else "latest"
        if not PINNED_SERVICE_TAG.match(tag):
            unpinned.append(f"{name}: {image}")
    assert not unpinned, f"images not pinned to a release (or digest): {unpinned}"


def test_builds_use_the_checked_dockerfiles(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            assert uses_maskd_image(service), (
                f"{name} builds from {service['build']!r}, which this module does not check: "
                f"use one of {[str(path.relative_to(ROOT)) for path in DOCKERFILES.values()]}"
            )


# --- Dockerfiles --------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        assert self.stages, f"{self.path.name} has no FROM"
        return self.stages[-1]

    def resolve(self, text: str) -> str:
        return re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
            lambda match: self.global_args.get(match[1], match[0]),
            text,
        )


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions per stage, with continuation lines joined and comments dropped."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if raw.strip().startswith("#"):
            continue  # comments, also between continuation lines, as Docker drops them
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = (pending + raw).strip()
        pending = ""
        if not text:
            continue
        keyword, _, arguments = text.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            words = arguments.split()
            words = [word for word in words if not word.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, start))
        elif not stages:
            if keyword == "ARG":
                arg_name, _, default = arguments.partition("=")
                global_args[arg_name.strip()] = default.strip().strip("'\"")
        else:
            stages[-1].instructions.append(Instruction(keyword, arguments, start))
    return Dockerfile(path, global_args, stages)


@pytest.fixture(scope="module", params=sorted(DOCKERFILES), ids=lambda role: f"{role}-image")
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[request.param])


def test_dockerfile_runs_as_non_root(dockerfile: Dockerfile) -> None:
    users = dockerfile.final.all("USER")
    assert users, f"{dockerfile.path.name}: the final stage has no USER line, so it runs as root"
    user = dockerfile.resolve(users[-1].arguments).split(":", 1)[0]
    assert user not in ("root", "0", ""), (
        f"{dockerfile.path.name} line {users[-1].line}: USER {users[-1].arguments} is root"
    )


def test_dockerfile_pins_its_base_images(dockerfile: Dockerfile) -> None:
    stage_names = set()
    for stage in dockerfile.stages:
        image = dockerfile.resolve(stage.base)
        if image in stage_names or image == "scratch":
            continue
        assert "$" not in image, (
            f"{dockerfile.path.name} line {stage.line}: FROM {stage.base} uses an ARG without a "
            "default before the first FROM"
        )
        if not DIGEST.search(image):
            last = image.rsplit("/", 1)[-1]
            tag = last.split(":", 1)[1] if ":" in last else "latest"
            assert tag != "latest" and PINNED_TAG.match(tag), (
                f"{dockerfile.path.name} line {stage.line}: base image {image} is not pinned; "
                "use a full version tag (python:3.11.16-slim-bookworm) or an @sha256 digest"
            )
        if stage.name:
            stage_names.add(stage.name)


def test_dockerfile_has_a_healthcheck(dockerfile: Dockerfile) -> None:
    checks = dockerfile.final.all("HEALTHCHECK")
    assert checks and not checks[-1].arguments.upper().startswith("NONE"), (
        f"{dockerfile.path.name}: the final stage has no HEALTHCHECK"
    )
    command = checks[-1].arguments
    assert MASKD_HEALTHCHECK in command or "python" in command, (
        f"{dockerfile.path.name}: HEALTHCHECK {command} uses a tool the slim image may lack; "
        f"use {MASKD_HEALTHCHECK} or python -c"
    )


def _pip_commands(stage: Stage) -> list[tuple[Instruction, list[str]]]:
    """Each ``pip ...`` invocation in the stage's RUN lines, as words."""
    found = []
    for run in stage.all("RUN"):
        for part in re.split(r"&&|\|\||;|\|", run.arguments):
            try:
                words = shlex.split(part)
            except ValueError:
                words = part.split()
            if "pip" in words:
                found.append((run, words[words.index("pip") :]))
    return found


def test_dockerfile_installs_the_package_from_a_built_wheel(dockerfile: Dockerfile) -> None:
    name = dockerfile.path.name
    builders = [
        stage
        for stage in dockerfile.stages[:-1]
        if any(words[1:2] == ["wheel"] for _, words in _pip_commands(stage))
        or any(re.search(r"-m\s+build\b", run.arguments) for run in stage.all("RUN"))
    ]
    assert builders, f"{name}: no earlier stage builds the wheel (`pip wheel --no-deps .`)"
    final = dockerfile.final
    builder_names = {stage.name for stage in builders} | {
        str(dockerfile.stages.index(stage)) for stage in builders
    }
    copies = [
        copy
        for copy in final.all("COPY")
        if (match := re.search(r"--from=(\S+)", copy.arguments)) and match[1] in builder_names
    ]
    assert copies, f"{name}: the final stage does not COPY --from the wheel-building stage"
    wheel_installs = [
        run
        for run, words in _pip_commands(final)
        if words[1:2] == ["install"] and ".whl" in run.arguments
    ]
    assert wheel_installs, f"{name}: no RUN of the final stage pip-installs a .whl"
    for run, words in _pip_commands(final):
        if words[1:2] != ["install"]:
            continue
        from_source = [
            word
            for word in words[2:]
            # a directory (., ./src, /src, .[service]) or an editable install; not a .whl
            if word in ("-e", "--editable") or (word.startswith((".", "/")) and ".whl" not in word)
        ]
        assert not from_source, (
            f"{name} line {run.line}: `{' '.join(words)}` installs from the source tree; "
            "install the wheel the builder stage made"
        )
    for copy in final.all("COPY") + final.all("ADD"):
        if "--from=" in copy.arguments:
            continue
        sources = copy.arguments.split()[:-1]
        code = {".", "./", "pyproject.toml", "maskd_core", "service", "workers", "maskd_cli"}
        assert not code.intersection(source.rstrip("/") or "." for source in sources), (
            f"{name} line {copy.line}: the final stage copies source code ({copy.arguments})"
        )


def _pinned_version(package: str) -> str:
    pyproject = tomllib.loads(PYPROJECT.read_text())
    project = pyproject["project"]
    lists = [project.get("dependencies", []), *project.get("optional-dependencies", {}).values()]
    for requirement in (item for items in lists for item in items):
        match = re.fullmatch(rf"{package}\s*==\s*([\w.]+)", requirement.strip())
        if match:
            return match[1]
    raise AssertionError(f"pyproject.toml pins no {package}==X.Y.Z")


@pytest.mark.parametrize("package", ["torch", "torchvision"])
def test_dockerfile_pins_the_torch_of_pyproject(dockerfile: Dockerfile, package: str) -> None:
    wanted = _pinned_version(package)
    arg = f"{package.upper()}_VERSION"
    defaults = [
        item.arguments.partition("=")[2].strip()
        for item in dockerfile.final.all("ARG")
        if item.arguments.partition("=")[0].strip() == arg
    ]
    assert defaults == [wanted], (
        f"{dockerfile.path.name}: ARG {arg} is {defaults or 'missing'}, pyproject.toml pins "
        f"{package}=={wanted}"
    )
    installs = " ".join(run.arguments for run in dockerfile.final.all("RUN"))
    assert f'"{package}==${{{arg}}}' in installs, (
        f"{dockerfile.path.name}: no RUN installs {package}==${{{arg}}}"
    )


def test_dockerfile_installs_the_healthcheck_script(dockerfile: Dockerfile) -> None:
    copies = [copy.arguments.split() for copy in dockerfile.final.all("COPY")]
    assert ["docker/healthcheck.py", f"/usr/local/bin/{MASKD_HEALTHCHECK}"] in copies, (
        f"{dockerfile.path.name}: COPY docker/healthcheck.py /usr/local/bin/{MASKD_HEALTHCHECK} "
        "is missing, yet the healthchecks call it"
    )


# --- The healthcheck script ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("maskd_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_healthchecks_of_maskd_images_use_the_script(
    services: dict[str, dict[str, Any]], healthcheck: ModuleType
) -> None:
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test")
        if not uses_maskd_image(service) or not test:
            continue
        assert isinstance(test, list) and test[0] == "CMD" and test[1] == MASKD_HEALTHCHECK, (
            f"{name}: healthcheck {test} should be [CMD, {MASKD_HEALTHCHECK}, ...]: the slim "
            "images have no curl or wget"
        )
        try:
            healthcheck.build_parser().parse_args(test[2:])
        except SystemExit:
            pytest.fail(f"{name}: {MASKD_HEALTHCHECK} cannot run {test[2:]} (see its usage above)")


class _Probe(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/ok" else 503
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"ready" if status == 200 else b"database: unreachable")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_http(healthcheck: ModuleType, probe_server: str) -> None:
    assert healthcheck.main(["http", f"{probe_server}/ok"]) == 0
    assert healthcheck.main(["http", f"{probe_server}/readyz"]) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_healthcheck_reach(
    healthcheck: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("UP_URL", f"postgresql+psycopg://maskd:s3cret@127.0.0.1:{port}/maskd")
        monkeypatch.setenv("DOWN_URL", f"redis://:s3cret@127.0.0.1:{_free_port()}/0")
        assert healthcheck.main(["--timeout", "2", "reach", "UP_URL"]) == 0
        assert healthcheck.main(["--timeout", "2", "reach", "UP_URL", "DOWN_URL"]) == 1
        assert healthcheck.main(["reach", "UNSET_URL_FOR_THIS_TEST"]) == 1
    output = capsys.readouterr()
    assert "s3cret" not in output.out + output.err, "the healthcheck printed a password"
    assert healthcheck.endpoint_of("redis://:pw@redis/0") == ("redis", 6379)


def test_healthcheck_heartbeat(healthcheck: ModuleType, tmp_path: Path) -> None:
    beat = tmp_path / "heartbeat"
    assert healthcheck.main(["heartbeat", str(beat)]) == 1
    beat.touch()
    assert healthcheck.main(["heartbeat", str(beat), "--max-age", "30"]) == 0
    old = time.time() - 120
    os.utime(beat, (old, old))
    assert healthcheck.main(["heartbeat", str(beat), "--max-age", "30"]) == 1
