"""The operator's settings from the environment: every variable, its type, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate import SettingsError
from mailgate.config import ENV, Config


def test_defaults() -> None:
    config = Config.from_env({})
    assert config == Config()
    assert (config.hold_when_disabled, config.max_age, config.lease) == (False, 86400.0, 300.0)
    assert set(ENV) >= {"MAILGATE_HOLD_WHEN_DISABLED", "MAILGATE_MAX_AGE", "MAILGATE_RETENTION_LOG"}


def test_every_field_reads_from_its_variable() -> None:
    config = Config.from_env({
        "MAILGATE_HOLD_WHEN_DISABLED": "yes", "MAILGATE_RETRY_BASE": "5", "MAILGATE_BATCH_SIZE": "17",
        "MAILGATE_MAX_AGE": "3600.5", "MAILGATE_RETENTION_BODY": "60", "MAILGATE_RETENTION_LOG": "120",
    })  # fmt: skip
    assert config.hold_when_disabled and config.retry_base == 5.0 and config.batch_size == 17
    assert (config.max_age, config.retention_body, config.retention_log) == (3600.5, 60.0, 120.0)


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"MAILGATE_BATCH_SIZE": "many"}, "MAILGATE_BATCH_SIZE"),
        ({"MAILGATE_HOLD_WHEN_DISABLED": "perhaps"}, "MAILGATE_HOLD_WHEN_DISABLED"),
        ({"MAILGATE_LEASE": "0"}, "lease"),
        ({"MAILGATE_RETRY_FACTOR": "0.5"}, "retry_factor"),
        ({"MAILGATE_RETENTION_BODY": "100", "MAILGATE_RETENTION_LOG": "10"}, "retention_log"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], field: str) -> None:
    with pytest.raises(SettingsError) as e:
        Config.from_env(env)
    assert e.value.field == field


def test_a_file_sets_values_and_the_environment_overrides_it(tmp_path: Path) -> None:
    file = tmp_path / "mailgate.toml"
    file.write_text('max_age = 3600\nlisten_port = 9000\nhold_when_disabled = true\ndatabase_url = "sqlite:///x.db"\n')
    config = Config.load(file, {"MAILGATE_LISTEN_PORT": "9100"})
    assert (config.max_age, config.listen_port, config.hold_when_disabled) == (3600.0, 9100, True)
    assert config.database_url == "sqlite:///x.db" and "x.db" not in repr(config)
    assert Config.load(None, {"MAILGATE_CONFIG_FILE": str(file)}).listen_port == 9000


@pytest.mark.parametrize(
    ("content", "field"),
    [("max_agee = 1\n", "max_agee"), ('listen_port = "80"\n', "listen_port"), ("max_age = \n", "config file")],
)
def test_a_bad_file_names_the_problem(tmp_path: Path, content: str, field: str) -> None:
    file = tmp_path / "mailgate.toml"
    file.write_text(content)
    with pytest.raises(SettingsError) as e:
        Config.load(file, {})
    assert e.value.field == field


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="can't be read"):
        Config.load(tmp_path / "nope.toml", {})
