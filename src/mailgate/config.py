"""The operator's settings that are not per mail server: retries, leases, retention, what to do
when sending is disabled. From environment variables (MAILGATE_…), or given in code.

Every variable is listed in `ENV` with its default; the README's configuration table matches it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .errors import SettingsError


@dataclass(frozen=True)
class Config:
    # Submitting while sending is disabled for the tenant: refuse (default) or keep the message
    # as `held` until sending is enabled again.
    hold_when_disabled: bool = False
    # Transient failures: wait retry_base, then retry_factor times longer each time (with jitter),
    # at most retry_max_delay, and give up with `failed` once the message is max_age old.
    retry_base: float = 30.0
    retry_factor: float = 2.0
    retry_max_delay: float = 3600.0
    max_age: float = 86400.0
    # The worker: how many messages it claims at once, how many it sends at once, how long a
    # claim (lease) lasts before another worker may take the message over, how often it looks
    # for work when idle, and how long a stop (SIGTERM) waits for sends under way.
    batch_size: int = 200
    concurrency: int = 50
    # SMTP connections open at once in one worker, across all mail servers (idle ones included);
    # shared fairly between servers when it runs short (sends wait for a connection then).
    max_connections: int = 100
    lease: float = 300.0
    poll_interval: float = 1.0
    stop_grace: float = 30.0
    # A server marked broken (credentials refused): how often its waiting messages look again.
    broken_recheck: float = 300.0
    # Sent messages: their bodies are removed after retention_body, their log lines (message,
    # recipients, attempts) after retention_log. Seconds.
    retention_body: float = 7 * 86400.0
    retention_log: float = 90 * 86400.0
    # Where browsers reach mailgate: the delegated OAuth consent comes back to
    # {public_url}/v1/oauth/callback, which must be registered as the app's redirect URI.
    public_url: str = "http://127.0.0.1:8000"

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int") and not value > 0:
                problems.append((f.name, f"must be greater than 0, not {value!r}"))
        if self.retry_factor < 1:
            problems.append(("retry_factor", "must be at least 1"))
        from .settings.document import _web_url

        try:
            _web_url(self.public_url)
        except ValueError as e:
            problems.append(("public_url", str(e)))
        if self.retention_log < self.retention_body:
            problems.append(("retention_log", "must be at least retention_body"))
        if problems:
            raise SettingsError(problems)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Defaults, overridden by MAILGATE_<FIELD> variables (MAILGATE_MAX_AGE=3600, …)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        problems = []
        for f in fields(cls):
            name = "MAILGATE_" + f.name.upper()
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            try:
                if f.type == "bool":
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    values[f.name] = raw.lower() in ("1", "true", "yes", "on")
                elif f.type == "str":
                    values[f.name] = raw
                elif f.type == "int":
                    values[f.name] = int(raw)
                else:
                    values[f.name] = float(raw)
            except ValueError:
                problems.append((name, f"{raw!r} is not a {f.type}"))
        if problems:
            raise SettingsError(problems)
        return cls(**values)  # type: ignore[arg-type]


ENV = {f"MAILGATE_{f.name.upper()}": f.default for f in fields(Config)}
