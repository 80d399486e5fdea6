"""Finding Redis: an explicit URL, the local one, or an embedded redis-server."""

from __future__ import annotations

import pytest

from backend.common.errors import StoreUnavailable
from backend.common.redis_conn import connect, ensure_redis, ping
from tests.helpers import free_port


def test_an_explicit_url_is_used_when_it_answers(redis_url):
    assert ensure_redis(redis_url) == redis_url


def test_an_explicit_url_that_does_not_answer_is_an_error_that_names_it():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreUnavailable, match="REDIS_URL=.*does not answer"):
        ensure_redis(dead)


def test_without_a_url_or_a_local_redis_an_embedded_one_is_started(tmp_path):
    url = ensure_redis("", local_url=f"redis://127.0.0.1:{free_port()}/0")
    assert url != "" and ping(url)
    client = connect(url)
    client.set("headstart:probe", "1")
    assert client.get("headstart:probe") == b"1"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    client.shutdown(nosave=True)
