"""The dependency direction of the code base, checked on every import statement (module level or not).

    backend.common      settings, errors, Redis keys and connections, queues, metrics: imports no other part
    backend.core        the torch-only core: may import backend.common, never Flask, RQ or Label Studio
    backend.labelstudio the Label Studio adapters: may import backend.common
    backend.loop        features, prediction, the retrain pipeline and `Services` (the wiring of one
                        process's collaborators): core + labelstudio + common
    backend.admin       admin views and actions (and the /admin blueprint): the above
    backend.server      the HTTP layer: all of the above; only its /admin routes import backend.admin
    worker              the RQ jobs and worker process: may import backend, never backend.server or backend.cli
    backend.cli         the command-line edge that starts both halves: may import anything

Nothing outside tests/ imports tests/, and backend never imports worker (jobs are enqueued by name).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("backend", "worker", "bench", "tests")

ALLOWED: dict[str, tuple[str, ...]] = {
    "backend.common": ("backend.common",),
    "backend.core": ("backend.core", "backend.common"),
    "backend.labelstudio": ("backend.labelstudio", "backend.common"),
    "backend.loop": ("backend.loop", "backend.core", "backend.labelstudio", "backend.common"),
    "backend.admin": ("backend.admin", "backend.loop", "backend.core", "backend.labelstudio",
                      "backend.common"),
    "backend.server": ("backend.server", "backend.loop", "backend.core", "backend.labelstudio",
                       "backend.common"),
    # the Label Studio routes and the webhook never touch the admin; only /admin's own routes do
    "backend.server.admin_routes": ("backend.server", "backend.admin", "backend.loop", "backend.core",
                           "backend.labelstudio", "backend.common"),
    "worker": ("worker", "backend.loop", "backend.core", "backend.labelstudio",
               "backend.common"),
    "backend.cli": ("backend", "worker"),
    "bench": ("bench", "backend", "worker"),
    "tests": OURS,
}
# third-party packages a layer must not touch, whatever it imports of ours
FORBIDDEN_THIRD_PARTY = {
    "backend.core": ("flask", "werkzeug", "rq", "label_studio_sdk", "requests"),
    "backend.common": ("flask", "werkzeug", "torch", "torchvision", "label_studio_sdk"),
    "backend.labelstudio": ("flask", "werkzeug", "rq", "torch", "torchvision"),
    "backend.loop": ("flask", "werkzeug", "rq"),
    "worker": ("flask", "werkzeug"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, layers) -> str | None:
    matches = [layer for layer in layers if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, module) for every import in the file of `module`, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def source_files() -> list[Path]:
    return sorted(path for top in OURS for path in (REPO / top).rglob("*.py") if "__pycache__" not in path.parts)


def violations(files: list[Path], *, names: dict[Path, str] | None = None) -> list[str]:
    """One line per import that breaks the direction; `names` gives a file another module name (for the self-test)."""
    problems = []
    for path in files:
        module = (names or {}).get(path) or module_name(path)
        source = layer_of(module, ALLOWED)
        if source is None:
            continue
        broken_lines = set()
        for line, target in imported_modules(path, module):
            top = target.split(".")[0]
            if line in broken_lines:
                continue
            if top in OURS:
                if layer_of(target, ALLOWED) is None or any(
                        target == allowed or target.startswith(allowed + ".") for allowed in ALLOWED[source]):
                    continue
                reason = f"{source} may import only {', '.join(ALLOWED[source])}"
            elif top in FORBIDDEN_THIRD_PARTY.get(layer_of(module, FORBIDDEN_THIRD_PARTY) or "", ()):
                reason = f"{source} must not use {top}"
            else:
                continue
            broken_lines.add(line)
            problems.append(f"{module} line {line} imports {target} ({reason})")
    return problems


def test_every_import_follows_the_dependency_direction():
    files = source_files()
    assert len(files) > 50  # the walk found the code base
    assert violations(files) == []


@pytest.mark.parametrize("statement, layer", [
    ("from worker.jobs import train_project", "backend/server/contract.py"),
    ("import worker.process", "backend/admin/actions.py"),
    ("from backend.admin.views import models", "backend/server/contract.py"),
    ("from backend.server.app import create_app", "worker/jobs.py"),
    ("from tests.helpers import CONFIG_2", "bench/data.py"),
    ("import flask", "backend/core/heads.py"),
    ("from backend.labelstudio.client import make_client", "backend/core/store.py"),
])
def test_a_wrong_import_is_caught(tmp_path, statement, layer):
    """The check itself fails on a backend → worker import (and the other wrong directions)."""
    real = REPO / layer
    planted = tmp_path / real.name
    planted.write_text(real.read_text() + f"\n{statement}\n")
    assert violations([real]) == []
    found = violations([planted], names={planted: module_name(real)})
    assert len(found) == 1 and statement.split()[1] in found[0]
