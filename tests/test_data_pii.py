"""Privacy reduction: each kind of PII is replaced, look-alikes in code are not."""

import pytest
from pydantic import TypeAdapter, ValidationError

from lmlab.data.pii import PIIConfig, luhn_ok, mask, redact


def _one(text: str, kind: str, placeholder: str) -> None:
    out, counts = redact(text)
    assert counts == {kind: 1}, (text, out, counts)
    assert placeholder in out


@pytest.mark.parametrize(
    "text",
    [
        "Contact jane.doe@example.com for details.",
        "Author: Barry Warsaw <barry@python.org>",
        "to='first.last+tag@mail.co.uk'",
        "mailto:xyz@EXAMPLE.COM.",
        "Received from dinsdale@[127.0.0.1] today",
    ],
)
def test_emails(text):
    _one(text, "email", "<EMAIL>")


def test_email_keeps_the_surrounding_quotes_and_brackets():
    assert redact("x = 'a.b@example.org'")[0] == "x = '<EMAIL>'"
    assert redact("Barry <barry@python.org>,")[0] == "Barry <<EMAIL>>,"


@pytest.mark.parametrize(
    "text",
    [
        "Call +44 20 7946 0958 now",
        "+1 (555) 123-4567",
        "phone: +49-30-1234567",
        "+33 1 23 45 67 89",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "1-800-555-0199",
        "Tel. 030 1234567",
        "ring 020 7946 0958",
        "tel:+31641044153",
    ],
)
def test_phones(text):
    _one(text, "phone", "<PHONE>")


@pytest.mark.parametrize(
    "text",
    ['sock.connect(("127.0.0.1", 80))', "gateway 192.168.1.1.", "http://8.8.8.8/dns"],
)
def test_ipv4(text):
    _one(text, "ip_address", "<IP_ADDRESS>")


@pytest.mark.parametrize(
    "text",
    [
        "addr = '2001:0db8:85a3:0000:0000:8a2e:0370:7334'",
        "http://[2001:db8::1]:8080/",
        "link-local fe80::1ff:fe23:4567:890a here",
        "mapped dead:beef:cafe:5417:affe:8FA3:deaf:feed",
    ],
)
def test_ipv6(text):
    _one(text, "ip_address", "<IP_ADDRESS>")


# Published test numbers of the card networks (Luhn-valid) and the same with one digit off.
CARDS = [
    "4111 1111 1111 1111",  # Visa
    "4012888888881881",  # Visa, no separators
    "5500-0000-0000-0004",  # Mastercard
    "3400 000000 00009",  # American Express (15 digits)
    "6011 0000 0000 0004",  # Discover
    "3530111333300000",  # JCB
]


@pytest.mark.parametrize("card", CARDS)
def test_credit_cards_need_a_valid_luhn_checksum(card):
    _one(f"card: {card}.", "credit_card", "<CREDIT_CARD>")
    digits = card.replace(" ", "").replace("-", "")
    assert luhn_ok(digits)
    last = card[-1]
    broken = card[:-1] + str((int(last) + 1) % 10)
    assert not luhn_ok(broken.replace(" ", "").replace("-", ""))
    assert redact(f"card: {broken}.")[1].get("credit_card", 0) == 0


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("aws = AKIAIOSFODNN7EXAMPLE", "aws = "),
        ("GITHUB_TOKEN=ghp_" + "a1B2c3D4e5" * 3 + "a1B2c3", "GITHUB_TOKEN="),
        ("tok github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuv", "tok "),
        ("slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp", "slack "),
        ("OPENAI_API_KEY: sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", "OPENAI_API_KEY: "),
        ("key = AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "key = "),
        ("stripe: sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe: "),
    ],
)
def test_provider_tokens(text, kept):
    out, counts = redact(text)
    assert counts == {"secret": 1} and out == kept + "<SECRET>"


def test_private_key_block():
    pem = (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1c3+\nabc/def==\n"
        "-----END RSA PRIVATE KEY-----"
    )
    out, counts = redact(f"key:\n{pem}\ndone")
    assert out == "key:\n<SECRET>\ndone" and counts == {"secret": 1}


def test_generic_secret_assignment_keeps_the_key_name():
    out, counts = redact("api_key = \"Zx8vQ2mL9pR4tY7wK1nB\"\npassword: 's3cR3t-Pa55w0rd!x'")
    assert out == "api_key = \"<SECRET>\"\npassword: '<SECRET>'"
    assert counts == {"secret": 2}
    # values that are words, identifiers, paths or templates are not secrets
    for text in [
        "token_type = 'unstructured-header'",
        "password = 'doesnotexist'",
        'secret_path = "/etc/app/secret/file.txt"',
        'API_KEY = "${OPENAI_API_KEY_FROM_ENV}"',
        'auth_token = "{settings.token_value}"',
    ]:
        assert redact(text) == (text, {}), text


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.12.1 was released 2023-12-07; see PEP 693.",
        "version 1.2.3.4 of the library",  # a version, not an address
        "see sections 8.2.4.44 and 8.1.2.2",  # section numbers
        "OID 1.3.6.1.4.1.311 and 2.16.840.1.101.3.4.2.1",
        "def f(self):\n    return self.x@y + a@b\n",
        "@dataclass\n@functools.lru_cache(maxsize=None)\ndef g(): pass",
        "out = x@self.weight.T",
        "n = 12345678901234567890 + 9223372036854775807",
        "x = +4294967296  # 1 << 32",
        "h = [573763426263223372, -4282905804826039665]",
        "a[1::2], b[::3], c[10:20:2]",
        "at 12:30:45 on 07/15/2023, 15.07.2023",
        "ratio 1:2:3:4",
        "Decimal('+35236450.6')",
        "push('211 486 761 1265 fr.comp.lang.python')",
        "'<fraction> 0031 2044 0034'",
        "bytes 00 01 02 03 04 05 06 07",
        "float 3.14159265358979323846",
        "sd_in@devanagari.utf8 locale, i7@4.3GHz",
        "a risk-assessment-of-the-whole-framework and sk-learn-compatible-estimators",
    ],
)
def test_no_false_positives_on_code_and_numbers(text):
    assert redact(text) == (text, {}), redact(text)


def test_counts_several_kinds_and_config_switches():
    text = "mail a@example.com or b@example.org, call +1 415 555 0100 from 10.0.0.1"
    out, counts = redact(text)
    assert counts == {"email": 2, "phone": 1, "ip_address": 1}
    assert out == "mail <EMAIL> or <EMAIL>, call <PHONE> from <IP_ADDRESS>"
    cfg = PIIConfig(email=False, ip_placeholder="[ip]")
    out, counts = redact(text, cfg)
    assert counts == {"phone": 1, "ip_address": 1} and "a@example.com" in out and "[ip]" in out
    assert redact(text, PIIConfig(email=False, phone=False, ip=False)) == (text, {})
    assert mask(text) == redact(text)[0]


def test_config_is_validated():
    with pytest.raises(ValidationError):
        TypeAdapter(PIIConfig).validate_python({"emails": True})


def test_finds_every_address_datatrove_finds():
    """datatrove's PII formatter (RFC 5322 e-mail regex, public IPv4) is the reference."""
    pii_ref = pytest.importorskip("datatrove.pipeline.formatters.pii")
    ref = pii_ref.PIIFormatter(email_replacement="<EMAIL>", ip_replacement="<IP_ADDRESS>")
    lines = [
        "From: Gregory K. Johnson <gkj@gregorykjohnson.com>",
        "Message-ID: <4FD05F05-F98B-44DC-8111-C6009C925F0C@gmail.com>",
        "Doug <doug.hellmann-Re5JQEeQqe8AvxtiuMwx3w@public.gmane.org>",
        "references: <hvalf7$ort$1@dough.gmane.org>",
        "Received: from host (host [64.32.235.228]) by mx",
        "DNS at 8.8.4.4 and 1.1.1.1; mail to postmaster@python.org.",
        "Language-Team: XX <python-dev@python.org>",
    ]
    for line in lines:
        assert redact(line, PIIConfig(phone=False))[0] == ref.format(line), line


def test_ip_context_words_need_a_word_boundary():
    assert redact("dev 10.1.2.3 and rev 10.1.2.4")[1] == {"ip_address": 2}
