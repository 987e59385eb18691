"""Message validation and composition. Every composed message is parsed back with the stdlib
`email` parser and compared field by field, payload by payload."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage

import pytest

from mailgate import Address, Attachment, Message, MessageError

BINARY = bytes(range(256)) * 40


def parse(raw: bytes) -> EmailMessage:
    """Parse as a reader would. Raw UTF-8 headers (RFC 6532) are decoded as text first, because
    the stdlib's bytes parser reads headers as ASCII; bodies are 7-bit either way."""
    if raw.isascii():
        msg = email.message_from_bytes(raw, policy=email.policy.default)
    else:
        msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def content(part: EmailMessage) -> str:
    """A text part's content with line ends as the application wrote them (LF): on the wire they
    are CRLF, and the stdlib parser hands them over as they were."""
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def assert_wire_format(raw: bytes) -> None:
    """CRLF only, no line over 998 octets, and ASCII unless UTF-8 headers were asked for."""
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def simple(**kw: object) -> Message:
    fields: dict[str, object] = {"from_": "sender@example.com", "to": "rcpt@example.com", "subject": "Hi"}
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


# ---- composition -------------------------------------------------------------------------------


def test_ascii_text_is_7bit_single_part() -> None:
    m = simple(text="Hello,\nyour password reset link: https://app.example/r/abc\n")
    raw = m.compose()
    assert_wire_format(raw)
    assert raw.isascii()
    p = parse(raw)
    assert p.get_content_type() == "text/plain"
    assert p["Content-Transfer-Encoding"] == "7bit"
    assert content(p) == "Hello,\nyour password reset link: https://app.example/r/abc\n"
    assert p["From"] == "sender@example.com"
    assert p["To"] == "rcpt@example.com"
    assert p["Subject"] == "Hi"
    assert p["MIME-Version"] == "1.0"
    assert p["Message-ID"] == m.message_id
    assert p["Date"].datetime == m.date


def test_text_and_html_make_multipart_alternative_text_first() -> None:
    raw = simple(text="plain version", html="<p>html version</p>").compose()
    assert_wire_format(raw)
    p = parse(raw)
    assert p.get_content_type() == "multipart/alternative"
    parts = list(p.iter_parts())
    assert [x.get_content_type() for x in parts] == ["text/plain", "text/html"]
    assert content(parts[0]) == "plain version"
    assert content(parts[1]) == "<p>html version</p>"


def test_html_only_is_a_single_html_part() -> None:
    p = parse(simple(html="<b>only html</b>").compose())
    assert p.get_content_type() == "text/html"
    assert content(p) == "<b>only html</b>"


def test_non_ascii_subject_and_name_become_encoded_words() -> None:
    m = simple(from_="Jörg Müller <joerg@example.de>", subject="Grüße aus Köln – 你好", text="x")
    raw = m.compose()
    assert raw.isascii()
    assert b"=?utf-8?b?" in raw
    p = parse(raw)
    assert p["Subject"] == "Grüße aus Köln – 你好"
    assert p["From"].addresses[0].display_name == "Jörg Müller"
    assert p["From"].addresses[0].addr_spec == "joerg@example.de"


def test_utf8_mode_writes_raw_utf8_headers() -> None:
    m = simple(from_="Jörg <joerg@example.de>", subject="Grüße", text="x")
    raw = m.compose(utf8=True)
    assert "Subject: Grüße\r\n".encode() in raw
    assert b"=?utf-8?" not in raw
    p = parse(raw)
    assert p["Subject"] == "Grüße"
    assert p["From"].addresses[0].display_name == "Jörg"


def test_long_subject_folds_below_78_and_reads_back_unchanged() -> None:
    subject = " ".join(f"word{i}" for i in range(60))
    raw = simple(subject=subject, text="x").compose()
    header_block = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in header_block.split(b"\r\n")) <= 78
    assert parse(raw)["Subject"] == subject


def test_long_non_ascii_subject_splits_encoded_words_between_characters() -> None:
    subject = "Überprüfung der Zugriffsrechte für Ihr Konto " * 6 + "日本語のテキスト" * 10
    raw = simple(subject=subject, text="x").compose()
    assert_wire_format(raw)
    header_block = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in header_block.split(b"\r\n")) <= 80
    assert parse(raw)["Subject"] == subject


def test_subject_with_a_literal_encoded_word_is_not_decoded_by_readers() -> None:
    subject = "literally =?utf-8?b?SGFjaw==?= here"
    assert parse(simple(subject=subject, text="x").compose())["Subject"] == subject


def test_display_name_with_specials_is_quoted() -> None:
    m = simple(from_='"Example, Inc. \\"Ops\\"" <ops@example.com>', text="x")
    assert m.from_.name == 'Example, Inc. "Ops"'
    p = parse(m.compose())
    assert p["From"].addresses[0].display_name == 'Example, Inc. "Ops"'
    assert p["From"].addresses[0].addr_spec == "ops@example.com"


def test_many_recipients_fold_between_addresses() -> None:
    to = [f"Person Number {i} <person{i}@example.com>" for i in range(30)]
    raw = simple(to=to, text="x").compose()
    assert_wire_format(raw)
    p = parse(raw)
    assert [a.addr_spec for a in p["To"].addresses] == [f"person{i}@example.com" for i in range(30)]
    assert [a.display_name for a in p["To"].addresses] == [f"Person Number {i}" for i in range(30)]


def test_bcc_is_in_the_envelope_but_never_in_the_headers() -> None:
    m = simple(to="a@example.com", cc="c@example.com", bcc=["hidden@example.com", "a@example.com"], text="x")
    raw = m.compose()
    assert b"hidden" not in raw
    assert parse(raw)["Bcc"] is None
    env = m.envelope()
    assert env.mail_from == "sender@example.com"
    assert env.rcpt_to == ("a@example.com", "c@example.com", "hidden@example.com")  # each once


def test_envelope_from_can_differ_from_the_header_from() -> None:
    m = simple(text="x")
    assert m.envelope(mail_from="bounces@example.com").mail_from == "bounces@example.com"


def test_internationalized_addresses_are_valid() -> None:
    m = Message(from_="jörg@exämple.de", to=["用户@例子.广告", "info@exämple.de"], subject="x", text="x")
    assert m.requires_smtputf8
    assert m.to[0].address == "用户@例子.广告"
    assert m.to[1].ascii_address == "info@xn--exmple-cua.de"  # IDN domain, ASCII local part
    assert m.from_.ascii_address is None  # non-ASCII local part: SMTPUTF8 only
    env = m.envelope()
    assert env.rcpt_to == ("用户@例子.广告", "info@xn--exmple-cua.de")
    raw = m.compose()  # non-ASCII local parts force UTF-8 headers
    p = parse(raw)
    assert p["From"].addresses[0].addr_spec == "jörg@exämple.de"
    assert [a.addr_spec for a in p["To"].addresses] == ["用户@例子.广告", "info@exämple.de"]


def test_idn_domain_is_punycode_in_ascii_headers() -> None:
    m = Message(from_="info@exämple.de", to="rcpt@example.com", subject="x", text="x")
    assert not m.requires_smtputf8
    raw = m.compose()
    assert raw.isascii()
    assert parse(raw)["From"].addresses[0].addr_spec == "info@xn--exmple-cua.de"


def test_mostly_ascii_text_is_quoted_printable() -> None:
    text = "Hallo Jörg,\n\nIhre Zugriffsprüfung ist fällig.\n" * 3
    raw = simple(text=text).compose()
    assert_wire_format(raw)
    p = parse(raw)
    assert p["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(p) == text


def test_cjk_text_is_base64() -> None:
    text = "您好，您的访问审核请求已经准备好了。请在本周内完成。\n" * 20
    raw = simple(text=text).compose()
    assert_wire_format(raw)
    p = parse(raw)
    assert p["Content-Transfer-Encoding"] == "base64"
    assert content(p) == text


def test_a_line_over_998_characters_is_wrapped_by_quoted_printable() -> None:
    text = "x" * 5000 + "\nshort line\n"
    raw = simple(text=text).compose()
    assert_wire_format(raw)
    p = parse(raw)
    assert p["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(p) == text


def test_line_ends_are_normalized_to_crlf() -> None:
    raw = simple(text="one\rtwo\r\nthree\nfour").compose()
    assert_wire_format(raw)
    assert content(parse(raw)) == "one\ntwo\nthree\nfour"


def test_trailing_whitespace_and_leading_dots_survive() -> None:
    text = "trailing space \n.leading dot\n..two dots\n"
    p = parse(simple(text=text).compose())
    assert content(p) == text


def test_binary_attachment_round_trips() -> None:
    m = simple(text="see attached", attachments=[Attachment("report.bin", "application/octet-stream", BINARY)])
    raw = m.compose()
    assert_wire_format(raw)
    p = parse(raw)
    assert p.get_content_type() == "multipart/mixed"
    body, att = list(p.iter_parts())
    assert content(body) == "see attached"
    assert att.get_filename() == "report.bin"
    assert att.get_content_disposition() == "attachment"
    assert att.get_content_type() == "application/octet-stream"
    assert att.get_payload(decode=True) == BINARY


def test_non_ascii_attachment_filename_round_trips() -> None:
    name = "Prüfbericht März – 報告.pdf"
    p = parse(simple(text="x", attachments=[Attachment(name, "application/pdf", b"%PDF-1.7")]).compose())
    att = list(p.iter_parts())[1]
    assert att.get_filename() == name
    assert att.get_payload(decode=True) == b"%PDF-1.7"


def test_inline_image_goes_in_related_beside_the_html() -> None:
    logo = Attachment("logo.png", "image/png", b"\x89PNG\r\n\x1a\nrest", content_id="logo@example.com")
    report = Attachment("report.csv", "text/csv", b"a,b\r\n1,2\r\n")
    m = simple(text="text", html='<img src="cid:logo@example.com">', attachments=[logo, report])
    p = parse(m.compose())
    assert p.get_content_type() == "multipart/mixed"
    alternative, csv = list(p.iter_parts())
    assert alternative.get_content_type() == "multipart/alternative"
    text, related = list(alternative.iter_parts())
    assert content(text) == "text"
    assert related.get_content_type() == "multipart/related"
    html, image = list(related.iter_parts())
    assert content(html) == '<img src="cid:logo@example.com">'
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content_disposition() == "inline"
    assert image.get_payload(decode=True) == logo.data
    assert csv.get_filename() == "report.csv"
    assert csv.get_payload(decode=True) == report.data


def test_extra_headers_are_kept_and_non_ascii_values_encoded() -> None:
    m = simple(
        text="x", headers={"X-Tenant": "acme", "X-Note": "für dich", "List-Unsubscribe": "<https://u.example/?a=?b>"}
    )
    p = parse(m.compose())
    assert p["X-Tenant"] == "acme"
    assert p["X-Note"] == "für dich"
    assert p["List-Unsubscribe"] == "<https://u.example/?a=?b>"


def test_message_id_and_date_are_fixed_at_construction() -> None:
    m = simple(text="x")
    assert m.message_id.startswith("<") and m.message_id.endswith("@example.com>")
    assert m.compose() == m.compose()


def test_given_message_id_and_date_are_used() -> None:
    when = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)
    m = simple(text="x", message_id="abc.123@example.com", date=when)
    p = parse(m.compose())
    assert p["Message-ID"] == "<abc.123@example.com>"
    assert p["Date"].datetime == when


def test_address_parse_forms() -> None:
    assert Address.parse("a@example.com") == Address("a@example.com")
    assert Address.parse("Alice <a@example.com>") == Address("a@example.com", "Alice")
    assert Address.parse('"Smith, Alice" <a@example.com>').name == "Smith, Alice"
    assert Address.parse("  A@EXAMPLE.COM ").address == "A@example.com"  # domain normalized only


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "   ", "no-at-sign", "a@", "@example.com", "a b@example.com", "a@@example.com"])
def test_malformed_addresses_are_refused(bad: str) -> None:
    with pytest.raises(MessageError) as e:
        simple(to=bad, text="x")
    assert e.value.field == "to[0]"


def test_every_problem_is_reported_with_its_field() -> None:
    with pytest.raises(MessageError) as e:
        Message(from_="bad@", to=["ok@example.com", "worse"], subject="a\r\nBcc: x@example.com", text="x")
    fields = [f for f, _ in e.value.problems]
    assert fields == ["from", "to[1]", "subject"]
    assert "header injection" in str(e.value)


@pytest.mark.parametrize(
    "value",
    [
        "Evil\r\nBcc: victim@example.com <a@example.com>",
        "a@example.com\r\nBcc: victim@example.com",
        "x\n <a@example.com>",
    ],
)
def test_line_breaks_in_addresses_are_refused(value: str) -> None:
    with pytest.raises(MessageError, match=r"header injection|not a valid"):
        simple(to=value, text="x")


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"X-A": "one\r\nBcc: victim@example.com"}, "header injection"),
        ({"X-A\r\nBcc": "v"}, "header injection"),
        ({"X A": "v"}, "without spaces"),
        ({"Bcc": "victim@example.com"}, "set by mailgate"),
        ({"content-type": "text/html"}, "set by mailgate"),
        ([("X-A", "1"), ("x-a", "2")], "given twice"),
        ({"X-Long": "y" * 1000}, "too long"),
    ],
)
def test_bad_extra_headers_are_refused(headers: object, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        simple(text="x", headers=headers)


def test_a_message_needs_a_recipient() -> None:
    with pytest.raises(MessageError, match="no recipient"):
        Message(from_="a@example.com", subject="x", text="x")


def test_oversize_is_refused_before_composing() -> None:
    with pytest.raises(MessageError, match="limit"):
        simple(
            text="x",
            attachments=[Attachment("big.bin", "application/octet-stream", b"\0" * 2_000_000)],
            max_size=1_000_000,
        )


@pytest.mark.parametrize(
    ("attachment", "field"),
    [
        (Attachment("", "text/plain", b""), "filename"),
        (Attachment("a\r\nb.txt", "text/plain", b""), "filename"),
        (Attachment("a.txt", "not a type", b""), "content_type"),
        (Attachment("a.png", "image/png", b"", content_id="<bad>"), "content_id"),
    ],
)
def test_bad_attachments_are_refused(attachment: Attachment, field: str) -> None:
    with pytest.raises(MessageError) as e:
        simple(text="x", attachments=[attachment])
    assert e.value.field == f"attachments[0].{field}"


def test_naive_date_is_refused() -> None:
    with pytest.raises(MessageError, match="time zone"):
        simple(text="x", date=datetime(2026, 1, 1))


def test_a_very_long_utf8_display_name_never_makes_a_line_over_998_octets() -> None:
    name = "😀" * 256
    raw = simple(from_=Address("sender@example.com", name), text="x").compose(utf8=True)
    assert_wire_format(raw)
    # Several adjacent encoded words: RFC 2047 6.2 says the space between them is ignored. The
    # stdlib's modern address parser keeps it (it can't read back its own long names either), so
    # decode as the RFC says, with the legacy decoder.
    folded = email.message_from_bytes(raw, policy=email.policy.compat32)["From"]
    assert str(make_header(decode_header(folded))) == f"{name} <sender@example.com>"


@pytest.mark.parametrize("message_id", ["<a@b", "a@b>", "no-at-sign", "<a b@c>", "<a@b>>"])
def test_malformed_message_ids_are_refused(message_id: str) -> None:
    with pytest.raises(MessageError) as e:
        simple(text="x", message_id=message_id)
    assert e.value.field == "message_id"


def test_headers_given_as_a_string_are_refused_clearly() -> None:
    with pytest.raises(MessageError, match="not a single string"):
        simple(text="x", headers="X-A: 1")


# ---- stored form and server defaults -----------------------------------------------------------


def test_the_stored_form_restores_the_same_message() -> None:
    original = simple(
        from_="Jörg <jörg@exämple.de>", to=["用户@例子.广告"], cc="c@example.com", bcc="b@example.com",
        reply_to="r@example.com", text="hällo", headers={"X-Tenant": "acme"},
        attachments=[Attachment("a.bin", "application/octet-stream", BINARY)],
    )  # fmt: skip
    import json

    stored = json.loads(json.dumps(original.to_dict()))  # what the database keeps
    restored = Message.from_dict(stored, [BINARY])
    assert restored.envelope() == original.envelope()
    for field in ("from_", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers", "message_id", "date"):
        assert getattr(restored, field) == getattr(original, field), field
    assert parse(restored.compose())["Subject"] == parse(original.compose())["Subject"]
    assert restored.to[0].ascii_address is None and restored.requires_smtputf8


def test_a_message_without_sender_takes_the_servers() -> None:
    m = Message(to="a@example.org", subject="x", text="x")
    assert m.from_ is None and m.message_id is None
    with pytest.raises(MessageError, match="no sender"):
        m.compose()
    filled = m.with_defaults(from_=Address("no-reply@example.com", "Example"), reply_to=[Address("r@example.com")])
    assert (filled.from_, filled.reply_to) == (Address("no-reply@example.com", "Example"), [Address("r@example.com")])
    assert filled.message_id is not None and filled.message_id.endswith("@example.com>")
    assert m.from_ is None  # a copy; the original is unchanged
    own = simple(text="x", reply_to="mine@example.com")
    kept = own.with_defaults(from_=Address("other@example.com"), reply_to=[Address("r@example.com")])
    assert (kept.from_, kept.reply_to, kept.message_id) == (own.from_, own.reply_to, own.message_id)
    assert (
        Message(to="a@example.org", text="x")
        .with_defaults(domain="mail.example")
        .message_id.endswith(  # type: ignore[union-attr]
            "@mail.example>"
        )
    )


# ---- the everyday-address fast path agrees with email-validator --------------------------------

_EVERYDAY = [
    "user@example.com", "A.B+tag@Sub.Example.ORG", "first.last@mail-gate.example.co.uk", "x@1.2.3.com",
    "o'brien@example.ie", "a" * 64 + "@example.com", "x@" + "a" * 63 + ".com", "~!#$%&*/=?^_`{|}-@example.net",
    "rcpt5@example.test",
]  # fmt: skip
_FOR_THE_VALIDATOR = [
    "u@xn--bcher-kva.ch", "u@bücher.ch", "jörg@example.de", "u@example.invalid", "u@my.local",
    "u@localhost", "u@host.c0m", "u@ab--cd.com", "a" * 65 + "@example.com", "x@" + "a" * 64 + ".com",
    '"quoted"@example.com', "a..b@example.com", ".a@example.com", "a.@example.com", "u@-x.com", "u@x-.com",
    "u@example", "u@[127.0.0.1]", "u@example.com.", "no-at-sign", "two@@example.com",
]  # fmt: skip


def test_everyday_addresses_take_the_fast_path_with_email_validators_answer() -> None:
    from mailgate.message import _plain_address, _validated

    for address in _EVERYDAY:
        assert _plain_address(address) == _validated(address), address
    for address in _FOR_THE_VALIDATOR:
        assert _plain_address(address) is None, address


def test_the_fast_path_never_disagrees_with_email_validator_on_random_addresses() -> None:
    """Random strings from a grammar of likely and unlikely parts: whenever the fast path answers,
    email-validator gives the same answer (never a refusal)."""
    import random

    from mailgate.message import _plain_address, _validated

    rng = random.Random(2920)
    chars = "abcXYZ019.-_+!#$%&'*/=?^`{|}~ \"()[],;:\\é@"
    labels = ["example", "com", "org", "a", "x1", "mail-gate", "xn--bcher-kva", "ab--cd", "test", "local", "invalid",
              "localhost", "onion", "arpa", "123", "c0m", "COM", "Example", "a" * 63, "b" * 64]  # fmt: skip
    answered = 0
    for _ in range(20_000):
        if rng.random() < 0.7:
            local = "".join(rng.choice(chars[:-13]) for _ in range(rng.randint(0, 12)))
            address = local + "@" + ".".join(rng.choice(labels) for _ in range(rng.randint(1, 4)))
        else:
            address = "".join(rng.choice(chars) for _ in range(rng.randint(1, 25)))
        fast = _plain_address(address)
        if fast is None:
            continue
        answered += 1
        assert _validated(address) == fast, address
    assert answered > 1_000  # the grammar does reach the fast path
