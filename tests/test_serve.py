"""`mailgate serve` as the operator runs it: a real process on the embedded default (SQLite in the
working directory), the first-token hint, a message submitted over HTTP and delivered by the
worker in the same process to a real SMTP server, readiness, and a graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from conftest import TEST_KEY
from smtp_servers import serve_in_thread

MAILGATE = str(Path(sys.executable).with_name("mailgate"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Served:
    def __init__(self, cwd: Path, env: dict[str, str], args: list[str]) -> None:
        self.cwd, self.env = cwd, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / "serve.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([MAILGATE, "serve", "--port", str(self.port), *args], cwd=cwd, env=env,
                                            stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx2.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, "mailgate serve did not answer within 30 s"
            time.sleep(0.1)

    def cli(self, *args: str) -> str:
        done = subprocess.run([MAILGATE, *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    drop = ("MAILGATE_DATABASE_URL", "MAILGATE_CONFIG_FILE")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "MAILGATE_SECRET_KEYS": TEST_KEY,
            "MAILGATE_POLL_INTERVAL": "0.1"}  # fmt: skip


@pytest.fixture
def served(tmp_path: Path, env: dict[str, str]) -> Iterator[Served]:
    s = Served(tmp_path, env, [])
    yield s
    if s.process.poll() is None:
        s.process.kill()
        s.process.wait()


def test_serve_delivers_what_is_submitted_over_http_and_stops_gracefully(served: Served) -> None:
    assert "listening on http://127.0.0.1" in served.output()
    assert "mailgate tokens create --role system-admin" in served.output()  # no token yet: how to make one
    assert (served.cwd / "mailgate.db").exists()  # the embedded default, in the working directory

    admin = served.cli("tokens", "create", "--role", "system-admin").strip()
    with serve_in_thread() as smtp:
        auth = {"Authorization": f"Bearer {admin}"}
        with httpx2.Client(base_url=served.url, headers=auth, timeout=10) as http:
            assert http.post("/v1/tenants", json={"id": "acme"}).status_code == 201
            server = {"from_address": "no-reply@example.com",
                      "smtp": {"host": smtp.host, "port": smtp.port, "security": "none"}}  # fmt: skip
            assert http.put("/v1/servers/global", json=server).status_code == 200
            sender = json.loads(served.cli("tokens", "create", "--role", "sender", "--tenant", "acme", "--json"))
            reply = http.post("/v1/messages", json={"to": ["bob@example.org"], "subject": "Welcome", "text": "hi"},
                              headers={"Authorization": f"Bearer {sender['token']}"})  # fmt: skip
            assert reply.status_code == 202, reply.text
            deadline = time.monotonic() + 30
            while (status := http.get(reply.headers["location"]).json()["status"]) != "sent":
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            ready = http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "worker": "ok"}
        assert [m.parsed()["Subject"] for m in smtp.messages] == ["Welcome"]
    listed = served.cli("tokens", "list")
    assert admin not in listed and sender["token"] not in listed and admin[:12] in listed

    assert served.stop() == 0
    assert served.output().rstrip().endswith("mailgate: stopped")
    assert admin not in served.output() and sender["token"] not in served.output()  # never logged


def test_no_worker_serves_the_api_alone(tmp_path: Path, env: dict[str, str]) -> None:
    served = Served(tmp_path, env, ["--no-worker"])
    try:
        admin = served.cli("tokens", "create", "--role", "system-admin").strip()
        served.cli("tenants", "add", "acme")
        served.cli("servers", "set", "global", "--file", str(_write(tmp_path / "g.json")))
        with httpx2.Client(base_url=served.url, headers={"Authorization": f"Bearer {admin}"}, timeout=10) as http:
            ready = http.get("/readyz").json()
            assert ready["checks"]["worker"] == "not in this process"
            reply = http.post("/v1/messages", json={"tenant": "acme", "to": ["bob@example.org"], "subject": "s"})
            assert reply.status_code == 202
            time.sleep(0.5)  # a worker would have tried by now (poll interval 0.1 s)
            assert http.get(reply.headers["location"]).json()["attempts"] == 0
        assert "no worker" in served.output()
    finally:
        assert served.stop() == 0


def test_port_in_use_is_a_clear_failure(tmp_path: Path, env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([MAILGATE, "serve", "--port", str(port)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "address already in use" in (done.stdout + done.stderr).lower()


def _write(path: Path) -> Path:
    path.write_text(json.dumps({"from_address": "no-reply@example.com",
                                "smtp": {"host": "127.0.0.1", "port": 9, "security": "none"}}))  # fmt: skip
    return path


def _sign_in(client: httpx2.Client, email: str, password: str) -> httpx2.Response:
    import re

    login = client.get("/admin/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', login.text)
    assert token is not None
    return client.post("/admin/login", data={"email": email, "password": password, "csrf_token": token.group(1)})


def test_demo_captures_mail_and_makes_a_demo_admin(tmp_path: Path, env: dict[str, str]) -> None:
    import re

    first = Served(tmp_path, env, ["--demo"])
    try:
        deadline = time.monotonic() + 30
        while "demo admin:" not in first.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        out = first.output()
        found = re.search(r"sign in at (\S+)/admin as (\S+) with the password (\S+)", out)
        port = re.search(r"captured on 127\.0\.0\.1:(\d+)", out)
        assert found is not None and port is not None, out
        assert found.group(1) == first.url and found.group(2) == "demo-admin@example.com"
        with httpx2.Client(base_url=first.url, timeout=10) as browser:
            assert _sign_in(browser, found.group(2), found.group(3)).status_code == 303
            # The welcome message went through the outbox and the worker to the capture server.
            deadline = time.monotonic() + 30
            while "Welcome to mailgate" not in (page := browser.get("/admin/captured")).text:
                assert time.monotonic() < deadline, page.text
                time.sleep(0.2)
            assert "someone@example.com" in page.text
            shown = browser.get("/admin/captured/1")
            assert "went through mailgate&#39;s outbox" in shown.text and "<iframe" in shown.text
            assert "Welcome to mailgate" in browser.get("/admin/messages").text
        assert first.stop() == 0
    finally:
        if first.process.poll() is None:
            first.process.kill()
            first.process.wait()
    # Started again: a new capture port becomes the global server's, the old password stops working.
    second = Served(tmp_path, env, ["--demo"])
    try:
        deadline = time.monotonic() + 30
        while "demo admin:" not in second.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        again = re.search(r"with the password (\S+)", second.output())
        new_port = re.search(r"captured on 127\.0\.0\.1:(\d+)", second.output())
        assert again is not None and new_port is not None and again.group(1) != found.group(3)
        doc = json.loads(second.cli("servers", "show", "global", "--json"))
        assert doc["server"]["smtp"]["port"] == int(new_port.group(1))
        with httpx2.Client(base_url=second.url, timeout=10) as browser:
            assert _sign_in(browser, "demo-admin@example.com", found.group(3)).status_code == 401
            assert _sign_in(browser, "demo-admin@example.com", again.group(1)).status_code == 303
        assert second.stop() == 0
    finally:
        if second.process.poll() is None:
            second.process.kill()
            second.process.wait()
