"""The operator's settings from the environment: every variable, its type, and clear errors."""

from __future__ import annotations

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
