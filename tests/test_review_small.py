"""Four small fixes from a review: a batch item that is not a JSON object is answered alone; a
Message-ID mailgate made follows the From into the server's domain when the server sends as its
own address; an attachment keeps its charset (API, Django, `mailgate send --attach`, the SMTP
ingress); `mailgate serve --demo` says how to send through its SMTP ingress. Real peers only."""

from __future__ import annotations

import sys
from pathlib import Path

from mailgate import Mailgate
from mailgate.config import Config
from test_batch import URL, api, count, message

MAILGATE = str(Path(sys.executable).with_name("mailgate"))
SENDER = "no-reply@operator.example"
FAST = Config(retry_base=0.05, retry_max_delay=0.2, poll_interval=0.05)


# ---- 1. a batch item that is not a JSON object -------------------------------------------------------


async def test_a_batch_item_that_is_not_an_object_is_answered_alone_and_the_others_are_stored(mg: Mailgate) -> None:
    async with api(mg) as (http, _, sender, _peer):
        body = {"messages": [message(0), 42, "a message", None, [message(4)], True, message(6)]}
        reply = await http.post(URL, json=body, headers=sender)
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r.get("status") for r in results] == ["queued", None, None, None, None, None, "queued"]
        for i, kind in [(1, "a number"), (2, "a string"), (3, "null"), (4, "an array"), (5, "a boolean")]:
            assert results[i] == {"error": {
                "status": 422, "code": "invalid_input", "message": "the message is not valid",
                "problems": [{"field": f"messages[{i}]", "problem": f"is {kind}, not a JSON object (a message)"}],
            }}, results[i]  # fmt: skip
        # Shaped as the error of an object that is not a valid message.
        bad = (await http.post(URL, json={"messages": [message(9, colour="red")]}, headers=sender)).json()["results"][0]
        assert bad["error"].keys() == results[1]["error"].keys()
        assert bad["error"]["message"] == results[1]["error"]["message"]
        assert await count(mg) == 2
