"""Review of the URLs in a mail server document, and of what a stored document that no longer
parses does, against the real HTTP API (`mailgate serve`, test_hostile's operator).

Each test ran against the code before its fix and failed there: every URL field but ews.url took
a user name and password (https://user:pass@host/…), which httpx sends as Basic credentials of
its own in place of the Authorization mailgate sets, to wherever the URL points; a port past
65535 was saved.
"""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

import test_hostile
from test_hostile import Operator, problems, smtp_server

relay = test_hostile.relay
operator = test_hostile.operator

OAUTH = {"method": "oauth2", "username": "u@tenant.example"}


def with_url(field: str, url: str) -> dict[str, Any]:
    """A tenant's server document whose `field` is `url` (the other URLs fine)."""
    document = smtp_server("smtp.tenant.example", 587)
    token: dict[str, Any] = {"grant": "client_credentials", "client_id": "c", "client_secret": "s"}
    if field == "auth.token.token_url":
        document["auth"] = {**OAUTH, "token": {**token, "token_url": url}}
    elif field == "auth.token.authority":
        document["auth"] = {**OAUTH, "token": {**token, "provider": "microsoft", "authority": url,
                                               "directory_id": "d"}}  # fmt: skip
    elif field == "auth.token.authorize_url":
        document["auth"] = {**OAUTH, "token": {"grant": "delegated", "client_id": "c", "client_secret": "s",
                                               "token_url": "https://login.tenant.example/token",
                                               "authorize_url": url}}  # fmt: skip
    elif field.startswith("graph."):
        document.pop("smtp")
        document |= {"kind": "graph", "graph": {"directory_id": "d", "client_id": "c", "client_secret": "s",
                                                "mailbox": "no-reply@tenant.example", field[6:]: url}}  # fmt: skip
    else:
        assert field == "ews.url"
        document.pop("smtp")
        document |= {"kind": "ews", "from_address": "no-reply@tenant.example",
                     "auth": {"method": "password", "username": "TENANT\\notify", "password": "pw"},
                     "ews": {"url": url, "mailbox": "no-reply@tenant.example"}}  # fmt: skip
    return document


URL_FIELDS = ["auth.token.token_url", "auth.token.authority", "auth.token.authorize_url", "graph.authority",
              "graph.endpoint", "ews.url"]  # fmt: skip
PATHS = {"auth.token.token_url": "/token", "auth.token.authorize_url": "/authorize", "ews.url": "/EWS/Exchange.asmx"}


@pytest.fixture(scope="module")
def refused(operator: Operator) -> tuple[str, httpx2.Client]:
    """A tenant whose saves the tests below expect refused: (its id, its admin's client)."""
    tenant, admin, _ = operator.tenant()
    return tenant, admin


# ---- 1. no user name or password in a URL; a port is 0-65535 ----------------------------------


def test_every_url_field_is_saved_as_it_is_without_credentials(operator: Operator) -> None:
    """The documents the tests below change are good ones: only the URL makes them refused."""
    tenant, admin, _ = operator.tenant()
    for field in URL_FIELDS:
        reply = admin.put(f"/v1/tenants/{tenant}/server",
                          json=with_url(field, "https://login.tenant.example" + PATHS.get(field, "")))  # fmt: skip
        assert reply.status_code == 200, (field, reply.text)


@pytest.mark.parametrize("userinfo", ["notify:S3cret-in-url@", "notify@", ":S3cret-in-url@"])
@pytest.mark.parametrize("field", URL_FIELDS)
def test_a_url_with_a_user_name_or_password_is_refused_naming_its_field(
    refused: tuple[str, httpx2.Client], field: str, userinfo: str
) -> None:
    tenant, admin = refused
    url = f"https://{userinfo}login.tenant.example" + PATHS.get(field, "")
    reply = admin.put(f"/v1/tenants/{tenant}/server", json=with_url(field, url))
    assert reply.status_code == 422, reply.text
    assert list(problems(reply)) == [field] and "user name or password" in problems(reply)[field], reply.text
    assert "S3cret-in-url" not in reply.text  # the refusal does not repeat a password
    assert admin.get(f"/v1/tenants/{tenant}/server").status_code == 404  # nothing was saved


@pytest.mark.parametrize("port", ["99999", "65536", "8o"])
@pytest.mark.parametrize("field", URL_FIELDS)
def test_a_url_whose_port_is_not_0_to_65535_is_refused_naming_its_field(
    refused: tuple[str, httpx2.Client], field: str, port: str
) -> None:
    tenant, admin = refused
    url = f"https://login.tenant.example:{port}" + PATHS.get(field, "")
    reply = admin.put(f"/v1/tenants/{tenant}/server", json=with_url(field, url))
    assert reply.status_code == 422, reply.text
    assert list(problems(reply)) == [field] and "port" in problems(reply)[field], reply.text
