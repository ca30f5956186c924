"""Settings: declared once, resolved from defaults < file < env < CLI, validated, documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from acm_module.core import settings
from acm_module.core.errors import ConfigError

pytestmark = pytest.mark.timeout(10)


def test_defaults_match_the_seed() -> None:
    s = settings.load(env={})
    assert (s.threshold, s.window, s.mode, s.block_ttl) == (5, 5.0, "block", 0.0)


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    f = tmp_path / "acm.toml"
    f.write_text("[detection]\nthreshold = 6\nwindow = 3.5\n[service]\nworkers = 3\n")
    s = settings.load(f, env={"ACM_DETECTION_THRESHOLD": "8"}, cli={"workers": "4"})
    assert (s.threshold, s.window, s.workers) == (8, 3.5, 4)
    assert s.source["threshold"] == "env:ACM_DETECTION_THRESHOLD"
    assert s.source["window"] == f"file:{f}"
    assert s.source["workers"] == "cli"


def test_seed_env_vars() -> None:
    env = {"DRAGONFLY_URL": "redis://df:6379/0", "DATABASE_URL": "postgres://u@h/db",
           "QUESTDB_URL": "http::addr=q:9000;", "CLICKHOUSE_URL": "http://ch:8123",
           "ACM_DETECTION_THRESHOLD": "5", "ACM_DETECTION_WINDOW_SECONDS": "5"}
    s = settings.load(env=env)
    assert s.store == "redis://df:6379/0" and s.database_url == "postgres://u@h/db"
    assert s.questdb_url == "http::addr=q:9000;" and s.clickhouse_url == "http://ch:8123"


@pytest.mark.parametrize(("env", "message"), [
    ({"ACM_DETECTION_THRESHOLD": "1"}, "threshold"),
    ({"ACM_DETECTION_THRESHOLD": "five"}, "threshold"),
    ({"ACM_DETECTION_WINDOW_SECONDS": "nan"}, "window"),
    ({"ACM_MODE": "panic"}, "mode"),
    ({"ACM_ENDPOINT": "http://x"}, "endpoint"),
    ({"ACM_DETECTION_WINDOW_SECONDS": "60"}, "dedup_ttl"),
])
def test_invalid_values_are_refused_with_the_setting_named(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings.load(env=env)


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "acm.toml"
    f.write_text("treshold = 6\n")
    with pytest.raises(ConfigError, match="treshold"):
        settings.load(f, env={})


def test_markdown_table_lists_every_setting() -> None:
    table = settings.markdown_table()
    for s in settings.SETTINGS:
        assert f"`{s.name}`" in table


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("workers", "lots", "workers: must be an integer (got 'lots')"),
    ("workers", [4], "workers: must be an integer (got [4])"),
    ("workers", 2.5, "workers: must be an integer"),
    ("workers", True, "workers: must be an integer"),
    ("window", "soon", "window: must be a number (got 'soon')"),
    ("window", "inf", "window: must be a finite number"),
    ("window", {"s": 5}, "window: must be a number"),
])
def test_numbers_are_refused_in_the_words_mi_uses(name: str, raw: object, message: str) -> None:
    # A setting (file, env, CLI, acm_set) and an MI command's number parameter are parsed by
    # the same settings.coerce, so a bad number reads the same wherever it is given.
    with pytest.raises(ConfigError) as e:
        settings.BY_NAME[name].parse(raw)
    assert str(e.value).startswith(message)


def test_the_live_config_takes_the_declared_types() -> None:
    from acm_module.core import liveconfig

    assert liveconfig.parse_read([b"1", b'{"threshold": "7", "window": 3, "mode": "monitor",'
                                        b' "not_a_setting": 1}']) == (
        1, {"threshold": 7, "window": 3.0, "mode": "monitor"})
