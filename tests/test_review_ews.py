"""Review of the EWS transport: what a hostile or broken Exchange (or Autodiscover answer) could do.

Each test ran against the code before its fix and failed there.
"""

from __future__ import annotations

import pytest

import test_ews
from fakes.ews import FakeEWS
from mailgate.errors import SettingsError
from mailgate.settings.document import parse_server
from test_ews import ews_doc

ews = test_ews.ews


def test_an_ews_url_with_user_and_password_is_refused_at_save(ews: FakeEWS) -> None:
    doc = ews_doc(ews)
    doc["ews"]["url"] = doc["ews"]["url"].replace("http://", "http://notify:secret@", 1)
    with pytest.raises(SettingsError) as refused:
        parse_server(doc)
    assert [f for f, _ in refused.value.problems] == ["ews.url"] and "user:password@" in refused.value.problems[0][1]
