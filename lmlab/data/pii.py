"""Privacy reduction (Zhao et al. §4.1.1; Kaddour et al. §2.1): replace personal data and
secrets with typed placeholders such as `<EMAIL>`, and count what was replaced per type.

Each detector is a compiled pattern plus, where a pattern alone cannot tell, a validator:
a Luhn checksum and issuer prefix for cards, `ipaddress` for IPv6, an entropy test for
secret values. Detectors run secrets first, so a token's digits are never also reported
as a phone number. Speed comes from letting the regex engine skip ahead: every pattern
starts with a literal or a character class (a look-behind placed first would make the
engine try every position), and e-mail and IPv6 are anchored on `@` and `:`. The false
positives were tuned on the Python standard library, the default corpus: versions, dates,
section numbers, OIDs, long integer literals, slices and `x@y` products are left alone.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass

from lmlab.config import STRICT

# --- secrets ----------------------------------------------------------------------------

# Provider tokens with a fixed, documented shape, long enough to be unambiguous.
_TOKEN = re.compile(
    r"(?:(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36}"  # GitHub classic tokens
    r"|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub fine-grained tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic (mixed case checked)
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{20,}"  # Stripe
    r"|https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}"  # Slack webhooks
    r")(?![\w-])"
)
_PEM = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----.*?-----END \1PRIVATE KEY\2-----",
    re.DOTALL,
)
# `api_key = "..."`, `"password": "..."`, `SECRET='...'`: a quoted value after `=`/`:`...
_ASSIGNED_VALUE = re.compile(r"""[=:]>?[ \t]*(["'])([^"'\s]{12,256})\1""")
# ...whose key (just before it) names a secret. The key is kept, the value replaced.
_SECRET_KEY = re.compile(
    r"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|passwd|pwd|access[_-]?key|auth[_-]?key"
    r"|credentials?|private[_-]?key)[\w.-]*[\"'\]]?[ \t]*\Z"
)

# --- e-mail: a dotted host after `@`, then the local part before it ------------------

# The TLD is 2–24 letters of one case, so `a@b`, `x@y.T` and `@decorator` do not match.
_EMAIL_DOMAIN = re.compile(
    r"@(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+(?:[a-z]{2,24}|[A-Z]{2,24})"
    r"(?![\w-]|\.\w|\()|\[\d{1,3}(?:\.\d{1,3}){3}\])"  # or an address literal
)
# RFC 5322 atom characters, less quotes, backticks, `=` and `/` (code puts those around
# an address: `to='a@b.org'`, `key=a@b.org`); ends where the `@` is (`\Z` honours endpos).
_EMAIL_LOCAL = re.compile(r"(?<![\w.!#$%&*+^~-])[A-Za-z0-9_][\w.!#$%&*+^~-]{0,63}\Z", re.ASCII)
# `x@self.weight`, `a@np.linalg`: matrix products in code, not addresses.
_CODE_HOSTS = {"self", "cls", "np", "torch", "math", "os", "sys", "jnp", "tf"}

# --- numbers ----------------------------------------------------------------------------

# Dotted quads, cards and phones start with a digit, `+` or `(` at the start of a number,
# so one pattern with a branch per kind finds them in a single pass over the digits; an
# empty named group closing each branch tells which kind matched (`m.lastgroup`).
_NUM_START = r"[\d+(](?<![\w.].)"
_NUM_BRANCHES = {
    # 13–19 digits, optionally grouped by spaces or dashes (issuer prefix and Luhn checked)
    "credit_card": r"(?<=[2-6])(?<![,+-].)\d{3}(?:[ -]?\d){9,15}(?![\w-]|[.,]\d)",
    # dotted quads; octets checked (≤ 255, no leading zero) in Python
    "ip_address": r"(?<=\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\.?\d|\w)",
    # international `+CC ...` with separators, or a national number with separators; a
    # bare run of digits is never a phone (in code it is an integer literal)
    "phone": r"(?<![+/-].)(?<!\d .)(?:"
    r"(?<=\+)\d{1,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,5}(?:[ .-]\d{2,10}){1,5}"  # +44 20 7946 0958
    r"|(?<=tel:\+)\d{7,15}"  # tel: URIs, the one place a bare run is a phone
    r"|(?<=\()\d{3}\)[ ]?\d{3}[-. ]\d{4}"  # (555) 123-4567
    r"|(?<=1)(?P<s1>[-. ])\d{3}(?P=s1)\d{3}(?P=s1)\d{4}"  # 1-800-555-0199
    r"|(?<=\d)\d\d(?P<s2>[-. ])\d{3}(?P=s2)\d{4}"  # 555-123-4567, 555.123.4567
    r"|(?<=0)(?:[1-9](?: \d\d){4}"  # 01 23 45 67 89
    r"|[1-9]\d{0,3}[ /-]\d{3,4}(?:[ -]?\d{3,4}){0,2})"  # 030 1234567, 020 7946 0958
    r")(?![\w-]|[.:/]\d| \d)",
}
_NUM_PATTERNS: dict[tuple[str, ...], re.Pattern] = {}

# Words just before a dotted quad that make it a version, a section number or an OID.
_NOT_IP_CONTEXT = re.compile(
    r"(?i)(?:\b(?:version|ver|release|v|oid|build|sections?|chapters?|rfc ?\d*|prior to)|§)"
    r"(?:[\s:=_'\"(,.-]|\d|and|or)*\Z"
)
# IPv6 is found from its colons (`::` or a run of `hex:` groups) and grown to both sides.
_IPV6_CORE = re.compile(r":[0-9A-Fa-f]{0,4}:(?:[0-9A-Fa-f]{0,4}:)*[0-9A-Fa-f]{0,4}")
_HEX_TAIL = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{1,4}\Z")

_CARD_PREFIX = re.compile(
    r"4|5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|3(?:0[0-5]|[68])"
    r"|6(?:011|5|4[4-9])|35(?:2[89]|[3-8])"
)
_CARD_LENGTHS = {"4": (13, 16, 19), "5": (16,), "2": (16,), "6": (16, 17, 18, 19)}

_DIGIT = re.compile(r"\d")


@dataclass
class PIIConfig:
    """Which kinds of personal data and secrets to replace, and their placeholders."""

    __pydantic_config__ = STRICT

    email: bool = True
    phone: bool = True
    ip: bool = True
    credit_card: bool = True
    secrets: bool = True
    email_placeholder: str = "<EMAIL>"
    phone_placeholder: str = "<PHONE>"
    ip_placeholder: str = "<IP_ADDRESS>"
    credit_card_placeholder: str = "<CREDIT_CARD>"
    secret_placeholder: str = "<SECRET>"


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) checksum that every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(m: re.Match) -> bool:
    s = m.group(0)
    if " " in s and "-" in s:
        return False  # a card is grouped with one kind of separator
    digits = s.replace(" ", "").replace("-", "")
    if not _CARD_PREFIX.match(digits):
        return False
    lengths = _CARD_LENGTHS.get(digits[0])
    if lengths is None:  # 3…: American Express (34, 37) has 15 digits, Diners/JCB 14–19
        lengths = (15,) if digits[1] in "47" else (14, 16, 17, 18, 19)
    return len(digits) in lengths and len(set(digits)) > 1 and luhn_ok(digits)


def _ipv4_ok(m: re.Match) -> bool:
    for octet in m.group(0).split("."):
        if int(octet) > 255 or (len(octet) > 1 and octet[0] == "0"):
            return False
    return not _NOT_IP_CONTEXT.search(m.string, max(0, m.start() - 40), m.start())


def _phone_ok(m: re.Match) -> bool:
    s = m.group(0)
    digits = sum(c.isdigit() for c in s)
    return 8 <= digits <= 15 if s[0] == "+" else 9 <= digits <= 13


_VALID = {"credit_card": _card_ok, "ip_address": _ipv4_ok, "phone": _phone_ok}


def _num_pattern(kinds: tuple[str, ...]) -> re.Pattern:
    if kinds not in _NUM_PATTERNS:
        branches = "|".join(f"{_NUM_BRANCHES[k]}(?P<{k}>)" for k in kinds)
        _NUM_PATTERNS[kinds] = re.compile(f"{_NUM_START}(?:{branches})")
    return _NUM_PATTERNS[kinds]


def _numbers(text: str, cfg: PIIConfig, counts: Counter) -> str:
    """Cards, IPv4 addresses and phones in one pass (the kinds `cfg` enables)."""
    reps = {
        "credit_card": cfg.credit_card_placeholder if cfg.credit_card else None,
        "ip_address": cfg.ip_placeholder if cfg.ip else None,
        "phone": cfg.phone_placeholder if cfg.phone else None,
    }
    kinds = tuple(k for k, rep in reps.items() if rep is not None)
    if not kinds:
        return text

    def repl(m: re.Match) -> str:
        kind = m.lastgroup
        if not _VALID[kind](m):
            return m.group(0)
        counts[kind] += 1
        return reps[kind]

    return _num_pattern(kinds).sub(repl, text)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _looks_random(value: str) -> bool:
    """A random-looking value, not a word, identifier, path, URL, template or format."""
    if value[0] in "$%{<" or "://" in value or value.count("/") > 1 or value.count(".") > 1:
        return False
    classes = (
        any(c.isdigit() for c in value)
        + any(c.islower() for c in value)
        + any(c.isupper() for c in value)
    )
    return classes >= 2 and not value.replace("_", "").isalpha() and _entropy(value) >= 3.0


def _rebuild(text: str, spans: list[tuple[int, int, str]]) -> str:
    parts, last = [], 0
    for start, end, rep in spans:
        parts.append(text[last:start])
        parts.append(rep)
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _sub(pattern: re.Pattern, text: str, rep: str, counts: Counter, ok=None) -> str:
    def repl(m: re.Match) -> str:
        if ok is not None and not ok(m):
            return m.group(0)
        counts["secret"] += 1
        return rep

    return pattern.sub(repl, text)


def _emails(text: str, rep: str, counts: Counter) -> str:
    spans = []
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        if local is None or text[at + 1 : text.find(".", at)].lower() in _CODE_HOSTS:
            continue
        spans.append((local.start(), m.end(), rep))
    counts["email"] += len(spans)
    return _rebuild(text, spans) if spans else text


def _ipv6(text: str, rep: str, counts: Counter) -> str:
    spans: list[tuple[int, int, str]] = []
    for m in _IPV6_CORE.finditer(text):
        start, end = m.start(), m.end()
        if spans and start < spans[-1][1]:
            continue
        head = _HEX_TAIL.search(text, max(0, start - 4), start)
        if head is not None:
            start = head.start()
        elif start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:."):
            continue
        if end < len(text) and (text[end].isalnum() or text[end] in "_:."):
            continue
        cand = text[start:end]
        # Python slices (`a[1::2]`) and clock times share the shape: want 3+ colons or a
        # full 4-digit group (`fe80::1`), and some hex letter or `::` in a time-like run.
        if cand.count(":") < 3 and not any(len(g) == 4 for g in cand.split(":")):
            continue
        if "::" not in cand and cand.replace(":", "").isdigit():
            continue
        try:
            ipaddress.IPv6Address(cand)
        except ValueError:
            continue
        spans.append((start, end, rep))
    counts["ip_address"] += len(spans)
    return _rebuild(text, spans) if spans else text


def _assigned_secrets(text: str, rep: str, counts: Counter) -> str:
    spans = []
    for m in _ASSIGNED_VALUE.finditer(text):
        if not _SECRET_KEY.search(text, max(0, m.start() - 48), m.start()):
            continue
        if _looks_random(m.group(2)):
            spans.append((m.start(2), m.end(2), rep))
    counts["secret"] += len(spans)
    return _rebuild(text, spans) if spans else text


def redact(text: str, cfg: PIIConfig | None = None) -> tuple[str, dict[str, int]]:
    """Replace PII and secrets with placeholders; returns the text and counts per type."""
    cfg = cfg or _ALL
    counts: Counter = Counter()
    if cfg.secrets:
        if "PRIVATE KEY-----" in text:
            text = _sub(_PEM, text, cfg.secret_placeholder, counts)
        text = _sub(_TOKEN, text, cfg.secret_placeholder, counts, _token_ok)
        text = _assigned_secrets(text, cfg.secret_placeholder, counts)
    if cfg.email and "@" in text:
        text = _emails(text, cfg.email_placeholder, counts)
    if _DIGIT.search(text) is not None:
        text = _numbers(text, cfg, counts)
        if cfg.ip and ":" in text:
            text = _ipv6(text, cfg.ip_placeholder, counts)
    return text, {k: v for k, v in counts.items() if v}


def _token_ok(m: re.Match) -> bool:
    start, token = m.start(), m.group(0)
    if start and (m.string[start - 1].isalnum() or m.string[start - 1] in "_-"):
        return False
    if token.startswith("sk-"):  # `sk-learn-style-names` are not keys: random ones mix
        return any(c.isdigit() for c in token) and not token.islower()
    return True


_ALL = PIIConfig()


def mask(text: str) -> str:
    """`text` with every kind of PII replaced (the data card shows examples through it)."""
    return redact(text, _ALL)[0]
