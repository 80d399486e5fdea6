"""docker-compose.yml and the Dockerfiles, checked without a Docker engine (none runs here).

The compose file is parsed as YAML and its structure checked against what headstart needs: known
setting names with inline defaults and comments, persistence, health checks, the GPU reservation,
scalable workers. The backend's health check command is run against a real app. `docker compose
config` runs too when a compose plugin is installed, and the test says so when it is not.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys

import pytest
import yaml
from werkzeug.serving import make_server

from backend.common.settings import SETTINGS, Settings
from tests.helpers import REPO, BackgroundServer, free_port

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DASHBOARD_DOCKERFILE = REPO / "docker" / "rq-dashboard.Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

HEADSTART_SERVICES = ("backend", "worker", "worker-cpu")
SETTING_DEFAULTS = {setting.env: setting.default for setting in SETTINGS}
# Where compose deliberately differs from backend/common/settings.py: the addresses of its own services.
# The one variable without a default: Redis' password, required from .env and used in every URL to Redis.
REDIS_PASSWORD = "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env (docs/docker.md)}"
COMPOSE_DEFAULTS = {
    "REDIS_URL": "redis://:REDIS_PASSWORD@redis:6379/0",
    "LABEL_STUDIO_URL": "http://label-studio:8080",
    "LOCAL_FILES_DOCUMENT_ROOT": "/label-studio/files",
}
ENTRY = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)=\$\{(?P<var>[A-Z][A-Z0-9_]*):-(?P<default>[^}]*)\}$")
INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
MOUNT = re.compile(r"^(?P<source>\$\{[^}]*\}|[^:]+):(?P<target>/[^:]*)(?::(?P<mode>ro|rw))?$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def declared(compose) -> dict:
    """The compose services (not named `services`: conftest's fixture of that name builds the app)."""
    return compose["services"]


def environment(service: dict) -> dict[str, re.Match]:
    """NAME → the parsed `NAME=${VAR:-default}` entry; fails on any other form."""
    parsed = {}
    for entry in service.get("environment", []):
        match = ENTRY.match(unnest(entry))
        assert match, f"environment entry {entry!r} is not NAME=${{NAME:-default}}"
        parsed[match["name"]] = match
    return parsed


def unnest(text: str) -> str:
    """The text with the required Redis password reference written as its bare name (it nests in defaults)."""
    return text.replace(REDIS_PASSWORD, "REDIS_PASSWORD")


def mounts(service: dict) -> dict[str, str]:
    """Container path → volume name or host path (short syntax, `${VAR:-default}` sources allowed)."""
    parsed = {}
    for volume in service.get("volumes", []):
        match = MOUNT.match(volume)
        assert match, f"volume {volume!r} is not source:/target[:ro]"
        parsed[match["target"]] = match["source"]
    return parsed


def test_the_expected_services_are_there(declared):
    assert set(declared) == {"redis", "backend", "worker", "worker-cpu", "label-studio", "rq-dashboard"}


@pytest.mark.parametrize("name", HEADSTART_SERVICES)
def test_headstart_services_set_only_known_settings_under_their_own_names(declared, name):
    entries = environment(declared[name])
    assert entries, f"{name} has no environment"
    unknown = set(entries) - set(SETTING_DEFAULTS)
    assert not unknown, f"{name} sets {unknown}, which backend.common.settings.SETTINGS does not know"
    renamed = {n: m["var"] for n, m in entries.items() if m["var"] != n}
    assert not renamed, f"{name} reads settings from differently named host variables: {renamed}"


@pytest.mark.parametrize("name", HEADSTART_SERVICES)
def test_every_setting_is_in_compose_with_the_settings_default(declared, name):
    entries = environment(declared[name])
    assert list(entries) == [setting.env for setting in SETTINGS], "compose must list every setting, in order"
    expected = {**SETTING_DEFAULTS, **COMPOSE_DEFAULTS}
    actual = {n: m["default"] for n, m in entries.items()}
    assert actual == expected
    Settings.from_env(actual)  # every default parses


def test_every_interpolation_has_a_default_and_every_such_line_a_comment():
    checked = 0
    for number, line in enumerate(COMPOSE_FILE.read_text().splitlines(), start=1):
        if line.lstrip().startswith("#") or "${" not in line:
            continue
        code, _, comment = line.partition("  # ")
        code = unnest(code)
        for expression in INTERPOLATION.findall(code):
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*:-[^}]*", expression), \
                f"line {number}: ${{{expression}}} has no inline default (${{NAME:-default}})"
        assert comment.strip(), f"line {number} sets a variable without a comment: {line.strip()}"
        checked += 1
    assert checked >= len(SETTINGS) + 4


@pytest.mark.parametrize("name", ("label-studio", "rq-dashboard"))
def test_other_services_default_and_comment_their_variables_too(declared, name):
    assert environment(declared[name])


def test_redis_persists_to_a_named_volume_and_has_a_health_check(compose, declared):
    redis = declared["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(redis)["/data"] in compose["volumes"]
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL" and "ping | grep -q PONG" in redis["healthcheck"]["test"][1]


def test_redis_requires_a_password_from_env_and_every_client_uses_it(compose, declared):
    """With RQ, write access to Redis is code execution on the workers: no password-less Redis, and no default."""
    command = declared["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == REDIS_PASSWORD
    assert f"-a '{REDIS_PASSWORD}'" in declared["redis"]["healthcheck"]["test"][1]
    urls = [environment(declared[name])["REDIS_URL"]["default"] for name in HEADSTART_SERVICES]
    urls.append(environment(declared["rq-dashboard"])["RQ_DASHBOARD_REDIS_URL"]["default"])
    assert urls == ["redis://:REDIS_PASSWORD@redis:6379/0"] * len(urls)
    assert "ports" not in declared["redis"]
    assert "REDIS_PASSWORD=" in COMPOSE_FILE.read_text().split("services:")[0]  # the header says how to set it


@pytest.mark.parametrize("name", HEADSTART_SERVICES + ("rq-dashboard",))
def test_redis_clients_wait_for_a_healthy_redis(declared, name):
    assert declared[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_backend_serves_on_the_settings_port(declared):
    backend = declared["backend"]
    assert backend["command"] == ["headstart", "serve"]
    assert backend["ports"] == ["${PORT:-9090}:${PORT:-9090}"]
    assert SETTING_DEFAULTS["PORT"] == "9090"


def test_backend_health_check_passes_against_a_running_app_and_fails_without_one(declared, app):
    command = declared["backend"]["healthcheck"]["test"]
    assert command[:2] == ["CMD", "python"]
    argv = [sys.executable, *command[2:]]
    port = free_port()
    env = {**os.environ, "PORT": str(port)}
    server = BackgroundServer(make_server("127.0.0.1", port, app, threaded=True))
    try:
        healthy = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    finally:
        server.stop()
    assert healthy.returncode == 0, healthy.stderr
    down = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0


def test_worker_reserves_an_nvidia_gpu(declared):
    devices = declared["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    assert declared["worker"]["command"] == ["headstart", "worker"]


@pytest.mark.parametrize("name", ("worker", "worker-cpu"))
def test_workers_can_be_scaled(declared, name):
    worker = declared[name]
    for fixed in ("container_name", "ports", "hostname"):
        assert fixed not in worker, f"{name} has {fixed}: `--scale {name}=N` would clash"


def test_cpu_worker_runs_the_same_command_without_a_gpu(declared):
    cpu = declared["worker-cpu"]
    assert cpu["command"] == declared["worker"]["command"]
    assert "deploy" not in cpu
    assert cpu["profiles"] == ["cpu"]
    assert cpu["image"] == declared["backend"]["image"] == "headstart:cpu"
    assert "whl/cpu" in " ".join(cpu["build"]["args"])
    assert "whl/cu" in " ".join(declared["worker"]["build"]["args"])


def test_label_studio_can_reach_the_backend_and_shares_local_files(compose, declared):
    label_studio = declared["label-studio"]
    assert label_studio["image"].startswith("heartexlabs/label-studio:1.23.")
    entries = {n: m["default"] for n, m in environment(label_studio).items()}
    assert entries["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert entries["SSRF_PROTECTION_ENABLED"] == "false"
    assert entries["LOCAL_FILES_SERVING_ENABLED"] == "true"
    root = entries["LOCAL_FILES_DOCUMENT_ROOT"]
    assert root == COMPOSE_DEFAULTS["LOCAL_FILES_DOCUMENT_ROOT"]
    label_studio_mounts = mounts(label_studio)
    assert label_studio_mounts["/label-studio/data"] in compose["volumes"]
    for name in HEADSTART_SERVICES:
        assert mounts(declared[name])[root] == label_studio_mounts[root], \
            f"{name} does not see Label Studio's local files at {root}"


def test_admin_profile_runs_rq_dashboard_with_json_jobs_on_the_same_redis(declared):
    dashboard = declared["rq-dashboard"]
    assert dashboard["profiles"] == ["admin"]
    assert "--json" in dashboard["command"]
    redis_url = environment(dashboard)["RQ_DASHBOARD_REDIS_URL"]
    assert (redis_url["var"], redis_url["default"]) == ("REDIS_URL", COMPOSE_DEFAULTS["REDIS_URL"])
    assert all(port.startswith("127.0.0.1:") for port in dashboard["ports"])


def test_every_named_volume_is_declared(compose, declared):
    for name, service in declared.items():
        for source in mounts(service).values():
            if not source.startswith(("/", ".", "$")):
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"


def test_builds_use_dockerfiles_that_exist_with_the_arguments_they_declare(declared):
    built = 0
    for name, service in declared.items():
        build = service.get("build")
        if build is None:
            continue
        dockerfile = REPO / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), name
        arguments = set(re.findall(r"^ARG (\w+)", dockerfile.read_text(), flags=re.MULTILINE))
        for argument in build.get("args", []):
            assert argument.split("=")[0] in arguments, f"{name} passes {argument}, not an ARG of {dockerfile.name}"
        built += 1
    assert built == 4  # backend, worker, worker-cpu, rq-dashboard


def _install_requires() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    pins = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    return dict(pin.split("==") for pin in pins)


def test_dockerfile_is_python_311_slim_non_root_with_the_project_torch_pins():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, flags=re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    pins = _install_requires()
    installs = " ".join(line for line in text.splitlines() if line.startswith("RUN pip install"))
    assert f"torch=={pins['torch']} " in installs and f"torchvision=={pins['torchvision']}" in installs
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, flags=re.MULTILINE)
    assert re.search(r"^RUN pip install \.", text, flags=re.MULTILINE)


def test_dashboard_dockerfile_pins_rq_and_redis_like_the_project():
    text = DASHBOARD_DOCKERFILE.read_text()
    pins = _install_requires()
    assert f"rq=={pins['rq']}" in text and f"redis=={pins['redis']}" in text
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(line.split()[1:-1])
    assert copied and copied <= allowed, f"copied but ignored: {copied - allowed}"
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    long_description = config["metadata"]["long_description"].removeprefix("file:").strip()
    assert long_description in copied, "setup.cfg reads it, so `pip install .` in the image needs it"


def test_docker_compose_accepts_the_file():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True) \
        if _docker_cli_exists() else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no `docker compose` plugin on this machine: docker-compose.yml was checked only "
                    "structurally (the other tests here), not by `docker compose config`")
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                            text=True, cwd=REPO, timeout=60, env={**os.environ, "REDIS_PASSWORD": "0123abcd"})
    assert result.returncode == 0, result.stderr


def _docker_cli_exists() -> bool:
    return any(os.access(os.path.join(directory, "docker"), os.X_OK)
               for directory in os.environ.get("PATH", "").split(os.pathsep) if directory)
