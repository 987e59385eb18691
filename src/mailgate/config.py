"""The operator's settings that are not per mail server: retries, leases, retention, what to do
when sending is disabled, where the API listens. From an optional TOML file
($MAILGATE_CONFIG_FILE or `mailgate --config FILE`, keys as the field names below), overridden by
environment variables (MAILGATE_<FIELD>), or given in code.

Every variable is listed in `ENV` with its default; the README's configuration table matches it.
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SettingsError

if TYPE_CHECKING:
    from .destinations import Destinations


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
    # A server marked broken (credentials refused): how often its waiting messages look again, and
    # whether the tenant's admin address is told (once, through the global server).
    broken_recheck: float = 300.0
    notify_broken: bool = True
    # Sent messages: their bodies are removed after retention_body, their log lines (message,
    # recipients, attempts) after retention_log. Seconds.
    retention_body: float = 7 * 86400.0
    retention_log: float = 90 * 86400.0
    # Where browsers reach mailgate: the delegated OAuth consent comes back to
    # {public_url}/v1/oauth/callback, which must be registered as the app's redirect URI.
    public_url: str = "http://127.0.0.1:8000"
    # `mailgate serve`: the address and port the API listens on, and the largest request body it
    # reads (bytes; a 35 MB message with base64 attachments is about 47 MB of JSON).
    listen_host: str = "127.0.0.1"
    listen_port: int = 8000
    max_request_size: int = 50 * 1024 * 1024
    # The SMTP submission ingress (`mailgate serve --smtp-port`, ingress.py): its TLS certificate
    # and key (PEM files; STARTTLS is required before AUTH), the connections it serves at once
    # (from one client address: an IPv6 client by its /64), and the messages a second one API
    # token may submit through it (bursts of twice that).
    smtp_cert: str = ""
    smtp_key: str = ""
    smtp_max_connections: int = 100
    smtp_max_connections_per_address: int = 10
    smtp_token_rate: float = 50.0
    # Where mail servers may make mailgate connect besides public addresses (destinations.py):
    # tenants' own servers nowhere else by default, the global server (the operator's) also to
    # loopback and private networks. CIDRs and the words loopback, private, link-local, any.
    tenant_networks: str = ""
    global_networks: str = "loopback,private"
    # The database, when neither --database-url nor $MAILGATE_DATABASE_URL names one (it may
    # hold a password: never shown).
    database_url: str = field(default="", repr=False)

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
        if not 0 < self.listen_port < 65536:
            problems.append(("listen_port", f"is a TCP port, 1-65535, not {self.listen_port}"))
        from .destinations import parse_networks

        for name in ("tenant_networks", "global_networks"):
            try:
                parse_networks(getattr(self, name), setting=name)
            except SettingsError as e:
                problems += e.problems
        if self.retention_log < self.retention_body:
            problems.append(("retention_log", "must be at least retention_body"))
        if problems:
            raise SettingsError(problems)

    @functools.cached_property
    def destinations(self) -> Destinations:
        """The destination policy of tenants' servers and of the global server."""
        from .destinations import Destinations

        return Destinations.from_settings(self.tenant_networks, self.global_networks)

    @classmethod
    def load(cls, file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
        """Defaults, overridden by the TOML file (`file`, else $MAILGATE_CONFIG_FILE, if any),
        overridden by MAILGATE_<FIELD> variables."""
        environ = os.environ if environ is None else environ
        file = file or environ.get(ENV_FILE) or None
        base: dict[str, object] = {}
        if file is not None:
            base = _read_file(Path(file))
        return cls.from_env(environ, base)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, base: Mapping[str, object] | None = None) -> Config:
        """Defaults (or `base`), overridden by MAILGATE_<FIELD> variables (MAILGATE_MAX_AGE=3600, …)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = dict(base or {})
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


ENV_FILE = "MAILGATE_CONFIG_FILE"
ENV = {f"MAILGATE_{f.name.upper()}": f.default for f in fields(Config)}


def _read_file(path: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError([("config file", f"{path} can't be read: {e.strerror or e}")]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError([("config file", f"{path} is not valid TOML: {e}")]) from None
    types = {f.name: f.type for f in fields(Config)}
    problems = []
    for key, value in data.items():
        kind = types.get(key)
        if kind is None:
            problems.append((key, f"is not a setting (in {path}); the settings are: {', '.join(types)}"))
        elif not _fits(value, str(kind)):
            problems.append((key, f"is a {kind}, not {value!r} (in {path})"))
    if problems:
        raise SettingsError(problems)
    return {k: float(v) if types[k] == "float" else v for k, v in data.items()}


def _fits(value: object, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)
