"""Secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256) under a list of keys, newest first.

Keys come from $MAILGATE_SECRET_KEYS (comma-separated), or, for a SQLite database, from a key file
beside it that is created with mode 0600 for a database that holds no secret yet (service.py).
Encryption uses the newest key; decryption tries them all, so a new key can be put in front,
`mailgate keys rotate` run, and the old key dropped. A key file changed by another process (`keys
rotate --new-key`) is read again when a secret doesn't decrypt and before one is encrypted.
Each ciphertext also carries the scope and field it belongs to, so a ciphertext copied to another
server's row (by someone who can write the database but has no key) does not decrypt there.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..errors import MailgateError, SettingsError

ENV_KEYS = "MAILGATE_SECRET_KEYS"
CANNOT_DECRYPT = "mailgate cannot decrypt the "  # how a SecretsError of changed keys begins (settings/store.py)
log = logging.getLogger("mailgate")


class SecretsError(MailgateError):
    """A stored secret can't be decrypted with the keys at hand: the keys changed (or the row was
    copied from another server). `scope` and `field` say which secret; the text says what to do."""

    def __init__(self, message: str, *, scope: str, field: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.field = field


class Keyring:
    """The keys, newest first. With `path` (a key file) they are read again from it when it
    changed: another process may have put a new key in front and re-encrypted every secret."""

    def __init__(self, keys: list[str], source: str, *, path: Path | None = None) -> None:
        self.source = source
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._use(keys)

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        stamp = _stamp(path)  # before reading: a change made meanwhile is seen later
        keyring = cls(read_key_file(path), str(path), path=path)
        keyring._stamp = stamp
        return keyring

    def _use(self, keys: list[str]) -> None:
        if not keys:
            raise SettingsError([(self.source, "holds no key; make one with `mailgate keys generate`")])
        fernets = []
        for i, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key.encode()))
            except ValueError:
                raise SettingsError(
                    [(self.source, f"key {i} is not a Fernet key (32 url-safe base64 bytes); "
                                   "make one with `mailgate keys generate`")]
                ) from None  # fmt: skip
        self._fernet = MultiFernet(fernets)
        self._primary = keys[0].encode()
        self._derived: dict[str, bytes] = {}
        self.count = len(keys)

    def reload(self) -> bool:
        """Read the key file again if it changed since it was read (its inode, size or time: the
        CLI replaces it whole); True when the keys may have changed. Keys from the environment
        can't change while the process runs."""
        if self._path is None:
            return False
        stamp = _stamp(self._path)
        if stamp == self._stamp:
            return False
        try:
            self._use(read_key_file(self._path))
        except SettingsError as e:  # half-edited by hand, or gone: keep the keys at hand
            log.warning("the key file %s changed but can't be used (%s); keeping the keys read before", self._path, e)
            return False
        self._stamp = stamp
        log.info("read the changed key file %s again (%d keys)", self._path, self.count)
        return True

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
        self.reload()  # under the newest key, even when another process just put it in front
        return self._fernet.encrypt(json.dumps([scope, field, value]).encode()).decode()

    def decrypt(self, scope: str, field: str, token: str) -> str:
        try:
            plain = self._fernet.decrypt(token.encode())
        except InvalidToken:
            if not self.reload():
                raise SecretsError(self._cannot_decrypt(scope, field), scope=scope, field=field) from None
            return self.decrypt(scope, field, token)  # once: the file is read again only when it changed
        owner_scope, owner_field, value = json.loads(plain)
        if (owner_scope, owner_field) != (scope, field):
            raise SecretsError(
                f"the stored {field} of {_server(scope)} belongs to another server (the row was copied). "
                f"Fix: save the mail server's {field} again.",
                scope=scope, field=field,
            )  # fmt: skip
        return str(value)

    def _cannot_decrypt(self, scope: str, field: str) -> str:
        """What the admin reads (a broken server's reason, an API error): which secret, that the
        keys changed, and what to do about it."""
        if self._path is None:
            fix = (f"restart mailgate with the {ENV_KEYS} the other instances use (the new key first, the old "
                   f"one after it), or run `mailgate keys rotate` with both keys in {ENV_KEYS}")  # fmt: skip
        else:
            fix = (f"put the key it was encrypted with back in {self._path} (from a backup), or run `mailgate keys "
                   "rotate` with both keys")  # fmt: skip
        return (f"{CANNOT_DECRYPT}{field} of {_server(scope)} with the keys from {self.source}: the keys "
                f"changed since it was saved. Fix: {fix}; or save the mail server's {field} again.")  # fmt: skip

    def rotate(self, scope: str, field: str, token: str) -> str:
        """The same secret encrypted under the newest key."""
        return self.encrypt(scope, field, self.decrypt(scope, field, token))


def _server(scope: str) -> str:
    return "the global mail server" if scope == "global" else f"the mail server of tenant {scope}"


def load_keyring(env_value: str | None, key_file: Path | None) -> Keyring:
    """Keys from the environment, else from `key_file` (created when missing), else an
    error: without a key file (PostgreSQL) every machine needs the same keys, so they must be given."""
    if env_value:
        return Keyring([k for k in env_value.replace(",", " ").split() if k], ENV_KEYS)
    if key_file is None:
        raise SettingsError(
            [(ENV_KEYS, "is not set: with PostgreSQL every machine must use the same keys; "
                        "make one with `mailgate keys generate` and set it everywhere")]
        )  # fmt: skip
    if not key_file.exists():
        _create_key_file(key_file)
    return Keyring.from_file(key_file)


def key_file_for(database: Path) -> Path:
    return database.with_name(database.name + ".keys")


def read_key_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not ASCII text"
        raise SettingsError([(str(path), f"cannot read the key file: {why}")]) from None
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


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells that a file changed: its inode (the CLI replaces it whole), size and time."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


_KEY_FILE_HEADER = "# mailgate secret keys (Fernet), newest first. Keep this file secret and backed up.\n"
