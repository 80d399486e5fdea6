"""Session fixtures for the end-to-end suite: a real Label Studio 1.23.2, a redis-server of our own,
and headstart's backend and worker as separate processes started by their CLI.

Everything lives under one temporary directory that is deleted at the end (set
HEADSTART_E2E_KEEP=1 to keep it, logs included). Every process is stopped on teardown, at
interpreter exit, and, through PR_SET_PDEATHSIG, if pytest itself is killed. When a test fails,
the tails of all process logs are attached to its report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e.backend_pair import HeadstartPair
from tests.e2e.label_studio_server import LabelStudioServer, ensure_installed
from tests.e2e.ls_api import LabelStudioApi
from tests.e2e.processes import ManagedProcess
from tests.helpers import RedisServer

PROCESSES = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[PROCESSES] = []


def register(config, *processes: ManagedProcess) -> None:
    config.stash[PROCESSES].extend(processes)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and item.get_closest_marker("e2e"):
        for process in item.config.stash.get(PROCESSES, []):
            report.sections.append((f"log of {process.name}", process.report(80)))
    return report


@pytest.fixture(scope="session")
def e2e_root():
    root = Path(tempfile.mkdtemp(prefix="headstart-e2e-"))
    yield root
    if os.environ.get("HEADSTART_E2E_KEEP") == "1":
        print(f"\nkept the e2e data and logs in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def documents_root(e2e_root) -> Path:
    """LOCAL_FILES_DOCUMENT_ROOT for Label Studio and headstart alike."""
    path = e2e_root / "documents"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def label_studio(e2e_root, documents_root, pytestconfig):
    executable = ensure_installed()
    data_dir = e2e_root / "label-studio"
    data_dir.mkdir()
    server = LabelStudioServer(executable, data_dir=data_dir, documents_root=documents_root,
                               log_path=e2e_root / "logs" / "label-studio.log")
    register(pytestconfig, server.process)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ls_api(label_studio) -> LabelStudioApi:
    """The admin user's client, authenticated with its legacy token."""
    return LabelStudioApi(label_studio.url, label_studio.credentials.legacy_token)


@pytest.fixture(scope="session")
def e2e_redis():
    server = RedisServer(appendonly=False).start()
    try:
        yield server
    finally:
        server.cleanup()


def start_pair(pytestconfig, name: str, **kwargs) -> HeadstartPair:
    pair = HeadstartPair(name, **kwargs)
    register(pytestconfig, *pair.processes)
    try:
        return pair.start()
    except BaseException:
        pair.stop()
        raise


@pytest.fixture(scope="session")
def headstart(label_studio, e2e_redis, documents_root, e2e_root, pytestconfig):
    """The backend and worker configured with the admin's legacy token, on Redis database 0."""
    pair = start_pair(pytestconfig, "legacy", redis_url=f"redis://127.0.0.1:{e2e_redis.port}/0",
                      label_studio_url=label_studio.url, api_key=label_studio.credentials.legacy_token,
                      documents_root=documents_root, log_dir=e2e_root / "logs")
    try:
        yield pair
    finally:
        pair.stop()
