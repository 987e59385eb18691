"""The shapes the API reads and answers, as pydantic models (they make the OpenAPI document).
Input models forbid unknown fields: a misspelt field is an error, not silently ignored."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..message import Address, Attachment, Message


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AddressIn(_Input):
    address: str = Field(max_length=320)
    name: str = Field("", max_length=300)


AddressField = str | AddressIn


class AttachmentIn(_Input):
    filename: str
    content_type: str = Field(examples=["application/pdf"])
    content_base64: str = Field(description="The file's bytes, base64-encoded.")
    content_id: str | None = Field(None, description="Makes it inline: the HTML refers to it as cid:<content_id>.")


class MessageIn(_Input):
    """A message to submit. `from` may be left out: the tenant's mail server's sender address is
    used. `tenant` is required with a system-admin token; a tenant's token may leave it out."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    tenant: str | None = None
    from_: AddressField | None = Field(None, alias="from")
    to: list[AddressField] = []
    cc: list[AddressField] = []
    bcc: list[AddressField] = []
    reply_to: list[AddressField] = []
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = {}
    attachments: list[AttachmentIn] = []
    message_id: str | None = Field(None, description="<unique@domain>; made by mailgate when left out.")

    def to_message(self) -> Message:
        """The Message (validated; MessageError lists every problem)."""
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
        return Message(
            from_=sender, to=to, cc=cc, bcc=bcc, reply_to=reply_to, subject=self.subject, text=self.text,
            html=self.html, headers=self.headers, attachments=attachments, message_id=self.message_id,
        )  # fmt: skip


class Submitted(BaseModel):
    id: int
    tenant: str
    status: str
    replayed: bool = False


class TenantIn(_Input):
    id: str = Field(description="1-64 letters, digits, '.', '_' or '-'.")
    name: str | None = None
    may_use_own_server: bool = False
    support_address: str | None = None
    may_set_support_address: bool = False
    admin_address: str | None = Field(None, description="Told once when the tenant's own mail server breaks.")


class TenantPatch(_Input):
    """Only the fields given change; `support_address: null` (or `admin_address: null`) removes
    it. A tenant admin may change only `admin_address`, and `support_address` when the tenant may
    set it."""

    name: str | None = None
    may_use_own_server: bool | None = None
    support_address: str | None = None
    may_set_support_address: bool | None = None
    admin_address: str | None = None


class TestEmailIn(_Input):
    """A test e-mail: to whom, whether to stop before DATA, and (optionally) unsaved settings to try
    instead of the saved ones — a stored secret is reused only when no destination field changed."""

    to: str = Field(max_length=320)
    dry_run: bool = False
    settings: dict[str, Any] | None = None


class AuthorizeUrl(BaseModel):
    authorize_url: str


Json = dict[str, Any]
