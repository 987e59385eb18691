"""SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN, LOGIN, CRAM-MD5 and XOAUTH2.

Each mechanism talks through `Exchange`, which sends one line and returns the reply; the second
argument is what the protocol log shows instead of the line, so a credential never reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from .errors import SMTPAuthError
from .reply import Reply

REDACTED = "[redacted]"

Exchange = Callable[[bytes, str], Awaitable[Reply]]


class BearerToken(Protocol):
    """An access token and when a connection that used it should stop (its expiry less a
    margin: providers end an XOAUTH2 session when its token expires)."""

    @property
    def value(self) -> str: ...

    @property
    def renew_at(self) -> float: ...


TokenSource = Callable[[], Awaitable[str | BearerToken]]

# Strongest first: CRAM-MD5 never sends the password itself; then PLAIN, one round trip where
# LOGIN takes three (the same password in both). With mechanism auto this is also the order of
# the fallback (`candidates`).
PASSWORD_MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")


@dataclass(frozen=True)
class PasswordAuth:
    username: str
    password: str = field(repr=False)
    mechanism: str = "auto"  # or one of PASSWORD_MECHANISMS


@dataclass(frozen=True)
class OAuth2Auth:
    """XOAUTH2: `token` is called for every new connection and returns a current access token."""

    username: str
    token: TokenSource = field(repr=False)


Credentials = PasswordAuth | OAuth2Auth


def choose_mechanism(creds: Credentials, offered: list[str]) -> str:
    """The mechanism to use, or SMTPAuthError naming what the server offers."""
    offered_text = "AUTH " + " ".join(offered) if offered else "no AUTH at all"
    if isinstance(creds, OAuth2Auth):
        wanted = ["XOAUTH2"]
    elif creds.mechanism.lower() == "auto":
        wanted = list(PASSWORD_MECHANISMS)
    else:
        wanted = [creds.mechanism.upper()]
    for mech in wanted:
        if mech in offered:
            return mech
    if not offered:
        raise SMTPAuthError(
            "the server does not offer authentication (no AUTH in its EHLO reply); if it is a relay "
            "that needs no password, set auth to none",
            transient=False,
        )
    if len(wanted) == 1:
        raise SMTPAuthError(
            f"the settings ask for {wanted[0]} but the server offers {offered_text}", mechanism=wanted[0]
        )
    raise SMTPAuthError(
        f"the server offers {offered_text}; mailgate can log in with a password using " + ", ".join(PASSWORD_MECHANISMS)
    )


def candidates(creds: Credentials, offered: list[str]) -> list[str]:
    """The mechanisms to try, in order, or SMTPAuthError (as `choose_mechanism`). More than one
    only with a password and mechanism auto: when the server refuses one with a reply that blames
    the mechanism (`falls_back`), the next is tried. An explicit mechanism never falls back."""
    first = choose_mechanism(creds, offered)
    if isinstance(creds, OAuth2Auth) or creds.mechanism.lower() != "auto":
        return [first]
    return [m for m in PASSWORD_MECHANISMS if m in offered]


# Enhanced codes of a 535 that are not about the mechanism: another mechanism with the same
# password fails the same way and only counts one more failed sign-in against the account
# (reference §3: 5.7.139 is SMTP AUTH switched off, 5.7.3 Exchange refusing the credentials).
NOT_THE_MECHANISM = frozenset({"5.7.139", "5.7.3"})


def falls_back(e: SMTPAuthError) -> bool:
    """Whether a refused password mechanism may be followed by the next one: 504 (the server
    does not do it), or 535 without a code that blames something else (a server that offers
    CRAM-MD5 but keeps only password hashes answers 535 5.7.8 to it). Not 454 or another 4xx:
    a temporary failure, tried again later with the same mechanism."""
    if e.code == 504:
        return True
    return e.code == 535 and e.enhanced not in NOT_THE_MECHANISM


@dataclass(frozen=True)
class AuthTry:
    """One AUTH of a session: the mechanism and the server's final reply to it."""

    mechanism: str
    code: int | None
    enhanced: str | None
    text: str  # the reply's text (with its enhanced code), or what went wrong without one

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}".rstrip() if self.code is not None else self.text

    def __str__(self) -> str:
        return f"{self.mechanism} ({self.reply})"


def every_mechanism_refused(tries: list[AuthTry], last: SMTPAuthError) -> SMTPAuthError:
    """The server refused the password with every mechanism both sides have: the credentials'
    failure, not the mechanisms'. The code, enhanced code and reply are the last try's; `tries`
    lists each."""
    listed = ", ".join(str(t) for t in tries)
    return SMTPAuthError(
        f"authentication failed with every mechanism both sides have: {listed}",
        mechanism=last.mechanism,
        tries=tuple(tries),
        code=last.code,
        enhanced=last.enhanced,
        reply=last.reply,
        transient=last.transient,
    )


class LearntMechanism:
    """Which password mechanism a server takes, learnt once and used by every connection after.

    One per pool, shared by its connections like the recipient limit: a server that refuses a
    mechanism is tried with the next one once per pool, not once per connection — every refused
    try is a failed sign-in, and Active Directory locks an account after a few of them. While one
    connection tries, the others wait for what it learns (`lock`); when every mechanism was
    refused (the credentials' failure), the connections that waited get the same error without
    trying again (`failed`, counted by `rounds`), and a later connection starts over."""

    def __init__(self) -> None:
        self.learnt: str | None = None
        self.lock = asyncio.Lock()
        self.rounds = 0  # tries of every mechanism that all failed
        self.failed: SMTPAuthError | None = None  # the last such round's error


def secret_forms(creds: Credentials, access_token: str = "") -> list[str]:
    """Every form of the credentials a server might echo in a reply: the password or token, and
    the base64 payloads that carry them (PLAIN, LOGIN, XOAUTH2)."""
    if isinstance(creds, OAuth2Auth):
        if not access_token:
            return []
        blob = f"user={creds.username}\x01auth=Bearer {access_token}\x01\x01".encode()
        return [access_token, _b64(blob).decode(), _b64(access_token.encode()).decode()]
    user, password = creds.username.encode(), creds.password.encode()
    return [creds.password, _b64(password).decode(), _b64(b"\0" + user + b"\0" + password).decode()]


async def authenticate(exchange: Exchange, mechanism: str, creds: Credentials, access_token: str = "") -> Reply:
    """Run AUTH `mechanism`; for XOAUTH2 with `access_token` (the caller fetched it, to know its expiry)."""
    if mechanism == "XOAUTH2":
        assert isinstance(creds, OAuth2Auth)
        return await _xoauth2(exchange, creds.username, access_token)
    assert isinstance(creds, PasswordAuth)
    user, password = creds.username.encode(), creds.password.encode()
    if mechanism == "PLAIN":
        reply = await exchange(b"AUTH PLAIN " + _b64(b"\0" + user + b"\0" + password), f"AUTH PLAIN {REDACTED}")
    elif mechanism == "LOGIN":
        reply = await exchange(b"AUTH LOGIN", "AUTH LOGIN")
        if reply.code == 334:
            reply = await exchange(_b64(user), REDACTED)
        if reply.code == 334:
            reply = await exchange(_b64(password), REDACTED)
    elif mechanism == "CRAM-MD5":
        reply = await exchange(b"AUTH CRAM-MD5", "AUTH CRAM-MD5")
        if reply.code == 334:
            challenge = _unb64(reply.text)
            digest = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
            reply = await exchange(_b64(user + b" " + digest), REDACTED)
    else:
        raise SMTPAuthError(f"mailgate does not implement AUTH {mechanism}", mechanism=mechanism)
    return await _finish(exchange, mechanism, reply)


async def _xoauth2(exchange: Exchange, username: str, token: str) -> Reply:
    blob = f"user={username}\x01auth=Bearer {token}\x01\x01".encode()
    reply = await exchange(b"AUTH XOAUTH2 " + _b64(blob), f"AUTH XOAUTH2 {REDACTED}")
    challenge: dict[str, object] | None = None
    if reply.code == 334:
        # An error challenge (Gmail): base64 JSON with status, schemes and scope. The client must
        # answer with an empty line; the server then sends the final failure.
        try:
            decoded = json.loads(_unb64(reply.text))
            challenge = decoded if isinstance(decoded, dict) else None
        except ValueError:
            challenge = None
        reply = await exchange(b"", "")
    if reply.code == 235:
        return reply
    what = "authentication with XOAUTH2 failed"
    if challenge:  # decoded from base64, so no redaction saw it: a server could echo the token in it
        challenge = json.loads(json.dumps(challenge).replace(token, REDACTED)) if token else challenge
        what += f" (the token was refused: {json.dumps(challenge, sort_keys=True)})"
    raise SMTPAuthError.from_reply(what, reply, mechanism="XOAUTH2", challenge=challenge)


async def _finish(exchange: Exchange, mechanism: str, reply: Reply) -> Reply:
    if reply.code == 334:  # a further challenge we don't expect: cancel (RFC 4954 "*")
        reply = await exchange(b"*", "*")
        raise SMTPAuthError(f"the server sent an unexpected challenge during AUTH {mechanism}", mechanism=mechanism)
    if reply.code != 235:
        raise SMTPAuthError.from_reply(f"authentication with {mechanism} failed", reply, mechanism=mechanism)
    return reply


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=False)
    except ValueError:
        return b""
