"""A real Label Studio 1.23.2, for the `loop` benchmark and the end-to-end suite: installed once in
its own virtual environment (its pins clash with headstart's), started headless on a spare port
with a throwaway data directory, and stopped at the end.

It lives in bench/ because nothing outside tests/ may import tests/; tests/e2e re-exports it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.processes import ManagedProcess, http_ok, wait_until
from bench.resources import free_port

LABEL_STUDIO_VERSION = "1.23.2"
DEFAULT_VENV = Path(os.environ.get("HEADSTART_LS_VENV") or Path.home() / ".cache" / "headstart" / "ls-venv")
INSTALL_TIMEOUT_S = 1200
# a fresh database takes 45-60 s on two shared cores; leave room (more on a crowded host: HEADSTART_LS_START_TIMEOUT_S)
FRESH_START_TIMEOUT_S = float(os.environ.get("HEADSTART_LS_START_TIMEOUT_S", "240"))


def installed_version(venv: Path) -> str | None:
    executable = venv / "bin" / "label-studio"
    if not executable.exists():
        return None
    # `label-studio version` prints JSON with the version; `--version` would start a server
    completed = subprocess.run([str(executable), "version"], capture_output=True, text=True, timeout=120)
    if completed.returncode != 0:
        return None
    return LABEL_STUDIO_VERSION if f'"{LABEL_STUDIO_VERSION}"' in completed.stdout else None


def ensure_installed(venv: Path = DEFAULT_VENV) -> Path:
    """The `label-studio` executable of `venv`, installing Label Studio there first if needed."""
    if installed_version(venv) == LABEL_STUDIO_VERSION:
        return venv / "bin" / "label-studio"
    python = shutil.which("python3.11") or sys.executable
    print(f"\ninstalling label-studio=={LABEL_STUDIO_VERSION} into {venv} (about 3 minutes)", flush=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    if not (venv / "bin" / "pip").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True, env=env)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"label-studio=={LABEL_STUDIO_VERSION}"],
                   check=True, timeout=INSTALL_TIMEOUT_S, env=env)
    if installed_version(venv) != LABEL_STUDIO_VERSION:
        raise RuntimeError(f"label-studio {LABEL_STUDIO_VERSION} did not install into {venv}")
    return venv / "bin" / "label-studio"


@dataclass(frozen=True)
class LabelStudioCredentials:
    username: str
    password: str
    legacy_token: str


class LabelStudioServer:
    """`label-studio start` with the settings /work/shared/ls-contract.md found necessary."""

    def __init__(self, executable: Path, *, data_dir: Path, documents_root: Path, log_path: Path):
        self.executable = executable
        self.data_dir = data_dir
        self.documents_root = documents_root
        self.port = free_port()
        self.credentials = LabelStudioCredentials(
            username="e2e@headstart.test", password=secrets.token_urlsafe(16), legacy_token=secrets.token_hex(20))
        env = {
            **os.environ,
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": self.credentials.username,
            "LABEL_STUDIO_PASSWORD": self.credentials.password,
            "LABEL_STUDIO_USER_TOKEN": self.credentials.legacy_token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(documents_root),
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LATEST_VERSION_CHECK": "false",  # no PyPI call at start (CI may be offline)
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",  # its default reports errors to Heartex's Sentry
            "FRONTEND_SENTRY_DSN": "",
            "PYTHONUNBUFFERED": "1",
        }
        for inherited in ("DJANGO_DB", "DATABASE_URL", "POSTGRE_HOST", "REDIS_LOCATION", "PYTHONPATH"):
            env.pop(inherited, None)  # its own SQLite database, synchronous jobs, its own packages
        self.process = ManagedProcess(
            "label-studio",
            [str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port)],
            env=env, log_path=log_path, cwd=data_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LabelStudioServer":
        self.process.start()
        wait_until(lambda: http_ok(f"{self.url}/health"), timeout_s=FRESH_START_TIMEOUT_S, interval_s=1.0,
                   what="healthy Label Studio", processes=(self.process,))
        return self

    def stop(self) -> None:
        self.process.stop()

    def add_user(self, email: str) -> str:
        """Create another user of the organization (an annotator) in the running server's database; its legacy
        token. The API cannot: a new user's token is only readable by that user."""
        token = secrets.token_hex(20)
        self.run_in_django(
            "from organizations.models import Organization\n"
            "from rest_framework.authtoken.models import Token\n"
            "from users.models import User\n"
            "user = User.objects.create_user(email=sys.argv[1], password=sys.argv[2])\n"
            "org = Organization.objects.first(); org.add_user(user)\n"
            "user.active_organization = org; user.save()\n"
            "Token.objects.filter(user=user).delete(); Token.objects.create(user=user, key=sys.argv[3])\n",
            email, secrets.token_urlsafe(16), token)
        return token

    def run_in_django(self, code: str, *args: str) -> str:
        """Run `code` in Label Studio's own Python with its Django set up on this server's database (`sys.argv[1:]`
        are `args`); its stdout. For states the API cannot make, such as a user's token."""
        script = ("import os, sys, label_studio\n"
                  "sys.path.insert(0, os.path.dirname(label_studio.__file__))\n"
                  "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'core.settings.label_studio')\n"
                  "import django; django.setup()\n" + code)
        python = self.executable.parent / "python"
        done = subprocess.run([str(python), "-c", script, *args], check=True, env=self.process.env, cwd=self.data_dir,
                              capture_output=True, timeout=300, text=True)
        return done.stdout
