"""A fake OAuth2 identity provider for tests: Microsoft Entra ID (v2.0 endpoints) and Google style.

`FakeIdentityProvider` is a real HTTP/1.1 server on 127.0.0.1 (ephemeral port, keep-alive, one
thread per connection) that mints access tokens the way the real services do and checks every
token request as strictly as they do:

- Microsoft: `POST {url}/{directory_id}/oauth2/v2.0/token` (the "authority" is `url`), with
  client credentials, refresh-token and authorization-code (PKCE, S256) grants.
- Google: `POST {url}/token`, with refresh-token and authorization-code grants.

A request the real service would reject gets the real service's status and documented error
body (Microsoft's `AADSTSnnnnn` JSON, Google's `{"error", "error_description"}`). Every request
is recorded (`requests`, `token_requests`) and every access token issued is kept in `issued`,
so other fakes (the fake Graph, the aiosmtpd XOAUTH2 server) can validate bearer tokens with
`check()`.

The browser leg of the authorization-code flow is simulated by `consent()`: it validates an
authorize URL like the real authorize endpoint and returns the redirect with a fresh code.

The module also holds the small server base (`ThreadedFake`) that the other HTTP fakes share.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hashlib
import hmac
import json
import re
import secrets
import socket
import socketserver
import threading
import time
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Literal, Self
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

__all__ = [
    "GOOGLE_AUTHORIZE_PATH",
    "GOOGLE_TOKEN_PATH",
    "FakeIdentityProvider",
    "HTTPRequest",
    "HTTPResponse",
    "IssuedToken",
    "RecordedRequest",
    "ThreadedFake",
    "json_response",
    "pkce_challenge",
]

GOOGLE_TOKEN_PATH = "/token"
GOOGLE_AUTHORIZE_PATH = "/o/oauth2/v2/auth"
_MICROSOFT_TOKEN = re.compile(r"^/([^/]+)/oauth2/v2\.0/token$")
_MICROSOFT_AUTHORIZE = re.compile(r"^/([^/]+)/oauth2/v2\.0/authorize$")
_CODE_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43,128}$")
_OIDC_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})
_GRAPH = "https://graph.microsoft.com"
_JSON_UTF8 = "application/json; charset=utf-8"
_CODE_LIFETIME = 600.0
_TOKEN_SIZE = 1500

Flavour = Literal["microsoft", "google"]


# --------------------------------------------------------------------------------------------
# Shared HTTP server plumbing
# --------------------------------------------------------------------------------------------


@dataclass
class HTTPRequest:
    """One parsed request handed to a fake's router."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    query_list: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class HTTPResponse:
    """What a fake's router answers; the server adds Content-Length (always) and Date/Server."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False
    trickle: float = 0.0  # seconds: the body goes out in small pieces, 0.2 s apart, over this long


@dataclass
class RecordedRequest:
    """A request as a fake received it (header names lower-case), and the status it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float
    form: dict[str, str] | None = None
    client_auth: Literal["form", "basic", "none"] | None = None
    status: int = 0


def json_response(status: int, payload: Any, *, content_type: str = _JSON_UTF8, **headers: str) -> HTTPResponse:
    """A JSON reply; keyword arguments become extra headers (`retry_after=` → `Retry-After`)."""
    extra = [(name.replace("_", "-").title(), value) for name, value in headers.items()]
    return HTTPResponse(status, json.dumps(payload).encode(), [("Content-Type", content_type), *extra])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 15  # idle keep-alive connections are dropped after this many seconds
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _serve(self) -> None:
        fake = self.server.fake
        at = time.time()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body, problem = self._read_body(headers, fake.max_body)
        if problem is not None:
            response = problem
        else:
            split = urlsplit(self.path)
            query_list = parse_qsl(split.query, keep_blank_values=True)
            request = HTTPRequest(
                method=self.command,
                target=self.path,
                path=split.path,
                query=dict(query_list),
                query_list=query_list,
                headers=headers,
                body=body,
                at=at,
            )
            try:
                response = fake._handle(request)
            except Exception:  # a bug in the fake: answer 500 and keep it for the test to see
                text = traceback.format_exc()
                with fake._lock:
                    fake.errors.append(text)
                response = json_response(500, {"error": {"code": "FakeInternalError", "message": text}})
        self._write(response)

    def _read_body(self, headers: dict[str, str], limit: int) -> tuple[bytes, HTTPResponse | None]:
        encoding = headers.get("transfer-encoding", "").strip().lower()
        if encoding:
            if encoding != "chunked":
                return b"", HTTPResponse(501, b"unsupported Transfer-Encoding", close=True)
            return self._read_chunked(limit)
        raw = headers.get("content-length")
        if raw is None:
            return b"", None
        if not raw.strip().isdigit():
            return b"", HTTPResponse(400, b"bad Content-Length", close=True)
        length = int(raw)
        if length > limit:
            too_large = self.server.fake._body_too_large()
            too_large.close = True
            return b"", too_large
        body = self.rfile.read(length)
        if len(body) != length:
            return b"", HTTPResponse(400, b"truncated body", close=True)
        return body, None

    def _read_chunked(self, limit: int) -> tuple[bytes, HTTPResponse | None]:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return b"", HTTPResponse(400, b"bad chunk size", close=True)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks), None
            total += size
            if total > limit:
                too_large = self.server.fake._body_too_large()
                too_large.close = True
                return b"", too_large
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _write(self, response: HTTPResponse) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        if response.close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and response.body:
            if response.trickle > 0:  # a slow server: each read gets a little, in time
                steps = max(1, int(response.trickle / 0.2))
                size = max(1, -(-len(response.body) // steps))
                self.wfile.flush()
                for start in range(0, len(response.body), size):
                    time.sleep(0.2)
                    self.wfile.write(response.body[start : start + size])
                    self.wfile.flush()  # raises once the client has hung up: the handler ends
            else:
                self.wfile.write(response.body)
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, fake: ThreadedFake) -> None:
        self.fake = fake
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:  # skip HTTPServer's reverse DNS lookup
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"{type(self.fake).__name__}-connection",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[request] = thread
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a client hanging up mid-request is not news; fake bugs are caught in _serve

    def close_connections(self, timeout: float) -> None:
        with self._connections_lock:
            items = list(self._connections.items())
        for sock, _ in items:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in items:
            thread.join(max(0.0, deadline - time.monotonic()))


class ThreadedFake:
    """Base of the HTTP fakes: a ThreadingHTTPServer on 127.0.0.1 in a daemon thread.

    `with Fake() as fake:` starts it; leaving the block stops the listener, drops open keep-alive
    connections and joins every thread (bounded waits). `start()`/`close()` do the same by hand.
    """

    max_body: int = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []  # tracebacks of exceptions inside the fake (each answered 500)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not running: use `with` or start()")
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        server = _Server(self)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=type(self).__name__, daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        return self

    def close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections(timeout=5.0)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _handle(self, request: HTTPRequest) -> HTTPResponse:
        raise NotImplementedError

    def _body_too_large(self) -> HTTPResponse:
        return json_response(413, {"error": "request_too_large"})


# --------------------------------------------------------------------------------------------
# Identity provider
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    """An access token the fake issued, with what it grants."""

    token: str
    client_id: str
    directory_id: str | None  # None for Google-style tokens
    grant: str  # "client_credentials" | "refresh_token" | "authorization_code"
    scope: str  # the scope string of the request / reply
    audience: str  # Microsoft: the resource ("https://graph.microsoft.com"); Google: the client id
    roles: tuple[str, ...]  # application permissions (app-only tokens)
    scopes: tuple[str, ...]  # delegated permissions ("scp"); Google: the granted scopes
    subject: str | None  # the user/mailbox for delegated tokens; None for app-only
    issued_at: float
    expires_at: float

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


@dataclass
class _App:
    client_id: str
    secret: str | None
    directory_id: str | None
    roles: tuple[str, ...]
    redirect_uris: tuple[str, ...]
    secret_expired: bool
    secret_revoked: bool = False


@dataclass
class _RefreshGrant:
    token: str
    client_id: str
    subject: str
    scope: str
    rotate: bool
    directory_id: str | None = None
    revoked: bool = False


@dataclass
class _Code:
    code: str
    flavour: Flavour
    client_id: str
    directory_id: str | None
    redirect_uri: str
    scope: str
    subject: str
    challenge: str
    expires_at: float
    redeemed: bool = False
    email: str | None = None  # the user's mail attribute (the id_token's `email` claim)


@dataclass
class _Failure:
    status: int
    error: str
    aadsts: int | None


class _Reject(Exception):
    """A token request the real service refuses: rendered in the flavour's error shape."""

    def __init__(self, status: int, error: str, text: str, aadsts: int | None = None) -> None:
        super().__init__(text)
        self.status, self.error, self.text, self.aadsts = status, error, text, aadsts


def _ms(status: int, error: str, aadsts: int, text: str) -> _Reject:
    return _Reject(status, error, text, aadsts)


def _google(status: int, error: str, text: str) -> _Reject:
    return _Reject(status, error, text)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_challenge(verifier: str) -> str:
    """The S256 code_challenge for a code_verifier (base64url of SHA-256, no padding)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _split_scope(scope: str) -> tuple[str, str] | None:
    """A Microsoft scope as (resource, permission); None for the OpenID Connect scopes."""
    if scope in _OIDC_SCOPES:
        return None
    if "://" in scope:
        resource, _, name = scope.rpartition("/")
        return resource, name
    return _GRAPH, scope  # short Graph form: "Mail.Send"


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class FakeIdentityProvider(ThreadedFake):
    """Microsoft Entra ID v2.0 and Google style token endpoints on 127.0.0.1 (see module docstring).

    Configure with `add_tenant`, `add_app`, `add_refresh_token`; break things with `revoke_secret`,
    `revoke_refresh_token`, `fail_next`, `delay`, `token_lifetime`; inspect `requests`,
    `token_requests`, `issued`, `check()`.
    """

    max_body = 1024 * 1024
    resources: ClassVar[frozenset[str]] = frozenset(
        {
            "https://graph.microsoft.com",
            "https://outlook.office365.com",
            "https://outlook.office.com",
            "https://ps.outlook.com",
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.token_lifetime: int = 3599
        self.delay: float = 0.0
        self.requests: list[RecordedRequest] = []
        self.issued: dict[str, IssuedToken] = {}
        self._tenants: set[str] = set()
        self._apps: dict[str, _App] = {}
        self._refresh: dict[str, _RefreshGrant] = {}
        self._codes: dict[str, _Code] = {}
        self._failures: list[_Failure] = []
        self.authorizations: list[dict[str, str]] = []  # each authorize URL's parameters, as consent() saw them

    # ---- configuration -------------------------------------------------------------------

    def add_tenant(self, directory_id: str) -> None:
        """A Microsoft tenant (directory) id the token endpoint knows."""
        with self._lock:
            self._tenants.add(directory_id)

    def add_app(
        self,
        client_id: str,
        secret: str | None = None,
        *,
        directory_id: str | None = None,
        roles: Iterable[str] = (),
        redirect_uris: Iterable[str] = (),
        secret_expired: bool = False,
    ) -> None:
        """Register a client: `secret=None` is a public client; `directory_id=None` = known in every tenant."""
        with self._lock:
            self._apps[client_id] = _App(
                client_id, secret, directory_id, tuple(roles), tuple(redirect_uris), secret_expired
            )

    def revoke_secret(self, client_id: str) -> None:
        """The app's secret stops working (AADSTS7000215 / Google unauthorized_client)."""
        with self._lock:
            self._apps[client_id].secret_revoked = True

    def add_refresh_token(
        self, refresh_token: str, *, client_id: str, subject: str, scope: str, rotate: bool = False
    ) -> None:
        """A refresh token `subject` granted to `client_id` earlier; `rotate` = Microsoft-style rotation."""
        with self._lock:
            self._refresh[refresh_token] = _RefreshGrant(refresh_token, client_id, subject, scope, rotate)

    def revoke_refresh_token(self, refresh_token: str) -> None:
        with self._lock:
            self._refresh[refresh_token].revoked = True

    def fail_next(
        self, count: int, status: int = 503, error: str = "temporarily_unavailable", aadsts: int | None = 90024
    ) -> None:
        """The next `count` token requests get this transient error instead of being processed."""
        with self._lock:
            self._failures.extend(_Failure(status, error, aadsts) for _ in range(count))

    # ---- inspection ----------------------------------------------------------------------

    @property
    def token_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == GOOGLE_TOKEN_PATH or _MICROSOFT_TOKEN.match(r.path)]

    def check(self, token: str) -> IssuedToken | None:
        """The token's grant if this fake issued it and it has not expired, else None."""
        info = self.lookup(token)
        return None if info is None or info.expired else info

    def lookup(self, token: str) -> IssuedToken | None:
        """The token's grant if this fake issued it, expired or not."""
        with self._lock:
            return self.issued.get(token)

    def refresh_tokens_for(self, subject: str) -> list[str]:
        """Every live refresh token of `subject` (newest last): handy after rotations."""
        with self._lock:
            return [g.token for g in self._refresh.values() if g.subject == subject and not g.revoked]

    # ---- the browser leg -----------------------------------------------------------------

    def consent(self, authorize_url: str, *, subject: str, email: str | None = None) -> tuple[str, str]:
        """Simulate `subject` opening `authorize_url` and consenting.

        Validates the URL like the real authorize endpoint (raises ValueError with the reason) and
        returns (redirect_uri + "?code=…&state=…", code). The code is single-use, lives 10 minutes
        and is bound to client_id, redirect_uri, scope, subject and the code_challenge. Every
        authorize URL's parameters are kept in `authorizations`.

        Microsoft: with `openid` in the scope, the code's redemption also returns an id_token (v2.0)
        naming the user: `preferred_username` is `subject` (the sign-in name, the UPN), and with the
        `email` scope `email` is `email` (the user's mail address; default: `subject`).
        """
        split = urlsplit(authorize_url)
        if f"{split.scheme}://{split.netloc}" != self.url:
            raise ValueError(f"authorize URL {authorize_url!r} does not point at this identity provider ({self.url})")
        flavour: Flavour
        directory_id: str | None = None
        if (match := _MICROSOFT_AUTHORIZE.match(split.path)) is not None:
            flavour, directory_id = "microsoft", match.group(1)
        elif split.path == GOOGLE_AUTHORIZE_PATH:
            flavour = "google"
        else:
            raise ValueError(
                f"unknown authorize path {split.path!r}: expected /{{directory_id}}/oauth2/v2.0/authorize"
                f" or {GOOGLE_AUTHORIZE_PATH}"
            )
        pairs = parse_qsl(split.query, keep_blank_values=True)
        query = dict(pairs)
        if len(query) != len(pairs):
            raise ValueError("duplicate query parameters in the authorize URL")
        with self._lock:
            self.authorizations.append(query)
        if flavour == "microsoft":
            if query.get("response_mode", "query") not in ("query", "fragment", "form_post"):
                raise ValueError(f"AADSTS900144: response_mode {query.get('response_mode')!r} is not supported")
            resources = {p[0] for part in query.get("scope", "").split() if (p := _split_scope(part)) is not None}
            if resources - self.resources:
                raise ValueError(f"AADSTS70011: The provided value for the input parameter 'scope' is not valid: "
                                 f"{query.get('scope')!r}")  # fmt: skip
            if "client_secret" in query:  # a confidential client's secret never goes through the browser
                raise ValueError("AADSTS900144: client_secret does not belong in the authorize request")
        with self._lock:
            if directory_id is not None and directory_id not in self._tenants:
                raise ValueError(f"AADSTS90002: Tenant '{directory_id}' not found.")
            client_id = query.get("client_id", "")
            app = self._apps.get(client_id)
            if not client_id or app is None or (directory_id and app.directory_id not in (None, directory_id)):
                raise ValueError(f"AADSTS700016: Application with identifier '{client_id}' was not found")
            if query.get("response_type") != "code":
                raise ValueError(f"response_type must be 'code', got {query.get('response_type')!r}")
            redirect_uri = query.get("redirect_uri", "")
            if redirect_uri not in app.redirect_uris:
                raise ValueError(
                    f"AADSTS50011: The redirect URI '{redirect_uri}' specified in the request does not match the"
                    f" redirect URIs configured for the application '{client_id}': {list(app.redirect_uris)}"
                )
            scope = query.get("scope", "")
            if not scope.split():
                raise ValueError("scope is missing or empty")
            state = query.get("state", "")
            if not state:
                raise ValueError("state is missing or empty")
            challenge = query.get("code_challenge", "")
            if not _CODE_CHALLENGE.match(challenge):
                raise ValueError(f"code_challenge must be 43-128 base64url characters, got {challenge!r}")
            if query.get("code_challenge_method") != "S256":
                raise ValueError(f"code_challenge_method must be 'S256', got {query.get('code_challenge_method')!r}")
            prefix = "1.AQ" if flavour == "microsoft" else "4/0A"
            code = prefix + secrets.token_urlsafe(48)
            self._codes[code] = _Code(
                code=code,
                flavour=flavour,
                client_id=client_id,
                directory_id=directory_id,
                redirect_uri=redirect_uri,
                scope=scope,
                subject=subject,
                challenge=challenge,
                expires_at=time.time() + _CODE_LIFETIME,
                email=email,
            )
        separator = "&" if "?" in redirect_uri else "?"
        return f"{redirect_uri}{separator}{urlencode({'code': code, 'state': state})}", code

    # ---- HTTP ----------------------------------------------------------------------------

    def _handle(self, request: HTTPRequest) -> HTTPResponse:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=request.body,
            at=request.at,
        )
        with self._lock:
            self.requests.append(record)
        flavour: Flavour | None = None
        directory_id: str | None = None
        if (match := _MICROSOFT_TOKEN.match(request.path)) is not None:
            flavour, directory_id = "microsoft", match.group(1)
        elif request.path == GOOGLE_TOKEN_PATH:
            flavour = "google"
        if flavour is None:
            response = json_response(404, {"error": "not_found", "error_description": f"No route {request.path}"})
        else:
            response = self._token_endpoint(request, record, flavour, directory_id)
        record.status = response.status
        return response

    def _token_endpoint(
        self, request: HTTPRequest, record: RecordedRequest, flavour: Flavour, directory_id: str | None
    ) -> HTTPResponse:
        correlation = request.headers.get("client-request-id")
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        form: dict[str, str] | None = None
        form_problem: _Reject | None = None
        try:
            form = self._parse_form(request, flavour)
        except _Reject as reject:
            form_problem = reject
        record.form = form
        if form is not None:
            with contextlib.suppress(_Reject):
                record.client_auth = self._client_auth(request, form, flavour)[2]
        if self.delay:
            time.sleep(self.delay)
        if failure is not None:
            if failure.aadsts is None or flavour == "google":
                return json_response(
                    failure.status,
                    {"error": failure.error, "error_description": "The service is temporarily unavailable."},
                )
            return self._render(
                flavour,
                _ms(
                    failure.status,
                    failure.error,
                    failure.aadsts,
                    "RequestBudgetExceededError - A transient error has occurred. Please try again.",
                ),
                correlation,
            )
        try:
            if request.method != "POST":
                response = self._render(
                    flavour,
                    _Reject(
                        405,
                        "invalid_request",
                        f"The endpoint only accepts POST, OPTIONS requests. Received a {request.method} request.",
                        900561,
                    )
                    if flavour == "microsoft"
                    else _google(405, "invalid_request", "Method not allowed."),
                    correlation,
                )
                response.headers.append(("Allow", "POST"))
                return response
            if flavour == "microsoft" and directory_id is not None:
                with self._lock:
                    known = directory_id in self._tenants
                if not known:
                    raise _ms(
                        400,
                        "invalid_request",
                        90002,
                        f"Tenant '{directory_id}' not found. Check to make sure you have the correct tenant ID and"
                        " are signing into the correct cloud. Check with your subscription administrator, this may"
                        " happen if there are no active subscriptions for the tenant.",
                    )
            if form_problem is not None:
                raise form_problem
            assert form is not None
            return self._grant(request, form, flavour, directory_id)
        except _Reject as reject:
            return self._render(flavour, reject, correlation)

    def _render(self, flavour: Flavour, reject: _Reject, correlation: str | None) -> HTTPResponse:
        if flavour == "google" or reject.aadsts is None:
            return json_response(reject.status, {"error": reject.error, "error_description": reject.text})
        trace_id = str(uuid.uuid4())
        try:
            correlation_id = str(uuid.UUID(correlation or ""))
        except ValueError:
            correlation_id = str(uuid.uuid4())
        stamp = _utc_stamp()
        description = (
            f"AADSTS{reject.aadsts}: {reject.text}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
        )
        return json_response(
            reject.status,
            {
                "error": reject.error,
                "error_description": description,
                "error_codes": [reject.aadsts],
                "timestamp": stamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": f"https://login.microsoftonline.com/error?code={reject.aadsts}",
            },
        )

    @staticmethod
    def _missing(flavour: Flavour, name: str) -> _Reject:
        if flavour == "microsoft":
            return _ms(
                400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
            )
        return _google(400, "invalid_request", f"Missing required parameter: {name}")

    def _parse_form(self, request: HTTPRequest, flavour: Flavour) -> dict[str, str]:
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            # The real endpoints do not read any other body: the form fields are simply missing.
            raise self._missing(flavour, "grant_type")
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise (
                _ms(400, "invalid_request", 90023, "The request body is not valid UTF-8 form data.")
                if flavour == "microsoft"
                else _google(400, "invalid_request", "Invalid request body.")
            ) from exc
        pairs = parse_qsl(text, keep_blank_values=True)
        form = dict(pairs)
        if len(form) != len(pairs):
            names = [name for name, _ in pairs]
            duplicate = next(name for i, name in enumerate(names) if name in names[:i])
            raise (
                _ms(
                    400,
                    "invalid_request",
                    9000411,
                    f"The request is not properly formatted. The parameter '{duplicate}' is duplicated.",
                )
                if flavour == "microsoft"
                else _google(400, "invalid_request", f"Duplicate parameter: {duplicate}")
            )
        return form

    def _client_auth(
        self, request: HTTPRequest, form: dict[str, str], flavour: Flavour
    ) -> tuple[str | None, str | None, Literal["form", "basic", "none"]]:
        """(client_id, client_secret, method) per RFC 6749 §2.3.1."""
        ms = flavour == "microsoft"
        header = request.headers.get("authorization")
        form_secret = form.get("client_secret") or None
        form_id = form.get("client_id") or None
        if "client_assertion" in form:
            raise (
                _ms(400, "invalid_request", 90023, "client_assertion (certificate) is not supported by this fake.")
                if ms
                else _google(400, "invalid_request", "client_assertion is not supported.")
            )
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() != "basic":
                raise (
                    _ms(
                        401,
                        "invalid_client",
                        7000218,
                        "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                    )
                    if ms
                    else _google(401, "invalid_client", "Unauthorized")
                )
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise (
                    _ms(401, "invalid_client", 7000215, "Invalid client secret provided.")
                    if ms
                    else _google(401, "invalid_client", "Unauthorized")
                ) from exc
            raw_id, colon, raw_secret = decoded.partition(":")
            if not colon:
                raise (
                    _ms(401, "invalid_client", 7000215, "Invalid client secret provided.")
                    if ms
                    else _google(401, "invalid_client", "Unauthorized")
                )
            basic_id, basic_secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if form_secret is not None:
                raise (
                    _ms(
                        400,
                        "invalid_request",
                        90023,
                        "The request uses multiple client authentication methods: client_secret in the body and"
                        " an Authorization: Basic header. Use only one.",
                    )
                    if ms
                    else _google(400, "invalid_request", "Multiple client authentication methods.")
                )
            if form_id is not None and form_id != basic_id:
                raise (
                    _ms(400, "invalid_request", 90023, "client_id in the body does not match the Basic credentials.")
                    if ms
                    else _google(400, "invalid_request", "client_id mismatch.")
                )
            return basic_id, basic_secret, "basic"
        if form_secret is not None:
            return form_id, form_secret, "form"
        return form_id, None, "none"

    def _grant(
        self, request: HTTPRequest, form: dict[str, str], flavour: Flavour, directory_id: str | None
    ) -> HTTPResponse:
        ms = flavour == "microsoft"
        grant_type = form.get("grant_type") or ""
        if not grant_type:
            raise self._missing(flavour, "grant_type")
        supported = (
            {"client_credentials", "refresh_token", "authorization_code"}
            if ms
            else {
                "refresh_token",
                "authorization_code",
            }
        )
        if grant_type not in supported:
            raise (
                _ms(
                    400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant_type}'."
                )
                if ms
                else _google(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
            )
        client_id, secret, _ = self._client_auth(request, form, flavour)
        if not client_id:
            raise (
                self._missing(flavour, "client_id")
                if ms
                else _google(400, "invalid_request", "Could not determine client ID from request.")
            )
        with self._lock:
            app = self._apps.get(client_id)
            if app is None or (ms and app.directory_id not in (None, directory_id)):
                raise (
                    _ms(
                        400,
                        "unauthorized_client",
                        700016,
                        f"Application with identifier '{client_id}' was not found in the directory"
                        f" '{directory_id}'. This can happen if the application has not been installed by the"
                        " administrator of the tenant or consented to by any user in the tenant. You may have sent"
                        " your authentication request to the wrong tenant.",
                    )
                    if ms
                    else _google(401, "invalid_client", "The OAuth client was not found.")
                )
            self._authenticate(app, secret, flavour)
            if grant_type == "client_credentials":
                return self._client_credentials(app, form, directory_id)
            if grant_type == "refresh_token":
                return self._refresh_grant(app, form, flavour, directory_id)
            return self._code_grant(app, form, flavour, directory_id)

    def _authenticate(self, app: _App, secret: str | None, flavour: Flavour) -> None:
        ms = flavour == "microsoft"
        if app.secret is None:
            if secret is not None:
                raise (
                    _ms(
                        401,
                        "invalid_client",
                        700025,
                        "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
                    )
                    if ms
                    else _google(401, "unauthorized_client", "Unauthorized")
                )
            return
        if secret is None:
            raise (
                _ms(
                    401,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                )
                if ms
                else _google(400, "invalid_request", "client_secret is missing.")
            )
        if app.secret_revoked or not hmac.compare_digest(secret.encode(), app.secret.encode()):
            raise (
                _ms(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client"
                    f" secret value, not the client secret ID, for a secret added to app '{app.client_id}'.",
                )
                if ms
                else _google(401, "unauthorized_client", "Unauthorized")
            )
        if app.secret_expired:
            raise (
                _ms(
                    401,
                    "invalid_client",
                    7000222,
                    f"The provided client secret keys for app '{app.client_id}' are expired. Visit the Azure portal"
                    " to create new keys for your app: https://aka.ms/NewClientSecret, or consider using"
                    " certificate credentials for added security: https://aka.ms/certCreds.",
                )
                if ms
                else _google(401, "unauthorized_client", "Unauthorized")
            )

    # ---- grants (called with the lock held) ---------------------------------------------

    def _client_credentials(self, app: _App, form: dict[str, str], directory_id: str | None) -> HTTPResponse:
        scope = form.get("scope", "")
        if not scope.strip():
            raise self._missing("microsoft", "scope")
        parts = scope.split()
        if any(not part.endswith("/.default") for part in parts):
            raise _ms(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows must have a scope value"
                " with /.default suffixed to the resource identifier (application ID URI).",
            )
        if len(parts) != 1:
            raise _ms(
                400,
                "invalid_scope",
                700022,
                f"The provided value for the input parameter scope is not valid because it contains more than one"
                f" resource. Scope {scope} is not valid.",
            )
        resource = parts[0].removesuffix("/.default")
        if resource not in self.resources:
            raise _ms(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named {directory_id}. This can"
                " happen if the application has not been installed by the administrator of the tenant or consented"
                " to by any user in the tenant. You might have sent your authentication request to the wrong"
                " tenant.",
            )
        issued = self._mint(
            flavour="microsoft",
            client_id=app.client_id,
            directory_id=directory_id,
            grant="client_credentials",
            scope=scope,
            audience=resource,
            roles=app.roles,
            scopes=(),
            subject=None,
        )
        return self._success("microsoft", issued, reply_scope=None, refresh_token=None)

    def _ms_delegated_scopes(
        self, requested: str, granted: str, app: _App, *, required: bool
    ) -> tuple[str, tuple[str, ...]]:
        """(resource, permissions) for a delegated Microsoft token request against what was granted."""
        granted_pairs = [p for s in granted.split() if (p := _split_scope(s)) is not None]
        wanted = [p for s in requested.split() if (p := _split_scope(s)) is not None]
        if not wanted:
            if required or not granted_pairs:
                raise _ms(
                    400,
                    "invalid_scope",
                    70011,
                    f"The provided value for the input parameter 'scope' is not valid. The scope {requested!r} does"
                    " not name a resource (this fake needs one, e.g. https://outlook.office.com/SMTP.Send).",
                )
            first = granted_pairs[0][0]
            wanted = [p for p in granted_pairs if p[0] == first]
        resources = {resource for resource, _ in wanted}
        if len(resources) != 1:
            raise _ms(
                400,
                "invalid_scope",
                700022,
                f"The provided value for the input parameter scope is not valid because it contains more than one"
                f" resource. Scope {requested} is not valid.",
            )
        resource = resources.pop()
        names: list[str] = []
        for _, name in wanted:
            if name == ".default":
                names.extend(n for r, n in granted_pairs if r == resource and n not in names)
            elif name not in names:
                names.append(name)
        granted_names = {n for r, n in granted_pairs if r == resource}
        if not names or any(name not in granted_names for name in names):
            raise _ms(
                400,
                "invalid_grant",
                65001,
                f"The user or administrator has not consented to use the application with ID '{app.client_id}'."
                " Send an interactive authorization request for this user and resource.",
            )
        return resource, tuple(names)

    def _refresh_grant(
        self, app: _App, form: dict[str, str], flavour: Flavour, directory_id: str | None
    ) -> HTTPResponse:
        ms = flavour == "microsoft"
        token = form.get("refresh_token") or ""
        if not token:
            raise self._missing(flavour, "refresh_token")
        grant = self._refresh.get(token)
        if grant is None or grant.revoked:
            raise (
                _ms(
                    400,
                    "invalid_grant",
                    70008,
                    "The provided authorization code or refresh token has expired due to inactivity. Send a new"
                    " interactive authorization request for this user and resource.",
                )
                if ms
                else _google(400, "invalid_grant", "Token has been expired or revoked.")
            )
        if grant.client_id != app.client_id or (ms and grant.directory_id not in (None, directory_id)):
            raise (
                _ms(400, "invalid_grant", 70000, "Provided grant is invalid or malformed.")
                if ms
                else _google(400, "invalid_grant", "Bad Request")
            )
        if ms:
            requested = form.get("scope", "")
            if not requested.strip():
                raise self._missing(flavour, "scope")
            resource, names = self._ms_delegated_scopes(requested, grant.scope, app, required=True)
            reply_scope = " ".join(f"{resource}/{name}" for name in names)
            new_refresh = self._rotate(grant)
            issued = self._mint(
                flavour="microsoft",
                client_id=app.client_id,
                directory_id=directory_id,
                grant="refresh_token",
                scope=reply_scope,
                audience=resource,
                roles=(),
                scopes=names,
                subject=grant.subject,
            )
            return self._success("microsoft", issued, reply_scope=reply_scope, refresh_token=new_refresh)
        granted = grant.scope.split()
        requested_list = (form.get("scope") or "").split() or granted
        if any(s not in granted for s in requested_list):
            raise _google(400, "invalid_scope", "Some requested scopes were invalid.")
        reply_scope = " ".join(requested_list)
        new_refresh = self._rotate(grant)
        issued = self._mint(
            flavour="google",
            client_id=app.client_id,
            directory_id=None,
            grant="refresh_token",
            scope=reply_scope,
            audience=app.client_id,
            roles=(),
            scopes=tuple(requested_list),
            subject=grant.subject,
        )
        return self._success("google", issued, reply_scope=reply_scope, refresh_token=new_refresh)

    def _rotate(self, grant: _RefreshGrant) -> str | None:
        """A new refresh token for a rotating grant (the old one stays valid, as at Microsoft)."""
        if not grant.rotate:
            return None
        token = "1.AQ" + secrets.token_urlsafe(96)
        self._refresh[token] = _RefreshGrant(
            token, grant.client_id, grant.subject, grant.scope, True, grant.directory_id
        )
        return token

    def _code_grant(self, app: _App, form: dict[str, str], flavour: Flavour, directory_id: str | None) -> HTTPResponse:
        ms = flavour == "microsoft"
        code_value = form.get("code") or ""
        if not code_value:
            raise self._missing(flavour, "code")
        redirect_uri = form.get("redirect_uri") or ""
        if not redirect_uri:
            raise self._missing(flavour, "redirect_uri")
        code = self._codes.get(code_value)
        if code is None or code.flavour != flavour:
            raise (
                _ms(
                    400,
                    "invalid_grant",
                    70008,
                    "The provided authorization code or refresh token has expired due to inactivity. Send a new"
                    " interactive authorization request for this user and resource.",
                )
                if ms
                else _google(400, "invalid_grant", "Malformed auth code.")
            )
        if code.client_id != app.client_id:
            raise (
                _ms(400, "invalid_grant", 70000, "Provided grant is invalid or malformed.")
                if ms
                else _google(400, "invalid_grant", "Bad Request")
            )
        if ms and code.directory_id != directory_id:
            raise _ms(
                400,
                "invalid_grant",
                700005,
                "Provided Authorization Code is intended to use against other tenant, thus rejected.",
            )
        if code.redeemed:
            raise (
                _ms(
                    400,
                    "invalid_grant",
                    54005,
                    "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an"
                    " existing refresh token.",
                )
                if ms
                else _google(400, "invalid_grant", "Bad Request")
            )
        if time.time() >= code.expires_at:
            raise (
                _ms(
                    400,
                    "invalid_grant",
                    70008,
                    "The provided authorization code or refresh token has expired due to inactivity. Send a new"
                    " interactive authorization request for this user and resource.",
                )
                if ms
                else _google(400, "invalid_grant", "Bad Request")
            )
        if redirect_uri != code.redirect_uri:
            raise (
                _ms(
                    400,
                    "invalid_grant",
                    500112,
                    f"The reply address '{redirect_uri}' does not match the reply address '{code.redirect_uri}'"
                    " provided when requesting Authorization code.",
                )
                if ms
                else _google(400, "redirect_uri_mismatch", "Bad Request")
            )
        verifier = form.get("code_verifier") or ""
        if not verifier:
            raise (
                _ms(
                    400,
                    "invalid_grant",
                    50148,
                    "The code_verifier does not match the code_challenge supplied in the authorization request for"
                    " PKCE.",
                )
                if ms
                else _google(400, "invalid_grant", "Missing code verifier.")
            )
        if not hmac.compare_digest(pkce_challenge(verifier), code.challenge):
            raise (
                _ms(
                    400,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                )
                if ms
                else _google(400, "invalid_grant", "Invalid code verifier.")
            )
        if ms:
            resource, names = self._ms_delegated_scopes(form.get("scope", ""), code.scope, app, required=False)
            reply_scope = " ".join(f"{resource}/{name}" for name in names)
            audience, scopes = resource, names
            offline = "offline_access" in code.scope.split()
        else:
            reply_scope = code.scope
            audience, scopes = app.client_id, tuple(code.scope.split())
            offline = True  # the tests simulate access_type=offline
        code.redeemed = True
        refresh_token = None
        if offline:
            refresh_token = ("1.AQ" if ms else "1//0") + secrets.token_urlsafe(96 if ms else 64)
            self._refresh[refresh_token] = _RefreshGrant(
                refresh_token, app.client_id, code.subject, code.scope, rotate=ms, directory_id=directory_id
            )
        issued = self._mint(
            flavour=flavour,
            client_id=app.client_id,
            directory_id=directory_id,
            grant="authorization_code",
            scope=reply_scope,
            audience=audience,
            roles=(),
            scopes=scopes,
            subject=code.subject,
        )
        response = self._success(flavour, issued, reply_scope=reply_scope, refresh_token=refresh_token)
        if ms and "openid" in code.scope.split():
            payload = json.loads(response.body)
            payload["id_token"] = self._id_token(app.client_id, directory_id, code)
            response.body = json.dumps(payload).encode()
        return response

    def _id_token(self, client_id: str, directory_id: str | None, code: _Code) -> str:
        """A v2.0 id_token as Entra ID issues it at the code's redemption (claims per the id_token
        reference: aud is the app, tid the directory, preferred_username the sign-in name; email
        only with the email scope)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": client_id,
            "iss": f"https://login.microsoftonline.com/{directory_id}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "name": code.subject.split("@")[0],
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, code.subject)),
            "preferred_username": code.subject,
            "sub": _b64url(hashlib.sha256(f"{client_id}:{code.subject}".encode()).digest()),
            "tid": directory_id,
            "ver": "2.0",
        }
        if "email" in code.scope.split():
            claims["email"] = code.email or code.subject
        header = {"typ": "JWT", "alg": "RS256", "kid": _b64url(secrets.token_bytes(20))}
        parts = (json.dumps(header, separators=(",", ":")), json.dumps(claims, separators=(",", ":")))
        return ".".join(_b64url(p.encode()) for p in parts) + "." + _b64url(secrets.token_bytes(32))

    # ---- tokens --------------------------------------------------------------------------

    def _success(
        self, flavour: Flavour, issued: IssuedToken, *, reply_scope: str | None, refresh_token: str | None
    ) -> HTTPResponse:
        lifetime = round(issued.expires_at - issued.issued_at)
        payload: dict[str, Any] = {"token_type": "Bearer"}
        if reply_scope is not None:
            payload["scope"] = reply_scope
        payload["expires_in"] = lifetime
        if flavour == "microsoft":
            payload["ext_expires_in"] = lifetime
        payload["access_token"] = issued.token
        if refresh_token is not None:
            payload["refresh_token"] = refresh_token
        return json_response(200, payload, cache_control="no-store", pragma="no-cache")

    def _mint(
        self,
        *,
        flavour: Flavour,
        client_id: str,
        directory_id: str | None,
        grant: str,
        scope: str,
        audience: str,
        roles: tuple[str, ...],
        scopes: tuple[str, ...],
        subject: str | None,
    ) -> IssuedToken:
        now = time.time()
        lifetime = self.token_lifetime
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{directory_id}/"
            if flavour == "microsoft"
            else "https://accounts.google.com",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "aio": _b64url(secrets.token_bytes(60)),
            "appid": client_id,
            "appidacr": "0" if subject else "1",
            "idp": f"https://sts.windows.net/{directory_id}/" if flavour == "microsoft" else "google.com",
            "idtyp": "user" if subject else "app",
            "oid": str(uuid.uuid4()),
            "rh": "0.AX" + _b64url(secrets.token_bytes(48)) + ".",
            "uti": _b64url(secrets.token_bytes(16)),
            "ver": "1.0",
        }
        if directory_id is not None:
            claims["tid"] = directory_id
        if subject:
            claims.update(sub=subject, upn=subject, unique_name=subject, scp=" ".join(scopes))
        else:
            claims.update(sub=claims["oid"], roles=list(roles))
        header = {"typ": "JWT", "alg": "RS256", "kid": _b64url(secrets.token_bytes(20))}
        header["x5t"] = header["kid"]
        head = _b64url(json.dumps(header, separators=(",", ":")).encode())
        signature = _b64url(secrets.token_bytes(32))

        def encode(body: dict[str, Any]) -> str:
            return f"{head}.{_b64url(json.dumps(body, separators=(',', ':')).encode())}.{signature}"

        pad = (_TOKEN_SIZE - len(encode(claims))) * 3 // 4 - len(',"xms_pad":""')
        if pad > 0:
            claims["xms_pad"] = secrets.token_urlsafe(pad)[:pad]
        token = encode(claims)
        issued = IssuedToken(
            token=token,
            client_id=client_id,
            directory_id=directory_id,
            grant=grant,
            scope=scope,
            audience=audience,
            roles=tuple(roles),
            scopes=tuple(scopes),
            subject=subject,
            issued_at=now,
            expires_at=now + lifetime,
        )
        self.issued[token] = issued
        return issued
