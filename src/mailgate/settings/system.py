"""The operator's settings kept in the database (table system_settings), beside the mail servers:
for now the global support address, where support requests go when a tenant has none of its own.

Only a system admin reads or changes them (the API, the CLI and the admin UI ask `Principal`);
every change is audited like the mail servers' ("system.update", scope "system").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..db.engine import Database
from ..db.models import AuditEntry, SystemSetting, now
from ..errors import SettingsError

SUPPORT_ADDRESS = "support_address"
AUDIT_SCOPE = "system"


@dataclass(frozen=True)
class SystemInfo:
    support_address: str | None
    updated_at: datetime | None
    updated_by: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "support_address": self.support_address,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "updated_by": self.updated_by,
        }


class SystemSettings:
    """`mg.system`: read and change the operator's settings; `actor` names who, in the audit log."""

    def __init__(self, db: Database, actor: str, on_change: Callable[[], None] | None = None) -> None:
        self.db = db
        self.actor = actor
        self.on_change = on_change

    async def get(self) -> SystemInfo:
        async with self.db.sessions() as s:
            row = await s.get(SystemSetting, SUPPORT_ADDRESS)
            return _info(row)

    async def update(self, *, support_address: str | None = None, clear_support_address: bool = False) -> SystemInfo:
        """Set the global support address (checked like every address), or clear it."""
        if support_address is not None and clear_support_address:
            raise SettingsError([("support_address", "give an address or clear it, not both")])
        if support_address is None and not clear_support_address:
            return await self.get()
        value = None if clear_support_address else checked_address("support_address", support_address or "")
        async with self.db.write() as s:
            row = await s.get(SystemSetting, SUPPORT_ADDRESS, with_for_update=True)
            before = (row.value or {}).get("address") if row is not None else None
            if before == value:
                return _info(row)
            if row is None:
                row = SystemSetting(name=SUPPORT_ADDRESS, value={"address": value}, updated_by=self.actor)
                s.add(row)
            else:
                row.value = {"address": value}
                row.updated_by = self.actor
            row.updated_at = now()
            s.add(AuditEntry(actor=self.actor, action="system.update", tenant_id=None, scope=AUDIT_SCOPE,
                             changes=[{"field": "support_address", "from": before, "to": value}]))  # fmt: skip
            await s.flush()
            info = _info(row)
        if self.on_change is not None:
            self.on_change()
        return info


def checked_address(field: str, value: str) -> str:
    """`value` as a normalized address, or SettingsError naming `field`."""
    from ..message import Address, forbidden_character

    if not isinstance(value, str) or not value.strip():
        raise SettingsError([(field, "is an e-mail address")])
    if (why := forbidden_character(value)) is not None:
        raise SettingsError([(field, why)])
    try:
        return Address(value.strip()).address
    except ValueError as e:
        raise SettingsError([(field, f"{value!r} is not a valid address: {e}")]) from None


def _info(row: SystemSetting | None) -> SystemInfo:
    if row is None:
        return SystemInfo(None, None, None)
    address = (row.value or {}).get("address")
    return SystemInfo(address if isinstance(address, str) else None, row.updated_at, row.updated_by)
