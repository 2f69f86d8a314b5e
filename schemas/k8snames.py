"""Kubernetes-safe names and label values from untrusted text.

Alert labels are untrusted: they may hold spaces, unicode, ``../`` or 300
characters. Anything that becomes a Kubernetes object name or label value
passes through here first. Pure functions; the regexes are the API server's.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

DNS1123_LABEL_MAX = 63
LABEL_VALUE_MAX = 63

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

_NOT_LABEL_CHAR = re.compile(r"[^A-Za-z0-9_.-]+")
_NOT_DNS_CHAR = re.compile(r"[^a-z0-9-]+")


def _ascii(text: str) -> str:
    # "Zürich" → "Zurich"; characters without an ASCII form are dropped here and
    # replaced by separators below.
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def is_label_value(value: str) -> bool:
    """True if ``value`` is a valid Kubernetes label value."""
    return len(value) <= LABEL_VALUE_MAX and LABEL_VALUE.match(value) is not None


def is_dns1123_label(name: str) -> bool:
    """True if ``name`` is a valid DNS-1123 label (e.g. a Job name usable as a label value)."""
    return len(name) <= DNS1123_LABEL_MAX and DNS1123_LABEL.match(name) is not None


def label_value(text: str) -> str:
    """A valid label value that reads like ``text``; altered values get a hash suffix to stay distinct."""
    if is_label_value(text):
        return text
    cleaned = _NOT_LABEL_CHAR.sub("-", _ascii(text)).strip("-_.")
    suffix = _short_hash(text)
    head = cleaned[: LABEL_VALUE_MAX - len(suffix) - 1].rstrip("-_.")
    return f"{head}-{suffix}" if head else suffix


def dns_slug(text: str, max_len: int) -> str:
    """Lower-case DNS-1123 fragment of ``text`` (may be empty), at most ``max_len`` chars."""
    slug = _NOT_DNS_CHAR.sub("-", _ascii(text).lower()).strip("-")
    return slug[:max_len].rstrip("-")
