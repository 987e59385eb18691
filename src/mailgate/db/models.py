"""The tables. Schema changes go through Alembic migrations in `migrations/versions/`; a test
checks that the migrations and these models agree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigID = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both databases (SQLite stores them naive; they are UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    # none_as_null: a Python None is SQL NULL (not the JSON value null), so IS NULL finds it.
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON(none_as_null=True),
        list[Any]: JSON(none_as_null=True),
    }
    # Named constraints, so that later migrations can alter them (SQLite needs the names).
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    may_use_own_server: Mapped[bool] = mapped_column(default=False)
    support_address: Mapped[str | None] = mapped_column(String(320))
    may_set_support_address: Mapped[bool] = mapped_column(default=False)
    # Who hears, once, when the tenant's own mail server is marked broken (sent through the global one).
    admin_address: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(default=now)
    updated_at: Mapped[datetime] = mapped_column(default=now)


class MailServerRow(Base):
    """One mail server: the document without its secrets, plus the switch and the version.

    `scope` is "global" or the tenant's id. `version` goes up with every save (enable and disable
    included): pools and caches key on (id, version) and never reuse what an older version made.
    """

    __tablename__ = "mail_servers"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    scope: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), unique=True)
    enabled: Mapped[bool]
    document: Mapped[dict[str, Any]]
    version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=now)
    updated_at: Mapped[datetime] = mapped_column(default=now)
    updated_by: Mapped[str] = mapped_column(String(200))
    # Set when the server refused the credentials (or TLS, or the security settings) for good:
    # its messages wait instead of hammering it. Saving or enabling the server clears it.
    broken_reason: Mapped[str | None] = mapped_column(Text)
    broken_at: Mapped[datetime | None]
    # Credential health, written by workers (at most every few seconds per server): the last send
    # a server accepted, the last failure of the server itself (not a recipient's), the expiry of
    # the access token a worker holds, and when an admin last gave consent (delegated grant).
    last_success_at: Mapped[datetime | None]
    last_failure_at: Mapped[datetime | None]
    last_failure: Mapped[str | None] = mapped_column(Text)
    token_expires_at: Mapped[datetime | None]
    consented_at: Mapped[datetime | None]


class ServerSecret(Base):
    """A secret of a mail server (`field` is its path in the document, e.g. "auth.password"),
    encrypted with Fernet; see settings/secrets.py."""

    __tablename__ = "server_secrets"

    server_id: Mapped[int] = mapped_column(ForeignKey("mail_servers.id", ondelete="CASCADE"), primary_key=True)
    field: Mapped[str] = mapped_column(String(64), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=now)


class ConsentRequest(Base):
    """A delegated-OAuth consent under way: the admin was sent to the authorize URL with `state`;
    the PKCE verifier stays here, encrypted, until the callback brings the code (or it expires).
    Only a hash of the state is kept: the state in the browser is the key."""

    __tablename__ = "consent_requests"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    server_id: Mapped[int] = mapped_column(ForeignKey("mail_servers.id", ondelete="CASCADE"), index=True)
    server_version: Mapped[int]
    verifier: Mapped[str] = mapped_column(Text)
    redirect_uri: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=now)
    expires_at: Mapped[datetime]


class QuotaState(Base):
    """A mail server's rate quota, shared by every worker: the theoretical arrival time (GCRA) of
    the next message (kind "messages_per_minute") or recipient ("recipients_per_day"), in Unix
    seconds. A reservation moves it on by window / limit per unit in one UPDATE."""

    __tablename__ = "quota_state"

    server_id: Mapped[int] = mapped_column(ForeignKey("mail_servers.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    tat: Mapped[float] = mapped_column(Float)


class ConnectionSlot(Base):
    """One of a mail server's `max_concurrent_connections`, shared by every worker: held by a
    worker's open connection until `expires_at` (Unix seconds), renewed while it lives."""

    __tablename__ = "connection_slots"

    server_id: Mapped[int] = mapped_column(ForeignKey("mail_servers.id", ondelete="CASCADE"), primary_key=True)
    slot: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)


class ApiToken(Base):
    """A bearer token of the HTTP API. Only the SHA-256 of the token is kept (it has 256 bits of
    randomness, so a slow hash would add nothing); `prefix` is its first characters, enough to
    tell tokens apart in a list. A tenant's tokens go with the tenant."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=now)
    created_by: Mapped[str] = mapped_column(String(200))
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AdminUser(Base):
    """A person who signs in to the admin UI: a system admin, or the admin of one tenant. Only an
    argon2 hash of the password is kept. A tenant's admins go with the tenant."""

    __tablename__ = "admin_users"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # lower-cased
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=now)
    created_by: Mapped[str] = mapped_column(String(200))
    last_login_at: Mapped[datetime | None]


class AdminSession(Base):
    """A signed-in admin UI session. The cookie carries a random token; only its SHA-256 is kept,
    so signing out (or removing the user) ends the session everywhere at once."""

    __tablename__ = "admin_sessions"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("admin_users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=now)
    last_seen_at: Mapped[datetime] = mapped_column(default=now)
    expires_at: Mapped[datetime]


class SignInAttempt(Base):
    """Sign-ins to the admin UI counted per address, shared by every process: `attempts` within the
    window that began at `window_start` (Unix seconds). A sign-in takes its place here before the
    password is checked, in one statement, so parallel guesses can't all pass a check made before
    any of them failed. The key is the SHA-256 of the lower-cased address as typed: bounded, and a
    password typed into the address field is not kept readable. Rows of windows that have passed
    are deleted as new sign-ins come (accounts.py)."""

    __tablename__ = "sign_in_attempts"

    address_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempts: Mapped[int]
    window_start: Mapped[float] = mapped_column(Float, index=True)


class SystemSetting(Base):
    """The operator's settings that live in the database rather than the environment, one row a
    name (`support_address`: where support requests go when the tenant has no own address).
    `value` is JSON; who changed it is in the audit log."""

    __tablename__ = "system_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(default=now)
    updated_by: Mapped[str] = mapped_column(String(200))


class TemplateOverride(Base):
    """A notification template's text for one scope ("global" or a tenant's id), name and locale,
    in place of the built-in one (notifications/). Deleted with its tenant."""

    __tablename__ = "template_overrides"
    __table_args__ = (UniqueConstraint("scope", "name", "locale"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    scope: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    locale: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    html: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=now)
    updated_by: Mapped[str] = mapped_column(String(200))


class AuditEntry(Base):
    """Who changed what, when. `changes` lists {"field", "from", "to"} for plain fields and
    {"field", "secret": "changed" | "removed"} for secrets, never a secret's value. No foreign
    key: the log outlives the tenants it mentions."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "tenant_id", "at"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=now, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str | None] = mapped_column(String(64))
    scope: Mapped[str | None] = mapped_column(String(64))
    changes: Mapped[list[Any]]


_DUE = text("due_at IS NOT NULL")  # claimable messages only: the index stays small


class MessageRow(Base):
    """A message in the outbox: its state, small enough to be rewritten cheaply at every claim
    and outcome. The body is in MessageBody, attachment bytes in MessageAttachment.

    `due_at` is when a worker may claim it: set for queued and deferred messages (the next
    attempt) and for sending ones (the end of the worker's lease, after which another worker takes
    it over); empty when it is held, sent, failed or cancelled. Claims go by `due_at` alone.
    """

    __tablename__ = "messages"
    __table_args__ = (
        Index(None, "tenant_id", "idempotency_key", unique=True),
        Index("ix_messages_due", "due_at", postgresql_where=_DUE, sqlite_where=_DUE),
        Index(None, "tenant_id", "created_at"),
        Index(None, "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    message_id: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(Text)
    size: Mapped[int]
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=now)
    updated_at: Mapped[datetime] = mapped_column(default=now)
    expires_at: Mapped[datetime]
    due_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    # The lease owner a claim replaced: set only when a worker takes over a message whose
    # previous worker's lease ran out (it may have delivered the message before it died).
    previous_owner: Mapped[str | None] = mapped_column(String(200))
    last_server_id: Mapped[int | None] = mapped_column(BigInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    body_purged_at: Mapped[datetime | None]
    # A place reserved within its server's rate quotas (outbox/quota.py): the message waited for
    # it and is sent then without reserving again. Cleared by the next outcome.
    quota_slot: Mapped[datetime | None]


class MessageBody(Base):
    """The message as `Message.to_dict()` gives it. Removed when the body is purged."""

    __tablename__ = "message_bodies"

    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    content: Mapped[dict[str, Any]]


class MessageRecipient(Base):
    """One envelope recipient of a message and where it stands: pending (to be sent, or tried
    again), accepted, or failed. Accepted recipients are never sent to again."""

    __tablename__ = "message_recipients"

    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    address: Mapped[str] = mapped_column(String(320), index=True)
    status: Mapped[str] = mapped_column(String(16))
    code: Mapped[int | None]
    enhanced: Mapped[str | None] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)


class MessageAttachment(Base):
    __tablename__ = "message_attachments"

    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class AttemptRow(Base):
    """One try at delivering a message: when, through which server (and settings version), how
    long, what the server said — per recipient in `results` — and a note when something about
    the attempt needs saying (a lease taken over: the message may have been delivered before)."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]
    worker: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime]
    duration_ms: Mapped[int]
    server_scope: Mapped[str | None] = mapped_column(String(64))
    server_id: Mapped[int | None] = mapped_column(BigInteger)
    server_version: Mapped[int | None]
    server: Mapped[str | None] = mapped_column(String(300))
    outcome: Mapped[str] = mapped_column(String(16))
    code: Mapped[int | None]
    enhanced: Mapped[str | None] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    results: Mapped[list[Any]]
    note: Mapped[str | None] = mapped_column(Text)


class EventRow(Base):
    """Something a tenant may want to hear of (events.py): a message's outcome, its mail server
    broken or recovered. Written in the transaction of the change it tells of, so none is lost and
    none tells of what did not happen. Ids only grow, in commit order (events.py says how), so
    pollers page by id. No foreign key: an outcome of a tenant being removed must still commit."""

    __tablename__ = "events"
    __table_args__ = (Index(None, "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(32))
    message_pk: Mapped[int | None] = mapped_column(BigInteger)
    server_scope: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=now, index=True)


class WebhookRow(Base):
    """A tenant's webhook: where its events are POSTed, signed (Standard Webhooks). `event_types`
    is the types it takes as ",message.sent,server.broken," (matched with LIKE when events fan
    out: one statement, both databases). The signing secret is encrypted (Fernet); after a
    rotation the previous one also signs until `previous_until`."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[str] = mapped_column(String(300))
    enabled: Mapped[bool]
    secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_until: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)  # set when mailgate switched it off (410 Gone)
    created_at: Mapped[datetime] = mapped_column(default=now)
    created_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=now)


_PENDING_DELIVERY = text("next_at IS NOT NULL")


class WebhookDelivery(Base):
    """One event to one webhook: pending (`next_at`: when it is due, or the end of a sender's
    lease), delivered, or failed (gave up after the maximum age, or the webhook went away);
    with the last response's status code and a short, cleaned excerpt of its body."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "event_id"),
        Index("ix_webhook_deliveries_due", "next_at", postgresql_where=_PENDING_DELIVERY,
              sqlite_where=_PENDING_DELIVERY),
    )  # fmt: skip

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(default=0)
    next_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=now)
    last_at: Mapped[datetime | None]
    last_code: Mapped[int | None]
    last_response: Mapped[str | None] = mapped_column(Text)
