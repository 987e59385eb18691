"""Support requests: a tenant's admin (or its application) writes to support, and mailgate sends
it through the tenant's outbox like any message, with what support needs to know attached: the
system information (`mailgate-system-info.json`, and a short summary under the text).

Routing: the tenant's own support address when it has one and may set it, else the global one
(a system setting, settings/system.py); neither: NoSupportAddress.

The system information never holds a secret: it is made only from what the settings store shows
(the public document, secrets as {"set": true}), the servers' health, this tenant's queue counts
and its last problems. The servers are resolved without decrypting anything (`secrets=False`), so
no secret is ever in memory here to leak. Of the messages it holds neither subjects, bodies nor
recipient lists (those are the tenant's users' data, and support needs none of them to read a
failure): the number of recipients by status, and the servers' replies with every address's
local part masked (`…@example.com`) — the domain stays, since a failure often depends on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import func, select

from .db.models import AttemptRow, MessageRecipient, MessageRow
from .errors import Conflict, MessageError
from .message import Address, Attachment, Message, forbidden_character

if TYPE_CHECKING:
    from .service import Mailgate
    from .settings.store import ServerHealth, TenantInfo

MAX_SUBJECT = 200
MAX_TEXT = 20_000
MAX_PROBLEMS = 20  # the tenant's last failed, deferred or held messages
MAX_REPLY = 500  # characters of a server's reply or an explanation, each
MAX_VALUE = 1_000  # characters of any other text in the attachment (a CA bundle is left out)
MAX_ATTACHMENT = 128 * 1024  # bytes of JSON: problems are left out, oldest first, to stay below
ATTACHMENT_NAME = "mailgate-system-info.json"
PROBLEM_STATUSES = ("failed", "deferred", "held")
_LOCAL_PART = re.compile(r"[^\s<>@\"'(),;:\[\]]+@(?=[A-Za-z0-9\[])")


class NoSupportAddress(Conflict):
    """Neither the tenant nor the system has a support address (API: 409 no_support_address)."""


@dataclass(frozen=True)
class SupportRoute:
    """Where a tenant's support requests go: its own support address ("tenant") or the global one."""

    address: str
    source: Literal["tenant", "global"]


@dataclass(frozen=True)
class SupportRequest:
    """A support request stored in the outbox: the message's id and status, where it goes (the
    kind of address, not the address), the server it is sent through, and a warning when that
    server is known not to work (the request then waits like every message of the tenant)."""

    id: int
    tenant: str
    status: str
    routed_to: Literal["tenant", "global"]
    sends_through: str | None
    system_info_attached: bool
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "status": self.status,
            "routed_to": self.routed_to,
            "sends_through": self.sends_through,
            "system_info_attached": self.system_info_attached,
            "warning": self.warning,
        }


async def support_route(mg: Mailgate, tenant: TenantInfo) -> SupportRoute:
    """The tenant's support address when it is set and the tenant may set it, else the global one."""
    if tenant.support_address and tenant.may_set_support_address:
        return SupportRoute(tenant.support_address, "tenant")
    address = (await mg.system.get()).support_address
    if address:
        return SupportRoute(address, "global")
    raise NoSupportAddress([("support_address", (
        f"no support address to send to: {tenant.id} has none of its own (or may not set one) and no global "
        "support address is set (a system admin sets it: mailgate system set --support-address, or "
        "PATCH /v1/system-settings)"
    ))])  # fmt: skip


def check_request(subject: str, text: str, reply_to: str | None) -> tuple[str, str, Address | None]:
    """The request's fields, bounded and checked: MessageError names every field at fault."""
    problems: list[tuple[str, str]] = []
    if not isinstance(subject, str) or not subject.strip():
        problems.append(("subject", "is required"))
    elif len(subject) > MAX_SUBJECT:
        problems.append(("subject", f"is {len(subject):,} characters; at most {MAX_SUBJECT}"))
    elif (why := forbidden_character(subject)) is not None:
        problems.append(("subject", why))
    if not isinstance(text, str) or not text.strip():
        problems.append(("text", "is required"))
    elif len(text) > MAX_TEXT:
        problems.append(("text", f"is {len(text):,} characters; at most {MAX_TEXT:,}"))
    elif (why := forbidden_character(text, body=True)) is not None:
        problems.append(("text", why))
    address = None
    if reply_to is not None and reply_to.strip():
        if (why := forbidden_character(reply_to)) is not None:
            problems.append(("reply_to", why))
        else:
            try:
                address = Address.parse(reply_to.strip())
            except ValueError as e:
                problems.append(("reply_to", f"{reply_to!r} is not a valid address: {e}"))
    if problems:
        raise MessageError(problems)
    return subject.strip(), text, address


async def send_support_request(
    mg: Mailgate,
    tenant_id: str,
    *,
    subject: str,
    text: str,
    reply_to: str | None = None,
    attach_system_info: bool = True,
) -> SupportRequest:
    """Compose the request and store it in `tenant_id`'s outbox (the worker sends it through the
    tenant's mail server, as resolved for every message). Reply-To: `reply_to`, else the tenant's
    admin address."""
    subject, text, reply = check_request(subject, text, reply_to)
    tenant = await mg.tenants.get(tenant_id)
    route = await support_route(mg, tenant)
    if reply is None and tenant.admin_address:
        reply = Address(tenant.admin_address)
    resolution = await mg.servers.resolve(tenant_id, secrets=False)
    body = text.rstrip() + "\n\n-- \n" + f"Support request for {_named(tenant)}, sent by mailgate"
    body += f" for {mg.actor}.\n" if mg.actor else ".\n"
    attachments = []
    if attach_system_info:
        info = await system_information(mg, tenant_id)
        body += "\n" + summary(info)
        attachments.append(Attachment(ATTACHMENT_NAME, "application/json", attachment_bytes(info)))
    message = Message(
        to=route.address, reply_to=[reply] if reply is not None else None,
        subject=f"[mailgate support] {_named(tenant)}: {subject}", text=body, attachments=attachments,
        headers={"X-Mailgate-Tenant": tenant.id},
    )  # fmt: skip
    done = await mg.accept(tenant_id, message)
    warning = None
    if resolution.broken_reason:
        warning = (f"the mail server {tenant_id} sends through ({resolution.source}) is marked broken, so this "
                   "request waits with the tenant's other mail until the server is fixed: "
                   f"{_cut(resolution.broken_reason, MAX_REPLY)}")  # fmt: skip
    elif done.status == "held":
        warning = f"sending is disabled ({resolution.reason}): this request is held until it is enabled"
    return SupportRequest(done.id, tenant_id, done.status, route.source, resolution.source, attach_system_info,
                          warning)  # fmt: skip


# ---- the system information ----------------------------------------------------------------------


async def system_information(mg: Mailgate, tenant_id: str) -> dict[str, Any]:
    """What support needs to know about `tenant_id`'s mail, as the attachment holds it."""
    from . import __version__

    tenant = await mg.tenants.get(tenant_id)
    resolution = await mg.servers.resolve(tenant_id, secrets=False)
    own = await mg.servers.get(tenant_id)
    glob = await mg.servers.get("global")
    own_health = await mg.servers.health(tenant_id) if own is not None else None
    glob_health = await mg.servers.health("global") if glob is not None else None
    through = own if resolution.source == "tenant" else glob if resolution.source == "global" else None
    rule = {None: 1, "tenant": 2, "global": 3}[resolution.source]
    info: dict[str, Any] = {
        "mailgate": {"version": __version__},
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "requested_by": mg.actor,
        "tenant": {
            "id": tenant.id,
            "name": tenant.name,
            "may_use_own_server": tenant.may_use_own_server,
            "may_set_support_address": tenant.may_set_support_address,
        },
        "resolution": {
            "sends_through": resolution.source,
            "rule": rule,
            "why": resolution.reason,
            "server": _server_facts(through.document, resolution.source) if through is not None else None,
            "version": resolution.version,
            "broken": resolution.broken_reason is not None,
        },
        "servers": {
            # The tenant's own server is the tenant's to see whole (secrets as {"set": …}); of
            # the operator's global one, only what the tenant's message log shows already.
            "own": {"document": _bounded(own.document), "health": _health(own_health)} if own else None,
            "global": {**_server_facts(glob.document, "global"), "health": _operators(_health(glob_health))}
            if glob
            else None,
        },
        "queue": await _queue(mg, tenant_id),
        "recent_problems": await _problems(mg, tenant_id),
    }
    return info


def attachment_bytes(info: dict[str, Any]) -> bytes:
    """The attachment, at most MAX_ATTACHMENT bytes: the oldest problems go first if it would not fit."""
    while True:
        data = json.dumps(info, indent=2, ensure_ascii=False).encode()
        problems = info.get("recent_problems") or []
        if len(data) <= MAX_ATTACHMENT or not problems:
            return data
        info = {**info, "recent_problems": problems[:-1], "recent_problems_left_out": info.get(
            "recent_problems_left_out", 0) + 1}  # fmt: skip


def summary(info: dict[str, Any]) -> str:
    """A few lines for the message's text: what the attachment says, in short."""
    r = info["resolution"]
    server = r["server"] or {}
    lines = ["System information (all of it in the attached " + ATTACHMENT_NAME + "):"]
    lines.append(f"  mailgate {info['mailgate']['version']}, at {info['generated_at']}")
    lines.append(f"  Tenant: {info['tenant']['name']} ({info['tenant']['id']})")
    where = {"tenant": "its own mail server", "global": "the global mail server"}.get(r["sends_through"] or "")
    lines.append(f"  Sends through: {where or 'nothing (sending is disabled)'} — rule {r['rule']}: {r['why']}")
    if server:
        lines.append(f"  Server: {server.get('kind')} {server.get('host') or ''}".rstrip())
    health = ((info["servers"].get("own") if r["sends_through"] == "tenant" else info["servers"].get("global"))
              or {}).get("health")  # fmt: skip
    if health:
        lines.append(f"  Server status: {health['status']}")
        if health.get("broken"):
            lines.append(f"  Marked broken: {health['broken']['reason']}")
        if health.get("last_failure"):
            lines.append(f"  Last failure: {health['last_failure']['text']}")
    counts = ", ".join(f"{k} {v}" for k, v in info["queue"].items() if v)
    lines.append(f"  Messages: {counts or 'none'}")
    problems = info["recent_problems"]
    lines.append(f"  Recent problems: {len(problems)}")
    for p in problems[:3]:
        lines.append(f"    #{p['id']} {p['status']}: {p['last_error'] or '—'}")
    return "\n".join(lines) + "\n"


def _server_facts(document: dict[str, Any], scope: str | None) -> dict[str, Any]:
    """Which server, in a line: its scope, kind and the host it talks to (no identifier, no secret)."""
    from .destinations import host_of

    kind = str(document.get("kind") or "smtp")
    host: str | None = None
    smtp, graph, ews = document.get("smtp") or {}, document.get("graph") or {}, document.get("ews") or {}
    if kind == "smtp" and smtp:
        host = f"{smtp.get('host')}:{smtp.get('port') or 'default port'} ({smtp.get('security')})"
    elif kind == "graph":
        host = host_of(graph.get("endpoint")) or "graph.microsoft.com"
    elif kind == "ews":
        host = host_of(ews.get("url")) or ("autodiscover" if ews.get("autodiscover") else None)
    auth = document.get("auth") or {}
    facts: dict[str, Any] = {"scope": scope, "kind": kind, "host": host, "enabled": document.get("enabled")}
    if auth.get("method"):
        facts["auth"] = auth.get("method")
        token = auth.get("token") or {}
        if auth.get("method") == "oauth2" and token:
            facts["token"] = {"grant": token.get("grant"), "provider": token.get("provider")}
    return facts


def _health(health: ServerHealth | None) -> dict[str, Any] | None:
    if health is None:
        return None
    out = health.to_dict()
    if out.get("broken"):
        out["broken"]["reason"] = _cut(_masked(out["broken"]["reason"] or ""), MAX_REPLY)
    if out.get("last_failure"):
        out["last_failure"]["text"] = _cut(_masked(out["last_failure"]["text"] or ""), MAX_REPLY)
    return out


OPERATORS_TEXT = "(the operator's: shown in the global server's health, not to a tenant)"


def _operators(health: dict[str, Any] | None) -> dict[str, Any] | None:
    """The global server's health without its texts: a broken reason or a failure is the
    operator's (its host, its account) or another tenant's message's; the tenant sees the state
    and when (as its events say of the global server: only that it is broken)."""
    if health is None:
        return None
    if health.get("broken"):
        health["broken"]["reason"] = OPERATORS_TEXT
    if health.get("last_failure"):
        health["last_failure"]["text"] = OPERATORS_TEXT
    return health


async def _queue(mg: Mailgate, tenant_id: str) -> dict[str, int]:
    """This tenant's messages by status (never another tenant's)."""
    from .outbox.store import STATUSES

    M = MessageRow
    async with mg.db.sessions() as s:
        rows = await s.execute(select(M.status, func.count()).where(M.tenant_id == tenant_id).group_by(M.status))
        counts = {status: int(n) for status, n in rows}
    return {status: counts.get(status, 0) for status in STATUSES}


async def _problems(mg: Mailgate, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's last MAX_PROBLEMS failed, deferred or held messages, newest change first, each
    with its last attempt's reply and explanation; no subject, body or recipient address."""
    from .diagnostics.catalogue import explain_smtp_reply

    M, A, R = MessageRow, AttemptRow, MessageRecipient
    query = (select(M).where(M.tenant_id == tenant_id, M.status.in_(PROBLEM_STATUSES))
             .order_by(M.updated_at.desc(), M.id.desc()).limit(MAX_PROBLEMS))  # fmt: skip
    async with mg.db.sessions() as s:
        messages = list((await s.scalars(query)).all())
        pks = [m.id for m in messages]
        last = select(func.max(A.id)).where(A.message_pk.in_(pks)).group_by(A.message_pk)
        attempts = {a.message_pk: a for a in await s.scalars(select(A).where(A.id.in_(last)))} if pks else {}
        counts: dict[int, dict[str, int]] = {}
        if pks:
            grouped = select(R.message_pk, R.status, func.count()).where(R.message_pk.in_(pks))
            for pk, status, n in await s.execute(grouped.group_by(R.message_pk, R.status)):
                counts.setdefault(pk, {})[status] = int(n)
    out = []
    for m in messages:
        a = attempts.get(m.id)
        attempt = None
        if a is not None:
            explanation = a.note
            if explanation is None and a.code is not None and a.outcome not in ("accepted", "quota"):
                explanation = str(explain_smtp_reply(a.code, a.enhanced, a.text or ""))
            attempt = {
                "at": a.started_at.isoformat(), "number": a.number, "outcome": a.outcome,
                "server_scope": a.server_scope, "code": a.code, "enhanced": a.enhanced,
                "reply": _cut(_masked(a.text or ""), MAX_REPLY),
                "explanation": _cut(_masked(explanation), MAX_REPLY) if explanation else None,
            }  # fmt: skip
        out.append({
            "id": m.id, "status": m.status, "created_at": m.created_at.isoformat(),
            "updated_at": m.updated_at.isoformat(), "attempts": m.attempts, "recipients": counts.get(m.id, {}),
            "last_error": _cut(_masked(m.last_error), MAX_REPLY) if m.last_error else None, "last_attempt": attempt,
        })  # fmt: skip
    return out


def _named(tenant: TenantInfo) -> str:
    return tenant.id if tenant.name == tenant.id else f"{tenant.name} ({tenant.id})"


def _masked(text: str) -> str:
    """Every address's local part hidden: `<bob@example.com>` → `<…@example.com>`."""
    return _LOCAL_PART.sub("…@", text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded(value: Any) -> Any:
    """A document with every text cut to MAX_VALUE characters (a CA bundle is left out whole)."""
    if isinstance(value, dict):
        return {k: _bounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bounded(v) for v in value[:100]]
    if isinstance(value, str) and len(value) > MAX_VALUE:
        return f"({len(value):,} characters, left out)"
    return value
