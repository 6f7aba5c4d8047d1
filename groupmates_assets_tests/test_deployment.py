"""The compose deployment (docker/), checked without a Docker engine.

The files parse and agree with each other and with the installed CLIs; only the UI is published, on loopback;
secrets come from docker/.env, never from a committed file; both instance configs pass Dagster's own schema; and
the instance of docker/dagster.yaml, given the environment the compose file gives the code location, runs a
project asset on a real PostgreSQL server and a real S3 server. What stays untested here: building the images,
the compose network and the containers themselves (they need a Docker engine).
"""

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import dagster as dg
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from groupmates_assets.testing.postgres_server import Postgres, create_database
from groupmates_assets.testing.s3_server import S3Server
from groupmates_assets_tests.conftest import jsonl_bytes, records
from groupmates_assets_tests.test_layout import imported_modules

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
# docker/image_requirements.py: what the code-location image installs, per VARIANT.
_spec = importlib.util.spec_from_file_location("image_requirements", DOCKER / "image_requirements.py")
image_requirements = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_requirements)
COMPOSE = DOCKER / "docker-compose.yaml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
SERVICES = {"postgres", "s3", "code-location", "webserver", "daemon"}
INSTANCE_SERVICES = ("webserver", "daemon", "code-location")  # the processes that open the Dagster instance
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)
PLACEHOLDER = "change-me"
# Compose interpolation: $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}.
_COMPOSE_TOKEN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- helpers -----------------------------------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` (any YAML node) with compose's variable syntax resolved against ``env``, as `docker compose` does."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        current = env.get(name)
        missing = current is None or (current == "" and bool(operator) and operator.startswith(":"))
        if operator and operator.endswith("?") and missing:
            raise KeyError(f"{name} is required: {argument}")
        if operator and operator.endswith("-") and missing:
            return argument
        return current or ""

    return _COMPOSE_TOKEN.sub(replace, value)


def _variables(value: Any) -> set[str]:
    """Every variable a compose file interpolates."""
    if isinstance(value, dict):
        return set().union(set(), *(_variables(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(set(), *(_variables(v) for v in value))
    return {m.group(1) for m in _COMPOSE_TOKEN.finditer(value) if m.group(1)} if isinstance(value, str) else set()


def _service_env(service: str, dotenv: Mapping[str, str]) -> dict[str, str]:
    """The environment compose gives ``service`` when docker/.env holds ``dotenv``."""
    environment = _interpolate(_yaml(COMPOSE)["services"][service].get("environment", {}), dotenv)
    assert isinstance(environment, dict), f"{service}: write environment as a mapping"
    return {k: "" if v is None else str(v) for k, v in environment.items()}


@dataclass(frozen=True)
class Dockerfile:
    stages: set[str]
    args: set[str]
    copies: dict[str, str]  # COPY from the build context: path in the image -> source in the repository
    mounts: list[str]  # RUN --mount=type=bind sources from the build context
    runs: list[str]  # every RUN's shell text
    cmds: list[list[str]]  # exec-form CMDs
    text: str


def _dockerfile_text(text: str) -> Dockerfile:
    lines = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    stages, args, copies, mounts, runs, cmds = set(), set(), {}, [], [], []
    for line in lines.splitlines():
        words = line.split()
        if not words:
            continue
        instruction = words[0].upper()
        if instruction == "FROM" and len(words) >= 4 and words[2].upper() == "AS":
            stages.add(words[3])
        elif instruction == "ARG":
            args.add(words[1].split("=", 1)[0])
        elif instruction == "COPY" and not any(w.startswith("--from") for w in words):
            *sources, target = [w for w in words[1:] if not w.startswith("--")]
            for source in sources:
                copies[f"{target}{Path(source).name}" if target.endswith("/") else target] = source
        elif instruction == "RUN":
            for flag in (w for w in words[1:] if w.startswith("--mount=")):
                options = dict(o.split("=", 1) for o in flag[len("--mount="):].split(","))
                if options.get("type") == "bind" and "from" not in options:
                    mounts.append(options["source"])
            runs.append(" ".join(w for w in words[1:] if not w.startswith("--mount=")))
        elif instruction == "CMD":
            cmds.append(json.loads(line.split(None, 1)[1]))
    return Dockerfile(stages, args, copies, mounts, runs, cmds, text)


def _dockerfile(path: Path) -> Dockerfile:
    return _dockerfile_text(path.read_text(encoding="utf-8"))


def _ignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """A .dockerignore as (re-included?, regex) rules: `*` and `?` stay within a path segment, `**` spans them."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, pattern = line.startswith("!"), line.lstrip("!").strip().strip("/")
        regex = "".join(".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
                        for part in re.split(r"(\*\*|\*|\?)", pattern) if part)
        rules.append((negated, re.compile(regex.replace(".*/", "(.*/)?"))))
    return rules


def _in_context(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether the builder sends ``path`` (relative to the context): the last rule that matches the path or one of
    its parent folders decides, as in BuildKit and buildah."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included


def _context_files(root: Path, rules: list[tuple[bool, re.Pattern]]) -> set[str]:
    """Every file of the checkout (git's view: tracked and not ignored) that the build context holds."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.split()
    return {f for f in listed if (root / f).is_file() and _in_context(f, rules)}


def _missing_from_context(dockerfile: Dockerfile, context: set[str], generated: set[str]) -> list[str]:
    """What the build needs from its context that the context lacks: COPY and bind-mount sources, and the files a
    copied shell script sources or runs from the repository (``$REPO_ROOT/...``). ``generated``: folders a
    preparation script writes into the context before the build (not in the checkout)."""
    def present(source: str) -> bool:
        source = source.rstrip("/")
        return (source in context or any(f.startswith(source + "/") for f in context)
                or any(source == g or source.startswith(g if g.endswith("-") else g + "/") for g in generated))

    missing = [source for source in [*dockerfile.copies.values(), *dockerfile.mounts] if not present(source)]
    for source in dockerfile.copies.values():
        if source.endswith(".sh") and present(source) and (REPO / source).is_file():
            text = (REPO / source).read_text()
            for needed in re.findall(r"(?:\bsource|\bbash|\bsh|^\.|\s\.)\s+\"?\$\{?REPO_ROOT\}?/([\w./-]+)", text,
                                     re.MULTILINE):
                if not present(needed):
                    missing.append(f"{needed} (needed by {source})")
    return missing


def _commands() -> Iterator[tuple[str, list[str]]]:
    """Every exec-form command the deployment runs: services, their health checks and the images' defaults."""
    for name, service in _yaml(COMPOSE)["services"].items():
        if "command" in service:
            yield name, service["command"]
        test = service.get("healthcheck", {}).get("test")
        if test and test[0] == "CMD":
            yield f"{name} healthcheck", test[1:]
    for cmd in _dockerfile(DOCKER / "Dockerfile").cmds:
        yield "Dockerfile CMD", cmd


def _executable(name: str) -> Path:
    """A program of this venv (where requirements.lock installs it), as on the images' PATH."""
    path = Path(sys.executable).parent / name
    assert os.access(path, os.X_OK), f"{name} is not installed in {path.parent}"
    return path


def _click_context(program: str, args: list[str]) -> click.Context:
    """Parse ``program args`` with the program's own click command, exactly as its entry point would (no run)."""
    (entry,) = entry_points(group="console_scripts", name=program)
    command: click.Command = importlib.import_module(entry.module).cli
    while isinstance(command, click.Group):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"{program}: no subcommand {args[0]!r}"
        command, args = sub, args[1:]
    return command.make_context(command.name, list(args))


# --- the code-location image's packages ---------------------------------------------------------------------------


def _imported_top_level_modules(package: Path) -> set[str]:
    """Top-level third-party modules the code imports anywhere (function-level imports included), test helpers
    (``testing/``) left out."""
    modules = {name.split(".")[0] for path in package.rglob("*.py")
               if "testing" not in path.relative_to(package).parts for name in imported_modules(path)}
    return modules - set(sys.stdlib_module_names) - {"__future__", package.name}


def _installed_closure(requirements: list[str]) -> set[str]:
    """The installed distributions that installing ``requirements`` brings in (their requirements, recursively)."""
    seen: set[str] = set()
    todo = [canonicalize_name(Requirement(r).name) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [canonicalize_name(r.name) for r in map(Requirement, requires)
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
    return seen


@pytest.mark.unit
def test_the_cpu_image_installs_every_module_the_code_imports():
    """The image installs pyproject's dependencies plus the variant's faiss extra: a module the code imports but
    that no installed requirement brings in would fail only inside the deployed runs (as faiss once did)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    installed = _installed_closure(image_requirements.requirements("cpu", pyproject))
    by_module = importlib.metadata.packages_distributions()
    modules = _imported_top_level_modules(REPO / "groupmates_assets")
    assert "faiss" in modules and "torch" in modules
    missing = {m: by_module.get(m) for m in modules
               if not {canonicalize_name(d) for d in by_module.get(m, [])} & installed}
    assert not missing, f"imported by groupmates_assets but not installed in the cpu image: {missing}"
    for variant in image_requirements.VARIANTS:  # exactly one faiss build per image
        wanted = [Requirement(r).name for r in image_requirements.requirements(variant, pyproject)]
        assert len([n for n in wanted if n.startswith("faiss")]) == 1, (variant, wanted)


# --- the compose files -------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_every_build_names_an_existing_dockerfile_stage_and_argument(path: Path):
    base = _yaml(COMPOSE)["services"]
    services = _yaml(path)["services"]
    assert set(services) <= SERVICES
    for name, service in services.items():
        if "build" not in service:
            assert "image" in service, name
            continue
        build = {**base[name].get("build", {}), **service["build"]}  # an override file extends the base build
        args = {**base[name].get("build", {}).get("args", {}), **service["build"].get("args", {})}
        dockerfile_path = (path.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()
        assert dockerfile_path.is_file(), f"{name}: {dockerfile_path} does not exist"
        dockerfile = _dockerfile(dockerfile_path)
        assert build["target"] in dockerfile.stages, f"{name}: no stage {build['target']!r}"
        assert set(args) <= dockerfile.args, f"{name}: build args not declared in the Dockerfile"
        if "VARIANT" in args:
            assert args["VARIANT"] in image_requirements.VARIANTS, f"{name}: VARIANT {args['VARIANT']}"
            assert service.get("image", base[name]["image"]).endswith(f":{args['VARIANT']}"), name
    assert set(_yaml(COMPOSE)["services"]) == SERVICES


# What scripts/prepare_image_context.sh writes into the build context before a build (not in a checkout).
GENERATED_CONTEXT = {".groupmates/images/wheels", ".groupmates/images/sources", ".groupmates/images/debs",
                     ".groupmates/images/requirements-"}


@pytest.mark.unit
def test_the_build_context_holds_every_copied_file():
    """Each COPY and bind-mount source, and each file a copied script sources from the repository, is in the build
    context as docker/Dockerfile.dockerignore leaves it (the last matching rule decides, as the builders do); the
    prepared folders are the ones scripts/prepare_image_context.sh writes."""
    rules = _ignore_patterns((DOCKER / "Dockerfile.dockerignore").read_text())
    dockerfile = _dockerfile(DOCKER / "Dockerfile")
    assert dockerfile.copies and dockerfile.mounts
    assert _missing_from_context(dockerfile, _context_files(REPO, rules), GENERATED_CONTEXT) == []
    prepare = (REPO / "scripts" / "prepare_image_context.sh").read_text()
    for prepared in GENERATED_CONTEXT:
        assert f'$CONTEXT/{prepared.rsplit("/", 1)[1]}' in prepare and _in_context(prepared + "x/y", rules), prepared
    assert not _in_context(".groupmates/storage/x", rules) and not _in_context(".venv/bin/python", rules)


@pytest.mark.unit
def test_the_context_check_finds_a_file_a_copied_script_needs():
    """The check above fails where the build would: a former image copied a script and ran it while the context
    left out scripts/apt_packages.sh, which that script sourced (scripts/install_test_services.sh still sources it);
    a COPY of a file the ignore file leaves out is caught too."""
    rules = _ignore_patterns("*\n!scripts/install_test_services.sh\n!groupmates_assets\n**/__pycache__\n")
    context = _context_files(REPO, rules)
    script_only = _dockerfile_text("FROM x AS y\nCOPY scripts/install_test_services.sh /app/scripts/\n"
                                   "RUN bash /app/scripts/install_test_services.sh\n")
    assert _missing_from_context(script_only, context, set()) == [
        "scripts/apt_packages.sh (needed by scripts/install_test_services.sh)"]
    left_out = _dockerfile_text("FROM x AS y\nCOPY pyproject.toml groupmates_assets /app/\n")
    assert _missing_from_context(left_out, context, set()) == ["pyproject.toml"]
    assert not _in_context("groupmates_assets/__pycache__/x.pyc", rules) and _in_context("groupmates_assets/cli.py",
                                                                                        rules)


@pytest.mark.unit
def test_every_command_runs_an_installed_program_with_valid_arguments():
    in_image = _dockerfile(DOCKER / "Dockerfile").copies
    weed_usage = subprocess.run([str(_executable("weed")), "mini", "-h"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=30).stdout
    seen = set()
    for where, command in _commands():
        program, args = command[0], command[1:]
        _executable(program)
        seen.add(program)
        if program in {"dagster", "dagster-webserver", "dagster-daemon"}:
            # A file the image holds (e.g. -w /opt/dagster/app/workspace.yaml) is checked as the repository's copy.
            context = _click_context(program, [str(REPO / in_image[a]) if a in in_image else a for a in args])
            modules = context.params.get("module_name") or ()
            for module in [modules] if isinstance(modules, str) else modules:
                assert isinstance(importlib.import_module(module).defs, dg.Definitions), f"{where}: {module}"
        elif program == "weed":
            assert args[0] == "mini", where
            for flag in args[1:]:
                name = flag.lstrip("-").split("=", 1)[0]
                assert re.search(rf"^\s+-{re.escape(name)}\s", weed_usage, re.MULTILINE), f"{where}: -{name}"
        elif program == "python":
            assert args[0] == "-c", where
            compile(args[1], where, "exec")
        else:
            pytest.fail(f"{where}: unexpected program {program!r}")
    assert {"dagster", "dagster-webserver", "dagster-daemon", "weed"} <= seen


@pytest.mark.unit
def test_every_service_has_a_health_check_that_compose_passes_through_intact():
    """A CMD health check of plain words, or one CMD-SHELL string that sh parses: podman-compose 1.0.3 joins a CMD
    list into one shell string and garbles words with spaces or quotes (docker compose does not)."""
    for name, service in _yaml(COMPOSE)["services"].items():
        test = service["healthcheck"]["test"]
        if test[0] == "CMD":
            assert all(re.fullmatch(r"[\w./:=-]+", word) for word in test[1:]), f"{name}: {test}"
        else:
            assert test[0] == "CMD-SHELL" and len(test) == 2, f"{name}: {test}"
            shell = test[1].replace("$$", "$")
            subprocess.run(["sh", "-n", "-c", shell], check=True, timeout=10)
            for nested in re.findall(r"\bbash -c '([^']*)'", shell):
                subprocess.run(["bash", "-n", "-c", nested], check=True, timeout=10)


@pytest.mark.unit
def test_every_python_service_runs_under_an_init_and_postgres_stops_fast():
    """PID 1 forwards the stop signal: an init (`init: true`) before the Python and Go servers, which do not handle
    SIGTERM as PID 1; PostgreSQL is PID 1 itself (its entrypoint execs it) and stops on SIGINT, its fast shutdown."""
    services = _yaml(COMPOSE)["services"]
    assert all(services[name].get("init") is True for name in ("s3", "code-location", "webserver", "daemon"))
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "STOPSIGNAL SIGINT" in dockerfile.split("AS postgres", 1)[1].split("FROM ", 1)[0]
    assert re.search(r"^exec postgres ", (DOCKER / "postgres-entrypoint.sh").read_text(), re.MULTILINE)


@pytest.mark.unit
def test_only_the_webserver_is_published_and_only_on_loopback():
    dotenv = _env_example()
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in _interpolate(_yaml(path), dotenv)["services"].items():
            assert service.get("network_mode") != "host", f"{path.name}: {name} on the host network"
            for port in service.get("ports", []):
                assert name == "webserver", f"{path.name}: {name} publishes {port}"
                host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
                assert host_ip == "127.0.0.1", f"{path.name}: {name} publishes {port} beyond loopback"
    assert _yaml(COMPOSE)["services"]["webserver"]["ports"] == ["127.0.0.1:${GROUPMATES_UI_PORT:-3000}:3000"]


@pytest.mark.unit
def test_every_variable_is_in_env_example_and_the_example_interpolates():
    declared = _env_example()
    used = _variables(_yaml(COMPOSE)) | _variables(_yaml(COMPOSE_GPU))
    assert not used - declared.keys(), f"add to docker/.env.example: {sorted(used - declared.keys())}"
    assert not declared.keys() - used, f"unused in the compose files: {sorted(declared.keys() - used)}"
    _interpolate(_yaml(COMPOSE), declared)  # every required (:?) variable has a value
    with pytest.raises(KeyError, match="DAGSTER_PG_PASSWORD"):  # without docker/.env compose refuses to start
        _interpolate(_yaml(COMPOSE), {k: v for k, v in declared.items() if k != "DAGSTER_PG_PASSWORD"})


@pytest.mark.unit
def test_the_instance_and_the_servers_are_wired_together():
    """docker/dagster.yaml's env entries reach every process that opens the instance; addresses name services."""
    dotenv = _env_example()
    instance_vars = set(re.findall(r"\{env: *([A-Za-z_][A-Za-z0-9_]*)\}", (DOCKER / "dagster.yaml").read_text()))
    assert {"DAGSTER_PG_HOST", "DAGSTER_PG_PASSWORD", "GROUPMATES_S3_BUCKET"} <= instance_vars
    services = _yaml(COMPOSE)["services"]
    for service in INSTANCE_SERVICES:
        env = _service_env(service, dotenv)
        assert instance_vars <= env.keys(), f"{service} lacks {sorted(instance_vars - env.keys())}"
        assert env["DAGSTER_PG_HOST"] in services and env["DAGSTER_PG_PORT"] == "5432"
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333" and "-s3.port=8333" in services["s3"]["command"]
    s3_env = _service_env("s3", dotenv)
    code_env = _service_env("code-location", dotenv)
    for key, source in (("AWS_ACCESS_KEY_ID", "GROUPMATES_S3_ACCESS_KEY"),
                        ("AWS_SECRET_ACCESS_KEY", "GROUPMATES_S3_SECRET_KEY")):
        assert s3_env[key] == code_env[key] == dotenv[source]  # the S3 server's one identity is the clients' one
    postgres_env = _service_env("postgres", dotenv)
    assert (postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], postgres_env["POSTGRES_DB"]) == (
        code_env["DAGSTER_PG_USERNAME"], code_env["DAGSTER_PG_PASSWORD"], code_env["DAGSTER_PG_DB"])
    bucket = code_env["GROUPMATES_S3_BUCKET"]
    assert code_env["GROUPMATES_STORAGE_ROOT"] == f"s3://{bucket}/storage"
    assert f"-bucket={bucket}" in _interpolate(services["s3"]["command"], dotenv)


@pytest.mark.unit
def test_the_run_launcher_starts_runs_in_the_code_location_image_with_its_environment():
    """DockerRunLauncher (run monitoring can see a run container die) starts each run in the image the code
    location names, on the compose network, with every variable the code location has (the daemon's copy of it);
    the GPU override gives those containers the GPUs, through docker-py's own DeviceRequest."""
    import docker.types
    from dagster_docker.container_context import DockerContainerContext

    dotenv = _env_example()
    launcher = _yaml(DOCKER / "dagster.yaml")["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    forwarded = set(launcher["config"]["env_vars"])
    code_env, daemon_env = _service_env("code-location", dotenv), _service_env("daemon", dotenv)
    assert forwarded == set(code_env) - {"DAGSTER_CURRENT_IMAGE"}, "forward what the code location has, no more"
    assert forwarded <= set(daemon_env), f"the daemon lacks {sorted(forwarded - set(daemon_env))}"
    # A backfill the daemon evaluates while the code location is down waits for it (Dagster's own switch).
    assert daemon_env["DAGSTER_BACKFILL_RETRY_DEFINITION_CHANGED_ERROR"] == "1"
    services = _interpolate(_yaml(COMPOSE), dotenv)["services"]
    assert code_env["DAGSTER_CURRENT_IMAGE"] == services["code-location"]["image"]
    assert launcher["config"]["network"] == {"env": "GROUPMATES_NETWORK"}
    assert _interpolate(_yaml(COMPOSE), dotenv)["networks"]["default"]["name"] == daemon_env["GROUPMATES_NETWORK"]
    for name in ("daemon", "webserver"):  # the engine's API, for launching and terminating run containers
        assert any(v.endswith(":/var/run/docker.sock") for v in services[name]["volumes"]), name

    # The GPU override: the CUDA image, whose server hands every run container the GPUs (the container context the
    # launcher merges with its own settings, turned into the engine's request by docker-py).
    gpu = _yaml(COMPOSE_GPU)["services"]["code-location"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["environment"]["DAGSTER_CURRENT_IMAGE"] == gpu["image"] == (
        "localhost/groupmates-assets/code-location:cuda")
    command = gpu["command"]
    assert command[:command.index("--container-context")] == services["code-location"]["command"]
    merged = DockerContainerContext(container_kwargs=launcher["config"]["container_kwargs"]).merge(
        DockerContainerContext.create_from_config(json.loads(command[command.index("--container-context") + 1])))
    kwargs = merged.container_kwargs
    assert kwargs["auto_remove"] is True and kwargs["init"] is True
    host_config = docker.types.HostConfig(version="1.41", device_requests=kwargs["device_requests"],
                                          shm_size=kwargs["shm_size"])
    (request,) = host_config["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["Capabilities"] == [["gpu"]] and request["Count"] == -1
    assert host_config["ShmSize"] == 8 * 2**30


@pytest.mark.unit
def test_workspace_points_at_the_code_location_service():
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    (origin,) = location_origins_from_yaml_paths([str(DOCKER / "workspace.yaml")])
    assert isinstance(origin, GrpcServerCodeLocationOrigin)
    command = _yaml(COMPOSE)["services"]["code-location"]["command"]
    assert origin.host == "code-location" and str(origin.port) == command[command.index("-p") + 1]
    assert str(origin.port) in _yaml(COMPOSE)["services"]["code-location"]["expose"]
    (local,) = location_origins_from_yaml_paths([str(REPO / "workspace.yaml")])
    assert origin.location_name == local.location_name == "groupmates_assets"


@pytest.mark.unit
def test_no_plaintext_secrets():
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in _yaml(path)["services"].items():
            for key, value in (service.get("environment") or {}).items():
                if SECRET_NAME.search(key):
                    assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}", str(value)), (
                        f"{path.name}: {name}.{key} must come from docker/.env")
    for key, value in _env_example().items():
        if SECRET_NAME.search(key):
            assert value in ("", PLACEHOLDER), f".env.example: {key} must be a placeholder"
    password = _yaml(DOCKER / "dagster.yaml")["storage"]["postgres"]["postgres_db"]["password"]
    assert isinstance(password, dict) and set(password) == {"env"}
    for path in DOCKER.iterdir():
        if not path.is_file() or path.name == ".env":  # docker/.env: a deployment's own secrets, never committed
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY", text), path.name
        assert not re.search(r"^\s*ENV\b.*(PASSWORD|SECRET)", text, re.MULTILINE), path.name
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


# --- the instance configs -----------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("path", [DOCKER / "dagster.yaml", REPO / "dagster.yaml"], ids=["docker", "root"])
def test_instance_config_passes_dagsters_schema(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Dagster's own loader (schema, storage and concurrency rules), then each pluggable class built from its config
    section, which is where Dagster checks those sections."""
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.instance.ref import InstanceRef

    for name in set(re.findall(r"\{env: *([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text())):
        monkeypatch.setenv(name, "5432" if name.endswith("_PORT") else "example")
    config, custom_class = dagster_instance_config(str(path.parent), path.name)
    assert custom_class is None
    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(path.parent), config_filename=path.name)
    assert type(ref.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert ref.run_launcher is not None and ref.compute_log_manager is not None
    if path.parent == DOCKER:  # run monitoring can tell when a run's container died
        assert ref.run_launcher.supports_check_run_worker_health and ref.run_launcher.supports_resume_run
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["concurrency"]["pools"]["default_limit"] >= 1


@pytest.mark.unit
def test_the_compose_instance_mirrors_the_local_pool_settings():
    """Pool limits and slot freeing are the same as the local instance's (the root dagster.yaml)."""
    docker, root = _yaml(DOCKER / "dagster.yaml"), _yaml(REPO / "dagster.yaml")
    hint = "keep docker/dagster.yaml in step with the root dagster.yaml"
    assert docker["concurrency"]["pools"] == root["concurrency"]["pools"], hint
    assert (docker["run_monitoring"]["free_slots_after_run_end_seconds"]
            == root["run_monitoring"]["free_slots_after_run_end_seconds"]), hint
    assert next(iter(docker["storage"])) == "postgres"


# --- a real PostgreSQL server (and S3 server) behind the compose instance -----------------------------------------


@pytest.mark.integration
def test_compose_instance_runs_a_project_asset_on_postgres_and_s3(postgres: Postgres, s3: S3Server,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """docker/dagster.yaml with the code location's compose environment (only the service addresses replaced by
    the test servers'): a run of the project's `pool_shard` lands in PostgreSQL (run, events, dynamic partition),
    a step in the gpu pool holds the pool's one slot while it runs, and the artifacts and compute logs land in S3."""
    import boto3

    from groupmates_assets.defs.deployment import GPU_POOL
    from groupmates_assets.defs.partitions import pool_shards
    from groupmates_assets.defs.pool.assets import pool_shard
    from groupmates_assets.defs.resources import platform_from_env

    database = "dagster_deployment_test"
    create_database(postgres, database)
    dotenv = {**_env_example(), "DAGSTER_PG_USERNAME": postgres.user, "DAGSTER_PG_PASSWORD": postgres.password,
              "DAGSTER_PG_DB": database, "GROUPMATES_S3_ACCESS_KEY": s3.access_key,
              "GROUPMATES_S3_SECRET_KEY": s3.secret_key, "GROUPMATES_S3_BUCKET": s3.bucket,
              "GROUPMATES_POOL_DIR": s3.url("pool")}
    env = _service_env("code-location", dotenv)
    env.update(DAGSTER_PG_HOST=postgres.host, DAGSTER_PG_PORT=str(postgres.port), AWS_ENDPOINT_URL=s3.endpoint_url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # a session of its own: boto3.client() would cache these keys in the process-wide default session
    client = boto3.session.Session().client("s3", endpoint_url=s3.endpoint_url)
    shard = jsonl_bytes(records(6, 4))
    client.put_object(Bucket=s3.bucket, Key="pool/crawl/part-0.jsonl", Body=shard)

    @dg.asset(pool=GPU_POOL)
    def gpu_pool_probe(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        info = context.instance.event_log_storage.get_concurrency_info(GPU_POOL)
        print("gpu pool step ran")  # goes to the compute logs
        return dg.MaterializeResult(metadata={"slots": info.slot_count, "claimed_by": sorted(info.active_run_ids)})

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(DOCKER / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        instance.add_dynamic_partitions(pool_shards.name, ["crawl__part-0"])
        shard_run = dg.materialize([pool_shard], partition_key="crawl__part-0", instance=instance,
                                   resources={"platform": platform_from_env()})
        probe_run = dg.materialize([gpu_pool_probe], instance=instance)
        assert shard_run.success and probe_run.success

    # Read back through a new instance (new connections), then straight from the tables.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(shard_run.run_id).status == dg.DagsterRunStatus.SUCCESS
        event = instance.get_latest_materialization_event(dg.AssetKey("pool_shard"))
        assert event.run_id == shard_run.run_id and event.asset_materialization.partition == "crawl__part-0"
        assert instance.get_dynamic_partitions(pool_shards.name) == ["crawl__part-0"]
        probe = instance.get_latest_materialization_event(dg.AssetKey("gpu_pool_probe")).asset_materialization
        assert probe.metadata["slots"].value == _yaml(DOCKER / "dagster.yaml")["concurrency"]["pools"]["default_limit"]
        assert probe.metadata["claimed_by"].value == [probe_run.run_id]  # the step held a slot while it ran ...
        assert not instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots  # ... and gave it back
    connection = postgres.connect(database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT status FROM runs WHERE run_id = %s", (shard_run.run_id,))
            assert cursor.fetchall() == [("SUCCESS",)]
            cursor.execute("SELECT count(*) FROM event_logs WHERE run_id = %s AND asset_key = %s AND "
                           "dagster_event_type = 'ASSET_MATERIALIZATION'",
                           (shard_run.run_id, dg.AssetKey("pool_shard").to_string()))
            assert cursor.fetchone() == (1,)
    finally:
        connection.close()

    manifest = json.loads(client.get_object(Bucket=s3.bucket,
                                            Key="storage/pool/shards/crawl__part-0/manifest.json")["Body"].read())
    assert manifest["sha256"] == hashlib.sha256(shard).hexdigest()  # read from the pool on S3, written to S3
    logs = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"dagster/compute-logs/storage/{probe_run.run_id}/")
    assert logs.get("KeyCount", 0) > 0, "no compute logs for the run in the bucket"
