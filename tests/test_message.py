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


# ---- bounds and characters no mail may carry -----------------------------------------------------


# fmt: off
FORBIDDEN = [
    ({"subject": "caf\ud800"}, "subject", "lone surrogate (U+D800)"),
    ({"subject": "a\x00b"}, "subject", "control character (U+0000)"),
    ({"subject": "ring\x07"}, "subject", "control character (U+0007)"),
    ({"subject": "a\u2028Bcc: x@example.com"}, "subject", "line separator (U+2028)"),
    ({"subject": "a\x85b"}, "subject", "control character (U+0085)"),
    ({"to": "Bob\x00 <bob@example.org>"}, "to[0]", "U+0000"),
    ({"to": [("\ud83d <bob@example.org>")]}, "to[0]", "lone surrogate (U+D83D)"),
    ({"to": "b\ud800b@example.org"}, "to[0]", "lone surrogate (U+D800)"),
    ({"from_": "Eve\x1b[31m <eve@example.org>"}, "from", "U+001B"),
    ({"reply_to": "Help\x7f <help@example.org>"}, "reply_to[0]", "U+007F"),
    ({"text": "hello\x00"}, "text", "control character (U+0000) at position 5"),
    ({"text": "hello \udfff"}, "text", "lone surrogate (U+DFFF)"),
    ({"html": "<p>\x1b[2J</p>"}, "html", "U+001B"),
    ({"html": "<p>a\x0bb</p>"}, "html", "U+000B"),
    ({"headers": {"X-Tag": "a\ud800"}}, "headers['X-Tag']", "lone surrogate"),
    ({"headers": {"X-Tag": "a\x01"}}, "headers['X-Tag']", "U+0001"),
    ({"headers": {"X-\ud800": "a"}}, "headers['X-\\ud800']", "printable ASCII"),
    ({"attachments": [Attachment("r\ud800.pdf", "application/pdf", b"")]}, "attachments[0].filename", "surrogate"),
    ({"attachments": [Attachment("r\x85.pdf", "application/pdf", b"")]}, "attachments[0].filename", "U+0085"),
    ({"attachments": [Attachment("r.pdf", "application/pdf\ud800", b"")]}, "attachments[0].content_type", "MIME"),
    ({"attachments": [Attachment("r.png", "image/png", b"", "\x00a")]}, "attachments[0].content_id", "visible"),
    ({"message_id": "<a\ud800@example.org>"}, "message_id", "visible ASCII"),
]
FORBIDDEN_IDS = [
    "subject-surrogate", "subject-nul", "subject-bell", "subject-line-separator", "subject-c1-nel", "name-nul",
    "name-surrogate", "address-surrogate", "from-name-escape", "reply-to-del", "text-nul", "text-surrogate",
    "html-escape", "html-vertical-tab", "header-value-surrogate", "header-value-control", "header-name-surrogate",
    "filename-surrogate", "filename-c1", "content-type-surrogate", "content-id-nul", "message-id-surrogate",
]
# fmt: on


@pytest.mark.parametrize(("fields", "field", "problem"), FORBIDDEN, ids=FORBIDDEN_IDS)
def test_lone_surrogates_nul_and_control_characters_are_refused_naming_the_field(
    fields: dict[str, object], field: str, problem: str
) -> None:
    with pytest.raises(MessageError) as e:
        simple(**{"text": "x", **fields})
    assert e.value.field == field and problem in e.value.problems[0][1], e.value.problems


def test_bodies_keep_tabs_line_breaks_and_form_feeds_and_one_line_fields_keep_tabs() -> None:
    m = simple(subject="a\tb", text="col1\tcol2\r\nnext page\x0c\n", html="<pre>\t\x0c</pre>\n",
               headers={"X-Tag": "a\tb"}, to=Address("bob@example.org", "Bob\tB"))  # fmt: skip
    p = parse(m.compose())
    assert p["Subject"] == "a\tb" and p["X-Tag"] == "a\tb"
    assert content(p.get_body(("plain",))) == "col1\tcol2\nnext page\x0c\n"


def test_forbidden_character_names_the_first_one_and_where() -> None:
    from mailgate.message import forbidden_character

    assert forbidden_character("Grüße, 世界 😀") is None and forbidden_character("a\tb\r\n\x0c", body=True) is None
    assert forbidden_character("ab\x00\ud800") == "contains a control character (U+0000) at position 2, which no " \
        "mail may carry"  # fmt: skip
    assert forbidden_character("ab\ud800\x00", body=True) == "contains a lone surrogate (U+D800) at position 2, " \
        "which no mail may carry"  # fmt: skip
    assert forbidden_character("a\nb") is not None and forbidden_character("a\nb", body=True) is None


def test_too_many_recipients_is_one_problem_and_none_of_them_is_parsed() -> None:
    from mailgate.message import MAX_RECIPIENTS

    # Two million addresses that are each invalid: parsed, they would make two million problems.
    with pytest.raises(MessageError) as e:
        simple(to=["not an address"] * 2_000_000, text="x")
    assert e.value.problems == [("to", f"the message has 2,000,000 recipients (to, cc and bcc); at most "
                                       f"{MAX_RECIPIENTS:,} may share one message")]  # fmt: skip
    # To, Cc and Bcc count together; the field named is the longest list.
    half = MAX_RECIPIENTS // 2
    with pytest.raises(MessageError) as e:
        simple(to=[f"t{i}@example.org" for i in range(half)], cc=[f"c{i}@example.org" for i in range(half + 1)])
    assert e.value.field == "cc" and len(e.value.problems) == 1
    full = simple(to=[f"t{i}@example.org" for i in range(half)], cc=[f"c{i}@example.org" for i in range(half)])
    assert len(full.recipients) == MAX_RECIPIENTS


def _many_headers(n: int) -> dict[str, str]:
    return {f"X-H{i}": "v" for i in range(n)}


# fmt: off
BOUNDS = [
    ({"reply_to": [f"r{i}@example.org" for i in range(101)]}, "reply_to", "at most 100"),
    ({"subject": "s" * 1001}, "subject", "at most 1,000"),
    ({"headers": _many_headers(101)}, "headers", "at most 100"),
    ({"headers": {"X-" + "n" * 99: "v"}}, "headers['X-nnnnn", "at most 100 characters"),
    ({"headers": {"X-Long": "word " * 401}}, "headers['X-Long']", "at most 2,000 characters"),
    ({"attachments": [Attachment("a.txt", "text/plain", b"")] * 101}, "attachments", "at most 100"),
    ({"attachments": [Attachment("a" * 256, "text/plain", b"")]}, "attachments[0].filename", "255 bytes"),
    ({"attachments": [Attachment("ü" * 128, "text/plain", b"")]}, "attachments[0].filename", "255 bytes"),
    ({"attachments": [Attachment("a", "text/" + "p" * 251, b"")]}, "attachments[0].content_type", "at most 255"),
    ({"attachments": [Attachment("a", "image/png", b"", "c" * 256)]}, "attachments[0].content_id", "at most 255"),
    ({"message_id": "<" + "m" * 242 + "@example.org>"}, "message_id", "longer than 255"),
    ({"to": "Bob" * 400 + " <bob@example.org>"}, "to[0]", "at most 1,000 characters"),
    ({"to": "b" * 1001}, "to[0]", "at most 1,000"),
]
BOUNDS_IDS = [
    "reply-to", "subject", "header-count", "header-name", "header-value", "attachment-count", "filename",
    "filename-bytes", "content-type", "content-id", "message-id", "address-text", "bare-address-text",
]
# fmt: on


@pytest.mark.parametrize(("fields", "field", "problem"), BOUNDS, ids=BOUNDS_IDS)
def test_every_list_and_string_is_bounded(fields: dict[str, object], field: str, problem: str) -> None:
    with pytest.raises(MessageError) as e:
        simple(**{"text": "x", **fields})
    assert e.value.field.startswith(field) and problem in e.value.problems[0][1], e.value.problems
    assert len(e.value.problems) == 1


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
