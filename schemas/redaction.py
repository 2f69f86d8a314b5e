"""What counts as a secret, and how it is hidden — one rule for logs, ``config check`` and ``tail``.

Mask by what is secret, not by what a name mentions. A value is hidden whole when
its key *is* a secret: the key's last word is one of ``SECRET_WORDS`` (``token``,
``client_token``, ``wrapping_token``, ``X-Vault-Token``, ``password``,
``basic_password``, ``secret``, ``dsn``, ``admin_dsn``, ``authorization``,
``cookie``, ``jwt``…) or its last two words one of ``SECRET_PAIRS`` (``api_key``,
``secret_id``, ``private_key``…). Keys that merely mention such a word —
``llm_prompt_tokens``, ``max_tokens``, ``token_audience``, ``token_expiration``,
``token_ttl``, ``token_role``, ``token_accessor``, ``wrapped_accessor``,
``wrap_ttl``, ``token_file``, ``secret_name`` — name counters, durations,
identifiers and paths and are shown as they are.

Under a secret key, an empty or absent value stays visible (so ``config check``
tells "not set" from "set"), and so does a boolean (one bit carries no
credential); anything else — strings, bytes, numbers (a numeric password is still
a password) and whole containers — becomes ``MASK``. Outside secret keys numbers
and booleans are never touched, and text is scanned for what looks like a
credential wherever it appears: URL passwords, ``Authorization``/``Cookie``/
``X-Vault-Token`` header values, ``Bearer``/``Basic`` credentials, ``key=value``
and ``"key": "value"`` pairs whose key is a secret (libpq DSNs, query strings,
reprs of request bodies), SQL ``PASSWORD '…'``, Vault/OpenBao tokens, JWTs,
``sk-`` API keys and PEM private key blocks.

Every log line (``schemas.logs``), ``config check`` and ``tail`` go through here;
the agent uses ``mask_text`` for its own messages.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import msgspec

MASK = "***"

# A key is secret when its last word is one of these (after camelCase/dash/dot → snake_case):
# token, client_token, wrapping_token, vault_token, bearer_token, x_vault_token, root_token;
# password, basic_password; secret, client_secret; dsn, admin_dsn; token_reviewer_jwt; …
SECRET_WORDS = frozenset({
    "token", "password", "passwd", "passphrase", "secret", "authorization", "cookie", "jwt",
    "dsn", "apikey", "credential", "credentials", "privatekey",
})
# … or its last two words one of these (a bare ``key`` or ``id`` is an identifier: routing_key).
SECRET_PAIRS = frozenset({
    ("api", "key"), ("private", "key"), ("secret", "key"), ("signing", "key"),
    ("encryption", "key"), ("secret", "id"),
})
# … or it is one of these whole names (no separator to split on).
SECRET_NAMES = frozenset({"pgpassword", "xapikey", "setcookie"})

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")

# --- credential shapes in text (each keeps its label and replaces only the secret part) ---
# A block cut short (a bounded excerpt) is masked to the end of the text.
_PEM_PRIVATE_KEY = re.compile(
    r"(-----BEGIN ([A-Z0-9 ]*?)PRIVATE KEY-----).*?(-----END \2PRIVATE KEY-----|\Z)", re.DOTALL
)
# Header lines: ``Authorization: Bearer x``, ``X-Vault-Token: s.x``, ``Cookie: a=b; c=d``.
_HEADER = re.compile(
    r"(?<![\w-])((?:proxy-)?authorization|x-vault-token|(?:set-)?cookie|x-api-key|api-key)(\s*:\s*)"
    r"((?:bearer|basic|token|negotiate|digest)\s+)?([^\r\n\"']+)",
    re.IGNORECASE,
)
_QUOTED_VALUE = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
# ``"password": "x"`` / ``'client_token': 'x'`` (JSON, Python reprs of request bodies).
_QUOTED_PAIR = re.compile(rf"([\"'])([A-Za-z_][\w.-]*)\1(\s*:\s*)({_QUOTED_VALUE}|-?\d[\w.+-]*)")
# ``password=x`` (libpq key=value DSNs, query strings, env dumps), ``vault.token = s.x``.
_PAIR = re.compile(rf"(?<![\w.-])([A-Za-z_][\w.-]*)(\s*=\s*)({_QUOTED_VALUE}|[^\s&;'\"]+)")
_SQL_PASSWORD = re.compile(r"\b(PASSWORD\s+)'(?:[^']|'')*'", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)([^@\s/]+)(@)")
# ``Bearer x`` / ``Basic x`` anywhere; a credential is token68 and not a plain lowercase word
# ("basic functionality"), nor a parameter (``Bearer realm="agentjobs"``).
_AUTH_SCHEME = re.compile(
    r"\b(bearer|basic)(\s+)(?-i:(?![a-z]+(?![\w.~+/=-])))([\w.~+/-]{6,}=*)(?![\w=\".~+/-])",
    re.IGNORECASE,
)
# Vault/OpenBao service, batch and recovery tokens (s., hvs., b., hvb., hvr.), and the
# embedded dev server's root-<hex> token (dispatcher/credentials/embedded_openbao.py).
_VAULT_TOKEN = re.compile(r"\b(?:s|hvs|hvb|hvr|b)\.[A-Za-z0-9_-]{16,}|\broot-[0-9a-f]{32}\b")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_API_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")


def _words(key: str) -> list[str]:
    return [w for w in _SEPARATORS.split(_CAMEL.sub("_", key).lower()) if w]


def is_secret_key(key: str) -> bool:
    """True if values stored under ``key`` are secrets (see the module docstring for the rule)."""
    words = _words(key)
    if not words:
        return False
    return (
        words[-1] in SECRET_WORDS
        or tuple(words[-2:]) in SECRET_PAIRS
        or "".join(words) in SECRET_NAMES
    )


def _mask_pair(match: re.Match[str], key_group: int, value_group: int) -> str:
    if not is_secret_key(match.group(key_group)):
        return match.group(0)
    start, end = match.span(value_group)
    value = match.group(value_group)
    quote = value[0] if value[:1] in ("'", '"') else ""
    base = match.start(0)
    return f"{match.group(0)[: start - base]}{quote}{MASK}{quote}{match.group(0)[end - base:]}"


def mask_text(text: str) -> str:
    """Mask whatever looks like a credential inside free text (see the module docstring)."""
    text = _PEM_PRIVATE_KEY.sub(rf"\1{MASK}\3", text)
    text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}", text)
    text = _QUOTED_PAIR.sub(lambda m: _mask_pair(m, 2, 4), text)
    text = _PAIR.sub(lambda m: _mask_pair(m, 1, 3), text)
    text = _SQL_PASSWORD.sub(rf"\1'{MASK}'", text)
    text = _URL_PASSWORD.sub(rf"\1{MASK}\3", text)
    text = _AUTH_SCHEME.sub(rf"\1\2{MASK}", text)
    text = _VAULT_TOKEN.sub(MASK, text)
    text = _JWT.sub(MASK, text)
    return _API_KEY.sub(MASK, text)


def _is_shown_under_secret_key(value: Any) -> bool:
    # Absent/empty tells "not set"; a boolean carries no credential.
    return value is None or isinstance(value, bool) or (
        isinstance(value, str | bytes | list | tuple | dict) and len(value) == 0
    )


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (Structs, dataclasses become builtins) that is safe to print or log."""
    if isinstance(value, msgspec.Struct):
        value = msgspec.to_builtins(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if key and is_secret_key(key) and not _is_shown_under_secret_key(value):
        return MASK
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    return value
