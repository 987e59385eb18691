"""`mailgate users …`: admin UI users made, listed, given a new password and removed from the
command line; passwords only from stdin or a terminal, never from an argument."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli_settings import CLI

PASSWORD = "a long enough password"


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)


def test_user_lifecycle(cli: CLI) -> None:
    cli("tenants", "add", "acme")
    out = cli(
        "users", "create", "Root@Example.com", "--role", "system-admin", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert "user root@example.com: system-admin" in out.stdout
    made = json.loads(cli("users", "create", "boss@acme.example", "--role", "tenant-admin", "--tenant", "acme",
                          "--password-stdin", "--json", stdin=PASSWORD).stdout)  # fmt: skip
    assert (made["email"], made["role"], made["tenant"]) == ("boss@acme.example", "tenant-admin", "acme")
    listed = json.loads(cli("users", "list", "--json").stdout)
    assert [u["email"] for u in listed] == ["boss@acme.example", "root@example.com"]
    assert PASSWORD not in cli("users", "list").stdout + json.dumps(listed)
    assert [u["email"] for u in json.loads(cli("users", "list", "--tenant", "acme", "--json").stdout)] == [
        "boss@acme.example"]  # fmt: skip
    assert "every session of theirs has ended" in cli("users", "password", "boss@acme.example", "--password-stdin",
                                                      stdin="another long password").stdout  # fmt: skip
    cli("users", "remove", "boss@acme.example")
    assert [u["email"] for u in json.loads(cli("users", "list", "--json").stdout)] == ["root@example.com"]
    # A tenant's admins go with the tenant.
    cli("users", "create", "it@acme.example", "--role", "tenant-admin", "--tenant", "acme", "--password-stdin",
        stdin=PASSWORD)  # fmt: skip
    cli("tenants", "remove", "acme")
    assert [u["email"] for u in json.loads(cli("users", "list", "--json").stdout)] == ["root@example.com"]


@pytest.mark.parametrize(
    ("args", "stdin", "text"),
    [
        (["users", "create", "a@example.com", "--role", "sender", "--password-stdin"], PASSWORD,
         "role: is one of system-admin, tenant-admin"),
        (["users", "create", "a@example.com", "--role", "tenant-admin", "--password-stdin"], PASSWORD,
         "a tenant admin belongs to one tenant"),
        (["users", "create", "a@example.com", "--role", "tenant-admin", "--tenant", "nope", "--password-stdin"],
         PASSWORD, "there is no tenant 'nope'"),
        (["users", "create", "a@example.com", "--role", "system-admin", "--password-stdin"], "short",
         "password: is at least 12 characters"),
        (["users", "create", "not an address", "--role", "system-admin", "--password-stdin"], PASSWORD,
         "is not a valid address"),
        (["users", "create", "a@example.com", "--role", "system-admin"], "", "give it with --password-stdin"),
        (["users", "remove", "nobody@example.com"], "", "there is no user nobody@example.com"),
        (["users", "password", "nobody@example.com", "--password-stdin"], PASSWORD, "there is no user"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_and_says_why(cli: CLI, args: list[str], stdin: str, text: str) -> None:
    assert text in cli(*args, stdin=stdin, check=2).stderr


def test_the_same_address_twice_is_a_conflict(cli: CLI) -> None:
    cli("users", "create", "a@example.com", "--role", "system-admin", "--password-stdin", stdin=PASSWORD)
    again = cli("users", "create", "A@example.com", "--role", "system-admin", "--password-stdin", stdin=PASSWORD,
                check=2)  # fmt: skip
    assert "there is already a user a@example.com" in again.stderr
