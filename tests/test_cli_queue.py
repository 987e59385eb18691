"""`mailgate send --tenant` into the outbox, `mailgate worker`, and `mailgate queue …`, as an operator
runs them: the installed command in a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from smtp_servers import RecordingServer, ServerConfig, serve_in_thread
from test_cli_settings import CLI, MAILGATE


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    cli = CLI(tmp_path)
    cli.env.update({"MAILGATE_POLL_INTERVAL": "0.1", "MAILGATE_RETRY_BASE": "0.1", "MAILGATE_RETRY_MAX_DELAY": "0.2"})
    return cli


def configure(cli: CLI, server: RecordingServer) -> None:
    doc = cli.doc(smtp={"host": server.host, "port": server.port, "security": "none"}, auth={"method": "none"})
    cli("tenants", "add", "acme")
    cli("servers", "set", "global", "--file", doc)


def test_send_queues_and_the_worker_delivers(cli: CLI) -> None:
    with serve_in_thread(ServerConfig()) as server:
        configure(cli, server)
        out = json.loads(cli("send", "--tenant", "acme", "--to", "a@example.org", "--subject", "Hi", "--text", "x",
                             "--json").stdout)  # fmt: skip
        assert out["status"] == "queued"
        assert server.messages == []  # queued, not sent
        assert "worker stopped: 1 sent" in cli("worker", "--until-idle").stdout
        (received,) = server.wait_for_messages_sync(1)
    shown = json.loads(cli("queue", "show", str(out["id"]), "--json").stdout)
    assert shown["status"] == "sent" and shown["attempt_log"][0]["outcome"] == "accepted"
    assert received.rcpt_tos == ["a@example.org"]
    assert "sent" in cli("queue", "show", str(out["id"])).stdout


def test_idempotency_key_from_the_command_line(cli: CLI) -> None:
    with serve_in_thread(ServerConfig()) as server:
        configure(cli, server)
        args = ["send", "--tenant", "acme", "--to", "a@example.org", "--text", "x", "--idempotency-key", "k1", "--json"]
        first, again = (json.loads(cli(*args).stdout)["id"] for _ in range(2))
    assert first == again
    assert len(json.loads(cli("queue", "list", "--json").stdout)) == 1
    assert "goes with --tenant" in cli("send", "--tenant", "acme", "--now", "--to", "a@example.org", "--text", "x",
                                       "--idempotency-key", "k", check=2).stderr  # fmt: skip


def test_queue_list_cancel_retry_and_stats(cli: CLI) -> None:
    refuse = ServerConfig(rcpt_reply=lambda a, i: "550 5.1.1 User unknown" if a.startswith("bad") else None)
    with serve_in_thread(refuse) as server:
        configure(cli, server)
        ids = [json.loads(cli("send", "--tenant", "acme", "--to", to, "--text", "x", "--json").stdout)["id"]
               for to in ("good@example.org", "bad@example.org", "later@example.org")]  # fmt: skip
        assert f"cancelled message {ids[2]}" in cli("queue", "cancel", str(ids[2])).stdout
        cli("worker", "--until-idle")
        server.wait_for_messages_sync(1)
    listed = {m["id"]: m["status"] for m in json.loads(cli("queue", "list", "--json").stdout)}
    assert listed == {ids[0]: "sent", ids[1]: "failed", ids[2]: "cancelled"}
    assert [m["id"] for m in json.loads(cli("queue", "list", "--status", "failed", "--json").stdout)] == [ids[1]]
    stats = json.loads(cli("queue", "stats", "--json").stdout)
    assert stats["by_status"]["sent"] == 1 and stats["by_status"]["failed"] == 1
    assert "only waiting messages" in cli("queue", "cancel", str(ids[0]), check=2).stderr
    assert "queued again: 1 failed message(s)" in cli("queue", "retry", "--failed").stdout
    assert "queued again: message" in cli("queue", "retry", str(ids[2])).stdout
    assert "there is no message 999" in cli("queue", "show", "999", check=2).stderr
    assert "status: is one of held, queued" in cli("queue", "list", "--status", "lost", check=2).stderr
    assert "removed 0 message bodies" in cli("queue", "purge").stdout


def test_send_is_refused_when_sending_is_disabled(cli: CLI) -> None:
    cli("tenants", "add", "acme")
    out = cli("send", "--tenant", "acme", "--to", "a@example.org", "--text", "x", check=4)
    assert "sending is disabled for every tenant" in out.stderr


def test_the_worker_stops_gracefully_on_sigterm(cli: CLI) -> None:
    with serve_in_thread(ServerConfig()) as server:
        configure(cli, server)
        worker = subprocess.Popen([MAILGATE, "worker"], env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            cli("send", "--tenant", "acme", "--to", "a@example.org", "--text", "x")
            server.wait_for_messages_sync(1, timeout=20)
            time.sleep(0.2)
        finally:
            worker.send_signal(signal.SIGTERM)
            out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert b"worker stopped: 1 sent" in out
