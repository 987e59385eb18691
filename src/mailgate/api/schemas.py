"""The shapes the API reads and answers, as pydantic models (they make the OpenAPI document).
Input models forbid unknown fields: a misspelt field is an error, not silently ignored. Every
string and list is bounded, with the numbers message.py holds the library's messages to: pydantic
refuses a list over its length before it looks at any item."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..message import (
    DEFAULT_MAX_SIZE,
    MAX_ADDRESS_TEXT,
    MAX_ATTACHMENTS,
    MAX_CONTENT_ID_LENGTH,
    MAX_CONTENT_TYPE_LENGTH,
    MAX_FILENAME_BYTES,
    MAX_HEADER_NAME_LENGTH,
    MAX_HEADER_VALUE_LENGTH,
    MAX_HEADERS,
    MAX_MESSAGE_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_RECIPIENTS,
    MAX_REPLY_TO,
    MAX_SUBJECT_LENGTH,
    Address,
    Attachment,
    Message,
    forbidden_character,
)
from ..settings.store import TENANT_ID

# A tenant id as settings/store.py makes them: anything else names no tenant.
TENANT_ID_PATTERN = f"^(?:{TENANT_ID.pattern})$"
MAX_ADDRESS_LENGTH = 320  # RFC 3696 errata: 64 + "@" + 255
_MAX_BASE64 = (DEFAULT_MAX_SIZE + 2) // 3 * 4


def _one_line(value: str) -> str:
    why = forbidden_character(value)
    if why is not None:
        raise ValueError(why)
    return value


TenantId = Annotated[str, Field(min_length=1, max_length=64, pattern=TENANT_ID_PATTERN)]
TenantPath = Annotated[str, Path(min_length=1, max_length=64, pattern=TENANT_ID_PATTERN)]
TenantQuery = Annotated[str | None, Query(min_length=1, max_length=64, pattern=TENANT_ID_PATTERN)]
AddressText = Annotated[str, Field(max_length=MAX_ADDRESS_LENGTH)]
OneLine = AfterValidator(_one_line)


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AddressIn(_Input):
    address: str = Field(max_length=MAX_ADDRESS_LENGTH)
    name: str = Field("", max_length=MAX_NAME_LENGTH)


AddressField = Annotated[str, Field(max_length=MAX_ADDRESS_TEXT)] | AddressIn


class AttachmentIn(_Input):
    filename: str = Field(max_length=MAX_FILENAME_BYTES)
    content_type: str = Field(
        max_length=MAX_CONTENT_TYPE_LENGTH,
        examples=["application/pdf", "text/plain; charset=iso-8859-1"],
        description="A MIME type, with at most one parameter: the charset of a text file's bytes.",
    )
    content_base64: str = Field(max_length=_MAX_BASE64, description="The file's bytes, base64-encoded.")
    content_id: str | None = Field(
        None,
        max_length=MAX_CONTENT_ID_LENGTH,
        description="Makes it inline: the HTML refers to it as cid:<content_id>.",
    )


_RECIPIENTS = f"To, Cc and Bcc hold at most {MAX_RECIPIENTS:,} addresses together."


class MessageIn(_Input):
    """A message to submit. `from` may be left out: the tenant's mail server's sender address is
    used. `tenant` is required with a system-admin token; a tenant's token may leave it out."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    tenant: TenantId | None = None
    from_: AddressField | None = Field(None, alias="from")
    to: list[AddressField] = Field([], max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    cc: list[AddressField] = Field([], max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    bcc: list[AddressField] = Field([], max_length=MAX_RECIPIENTS, description=_RECIPIENTS)
    reply_to: list[AddressField] = Field([], max_length=MAX_REPLY_TO)
    subject: str = Field("", max_length=MAX_SUBJECT_LENGTH)
    text: str | None = Field(None, max_length=DEFAULT_MAX_SIZE)
    html: str | None = Field(None, max_length=DEFAULT_MAX_SIZE)
    headers: dict[
        Annotated[str, Field(max_length=MAX_HEADER_NAME_LENGTH)],
        Annotated[str, Field(max_length=MAX_HEADER_VALUE_LENGTH)],
    ] = Field({}, max_length=MAX_HEADERS)
    attachments: list[AttachmentIn] = Field([], max_length=MAX_ATTACHMENTS)
    message_id: str | None = Field(
        None, max_length=MAX_MESSAGE_ID_LENGTH, description="<unique@domain>; made by mailgate when left out."
    )
    template: str | None = Field(
        None, max_length=64, examples=["invitation"],
        description="A notification template (GET /v1/templates) instead of subject, text and html.",
    )  # fmt: skip
    locale: str | None = Field(
        None, max_length=16, examples=["nl"], description="The template's locale: nl-BE falls back to nl, then en."
    )
    data: dict[Annotated[str, Field(max_length=64)], Any] | None = Field(
        None, max_length=100, description="The template's variables; a missing or unknown one is a 422 naming it."
    )

    def template_problems(self) -> list[tuple[str, str]]:
        """A template or subject/text/html, not both; locale and data only with a template."""
        if self.template is None:
            return [(f, "is given with a template only") for f in ("locale", "data") if getattr(self, f) is not None]
        given = [f for f in ("subject", "text", "html") if getattr(self, f)]
        return [(f, "is made by the template: give either a template or subject, text and html") for f in given]

    def to_message(self, rendered: Any = None) -> Message:
        """The Message (validated; MessageError lists every problem). `rendered`: a template's
        parts (notifications.Rendered), in place of subject, text and html."""
        from ..errors import MessageError

        problems: list[tuple[str, str]] = []

        def address(field: str, a: AddressField) -> str | Address | None:
            if isinstance(a, str):
                return a
            try:
                return Address(a.address, a.name)
            except ValueError as e:
                problems.append((field, f"{a.address!r} is not a valid address: {e}"))
                return None

        def addresses(field: str) -> list[str | Address]:
            found = (address(f"{field}[{i}]", a) for i, a in enumerate(getattr(self, field)))
            return [a for a in found if a is not None]

        sender = address("from", self.from_) if self.from_ is not None else None
        to, cc, bcc, reply_to = (addresses(f) for f in ("to", "cc", "bcc", "reply_to"))
        attachments = []
        for i, a in enumerate(self.attachments):
            try:
                data = base64.b64decode(a.content_base64, validate=True)
            except (binascii.Error, ValueError):
                problems.append((f"attachments[{i}].content_base64", "is not valid base64"))
                continue
            attachments.append(Attachment(a.filename, a.content_type, data, a.content_id))
        if problems:
            raise MessageError(problems)
        parts = rendered if rendered is not None else self
        subject, text, html = parts.subject, parts.text, parts.html
        return Message(
            from_=sender, to=to, cc=cc, bcc=bcc, reply_to=reply_to, subject=subject, text=text,
            html=html, headers=self.headers, attachments=attachments, message_id=self.message_id,
        )  # fmt: skip


class Submitted(BaseModel):
    id: int
    tenant: str
    status: str
    replayed: bool = False
    locale: str | None = Field(None, description="With a template: the locale used (after fallback).")


TenantName = Annotated[str, Field(max_length=200), OneLine]


class TenantIn(_Input):
    id: str = Field(max_length=64, description="1-64 letters, digits, '.', '_' or '-'.")
    name: TenantName | None = None
    may_use_own_server: bool = False
    support_address: AddressText | None = None
    may_set_support_address: bool = False
    admin_address: AddressText | None = Field(None, description="Told once when the tenant's own mail server breaks.")


class TenantPatch(_Input):
    """Only the fields given change; `support_address: null` (or `admin_address: null`) removes
    it. A tenant admin may change only `admin_address`, and `support_address` when the tenant may
    set it."""

    name: TenantName | None = None
    may_use_own_server: bool | None = None
    support_address: AddressText | None = None
    may_set_support_address: bool | None = None
    admin_address: AddressText | None = None


class TestEmailIn(_Input):
    """A test e-mail: to whom, whether to stop before DATA, and (optionally) unsaved settings to try
    instead of the saved ones — a stored secret is reused only when no destination field changed."""

    to: AddressText
    dry_run: bool = False
    settings: dict[str, Any] | None = None


class AuthorizeUrl(BaseModel):
    authorize_url: str


Json = dict[str, Any]


# ---- POST /v1/messages/batch ------------------------------------------------------------------------

MAX_BATCH = 500


class BatchItem(MessageIn):
    """One message of a batch: what POST /v1/messages takes, and its own idempotency key."""

    idempotency_key: str | None = Field(None, max_length=255, description="As the Idempotency-Key header.")


class BatchIn(_Input):
    """Up to 500 messages. Each is checked and answered on its own: a bad one does not refuse the
    others. `tenant` is every message's that names none (required with a system-admin token)."""

    tenant: TenantId | None = None
    # Any JSON value: an item that is not an object is answered in its own result (422), as every
    # other bad item is, instead of refusing the whole batch.
    messages: list[Any] = Field(
        min_length=1, max_length=MAX_BATCH, description="Each as POST /v1/messages takes it, plus `idempotency_key`."
    )


class BatchError(BaseModel):
    status: int
    code: str
    message: str
    problems: list[dict[str, str]] = []


class BatchResult(BaseModel):
    """Either the message stored (`id`, …) or why this one was not (`error`)."""

    id: int | None = None
    tenant: str | None = None
    status: str | None = None
    replayed: bool | None = None
    error: BatchError | None = None


class BatchResults(BaseModel):
    results: list[BatchResult]
