"""What the SDK's own processes read from the environment, all through ``ClientSettings``."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.base_models import default_cache_dir
from producer.settings import client_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRAINQ_REDIS_URL", "REDIS_URL", "TRAINQ_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)


def test_the_command_line_finds_a_stack_through_trainq_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert client_settings().redis_url is None
    monkeypatch.setenv("TRAINQ_REDIS_URL", "rediss://:secret@redis:6380/1")
    assert client_settings().redis_url == "rediss://:secret@redis:6380/1"


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINQ_REDIS_URL", "")
    monkeypatch.setenv("REDIS_URL", "")
    settings = client_settings()
    assert settings.redis_url is None
    assert settings.local_redis_url is None


def test_a_bad_redis_url_fails_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINQ_REDIS_URL", "localhost:6379")
    with pytest.raises(ValueError, match="TRAINQ_REDIS_URL"):
        client_settings()


def test_the_local_backend_takes_redis_url_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "unix:///run/redis.sock")
    assert client_settings().local_redis_url == "unix:///run/redis.sock"


def test_the_cache_is_trainq_cache_dir_else_under_xdg_cache_home_else_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "trainq"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "trainq"
    monkeypatch.setenv("TRAINQ_CACHE_DIR", "~/mine")
    assert default_cache_dir() == tmp_path / "home" / "mine"


def test_trainq_status_stops_at_a_bad_trainq_redis_url_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from producer.cli import main

    monkeypatch.setenv("TRAINQ_REDIS_URL", "localhost:6379")
    with pytest.raises(SystemExit, match="TRAINQ_REDIS_URL"):
        main(["status", "--path", str(tmp_path)])
