"""Secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256) under a list of keys, newest first.

Keys come from $MAILGATE_SECRET_KEYS (comma-separated), or, for a SQLite database, from a key file
beside it that is created on first use with mode 0600. Encryption uses the newest key; decryption
tries them all, so a new key can be put in front, `mailgate keys rotate` run, and the old key
dropped. Each ciphertext also carries the scope and field it belongs to, so a ciphertext copied
to another server's row (by someone who can write the database but has no key) does not decrypt
there.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..errors import MailgateError, SettingsError

ENV_KEYS = "MAILGATE_SECRET_KEYS"
log = logging.getLogger("mailgate")


class SecretsError(MailgateError):
    """A stored secret can't be decrypted with the keys at hand."""


class Keyring:
    def __init__(self, keys: list[str], source: str) -> None:
        if not keys:
            raise SettingsError([(source, "holds no key; make one with `mailgate keys generate`")])
        fernets = []
        for i, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key.encode()))
            except ValueError:
                raise SettingsError(
                    [(source, f"key {i} is not a Fernet key (32 url-safe base64 bytes); "
                              "make one with `mailgate keys generate`")]
                ) from None  # fmt: skip
        self._fernet = MultiFernet(fernets)
        self._primary = keys[0].encode()
        self._derived: dict[str, bytes] = {}
        self.source = source
        self.count = len(keys)

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose` (e.g. signing the admin UI's cookies), derived from the
        primary key: every process with the same keys derives the same one, and rotating the keys
        changes it."""
        import hashlib
        import hmac

        key = self._derived.get(purpose)
        if key is None:
            key = self._derived[purpose] = hmac.new(
                self._primary, b"mailgate derived key: " + purpose.encode(), hashlib.sha256
            ).digest()
        return key

    @staticmethod
    def generate() -> str:
        return Fernet.generate_key().decode()

    def encrypt(self, scope: str, field: str, value: str) -> str:
        return self._fernet.encrypt(json.dumps([scope, field, value]).encode()).decode()

    def decrypt(self, scope: str, field: str, token: str) -> str:
        try:
            owner_scope, owner_field, value = json.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken:
            raise SecretsError(
                f"cannot decrypt the {field} of the {scope} mail server with the keys from {self.source}: "
                "was a key removed before `mailgate keys rotate` ran?"
            ) from None
        if (owner_scope, owner_field) != (scope, field):
            raise SecretsError(f"the stored {field} of the {scope} mail server belongs to another server")
        return str(value)

    def rotate(self, scope: str, field: str, token: str) -> str:
        """The same secret encrypted under the newest key."""
        return self.encrypt(scope, field, self.decrypt(scope, field, token))


def load_keyring(env_value: str | None, key_file: Path | None) -> Keyring:
    """Keys from the environment, else from `key_file` (created when missing), else an error:
    without a key file (PostgreSQL) every machine needs the same keys, so they must be given."""
    if env_value:
        return Keyring([k for k in env_value.replace(",", " ").split() if k], ENV_KEYS)
    if key_file is None:
        raise SettingsError(
            [(ENV_KEYS, "is not set: with PostgreSQL every machine must use the same keys; "
                        "make one with `mailgate keys generate` and set it everywhere")]
        )  # fmt: skip
    return Keyring(read_key_file(key_file, create=True), str(key_file))


def key_file_for(database: Path) -> Path:
    return database.with_name(database.name + ".keys")


def read_key_file(path: Path, *, create: bool = False) -> list[str]:
    if create and not path.exists():
        _create_key_file(path)
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except OSError as e:
        raise SettingsError([(str(path), f"cannot read the key file: {e.strerror}")]) from None
    if path.stat().st_mode & 0o077:
        log.warning("the key file %s can be read by other users; run: chmod 600 %s", path, path)
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _create_key_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process made it first: use theirs
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(_KEY_FILE_HEADER + Keyring.generate() + "\n")
    log.warning(
        "created the secret key file %s (mode 0600). Keep it with the database and back it up: "
        "without it the stored passwords can't be decrypted. Or set %s instead.",
        path,
        ENV_KEYS,
    )


def add_key_to_file(path: Path) -> None:
    """Put a new key in front of the key file (for `mailgate keys rotate --new-key`)."""
    keys = read_key_file(path)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(_KEY_FILE_HEADER + "\n".join([Keyring.generate(), *keys]) + "\n")
    os.replace(tmp, path)


_KEY_FILE_HEADER = "# mailgate secret keys (Fernet), newest first. Keep this file secret and backed up.\n"
