"""The `headstart` command's own edges: where `up` listens, and the warning when nothing guards the routes."""

from __future__ import annotations

import logging

import pytest

from backend import cli
from backend.common.settings import Settings


def test_up_listens_on_this_host_only_unless_told_otherwise(monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "up", lambda settings, args: seen.setdefault("host", args.host) and 0)
    cli.main(["up"])
    assert seen["host"] == "127.0.0.1"
    seen.clear()
    cli.main(["up", "--host", "0.0.0.0"])
    assert seen["host"] == "0.0.0.0"


@pytest.mark.parametrize("host, where", [("0.0.0.0", "from any address"), ("127.0.0.1", "from this host only")])
def test_serving_without_basic_auth_says_how_to_turn_it_on(caplog, host, where):
    with caplog.at_level(logging.WARNING, logger="headstart"):
        cli.warn_if_open(Settings(), host, 9090)
    (record,) = caplog.records
    assert where in record.getMessage() and "Set BASIC_AUTH_USER and BASIC_AUTH_PASS" in record.getMessage()
    caplog.clear()
    cli.warn_if_open(Settings(basic_auth_user="ls", basic_auth_pass="secret"), host, 9090)
    assert caplog.records == []
