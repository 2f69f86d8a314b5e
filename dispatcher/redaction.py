"""What counts as a secret, and how it is hidden — one rule for logs and printed settings.

Values under secret-looking keys are replaced whole; inside any other text,
URL passwords and Vault/OpenBao token shapes are masked. Never log secrets,
tokens or credentials: every log line and ``config check`` go through here.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

MASK = "***"
# Keys whose values are never shown: tokens (incl. wrapping tokens), passwords, secret ids,
# authorization headers, API keys, DSNs (they embed passwords).
SECRET_KEY = re.compile(
    r"(token|password|passwd|secret|authorization|api_?key|credential|private_?key|cookie"
    r"|wrap|dsn)",
    re.IGNORECASE,
)
# Keys the pattern above would catch that only hold identifiers or durations.
NOT_SECRET = frozenset(
    {"wrapped_accessor", "token_accessor", "accessor", "token_ttl", "token_role", "wrap_ttl",
     "token_file", "secret_name"}
)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)([^@\s/]+)(@)")
# Vault/OpenBao token shapes (s.…, hvs.…, hvb.…, hvr.…, b.…) anywhere in text.
_TOKEN = re.compile(r"\b(?:s|hvs|hvb|hvr|b)\.[A-Za-z0-9_-]{16,}")


def is_secret_key(key: str) -> bool:
    """True if values stored under ``key`` must never be shown."""
    return bool(key) and key.lower() not in NOT_SECRET and SECRET_KEY.search(key) is not None


def mask_text(text: str) -> str:
    """Mask URL passwords and token-shaped substrings in free text."""
    return _TOKEN.sub(MASK, _URL_PASSWORD.sub(rf"\1{MASK}\3", text))


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (Structs become builtins) that is safe to print or log."""
    if isinstance(value, msgspec.Struct):
        value = msgspec.to_builtins(value)
    if is_secret_key(key) and value not in ("", None):
        return MASK
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    return value
