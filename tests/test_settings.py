"""Settings are read once from the environment, with defaults and errors that name the variable."""

from __future__ import annotations

import pytest

from backend.common.errors import ConfigurationError
from backend.common.settings import SETTINGS, Settings


def test_defaults_match_the_table():
    defaults = Settings.from_env({})
    assert defaults == Settings()
    for setting in SETTINGS:
        assert getattr(defaults, setting.field) == setting.parse(setting.default), setting.env


def test_values_are_parsed():
    settings = Settings.from_env({"TORCH_THREADS": "2", "REPREDICT_UNLABELED": "off",
                                  "MEDIA_ALLOWED_HOSTS": "a.example, B.example", "MEDIA_TIMEOUT_S": "2.5"})
    assert settings.torch_threads == 2 and settings.repredict_unlabeled is False
    assert settings.media_allowed_hosts == ("a.example", "b.example") and settings.media_timeout_s == 2.5


def test_a_bad_value_names_the_variable_and_its_meaning():
    with pytest.raises(ConfigurationError, match="TORCH_THREADS='many'.*Torch CPU threads"):
        Settings.from_env({"TORCH_THREADS": "many"})


@pytest.mark.parametrize("environ, named", [
    ({"BASIC_AUTH_USER": "ls"}, "BASIC_AUTH_PASS"),
    ({"BASIC_AUTH_PASS": "secret"}, "BASIC_AUTH_USER"),
    ({"ADMIN_TOKEN": "short"}, "ADMIN_TOKEN"),
])
def test_settings_that_would_weaken_access_control_are_refused(environ, named):
    with pytest.raises(ConfigurationError, match=named):
        Settings.from_env(environ)
    assert Settings.from_env({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "secret",
                              "ADMIN_TOKEN": "x" * 16}).basic_auth_pass == "secret"
