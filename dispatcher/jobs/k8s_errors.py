"""kubernetes_asyncio raises only ``ApiException``; this maps it to our two error kinds.

The branch is on the Status ``reason`` in the body (what the API server
means), not on message text — except for quota, which the server reports as
a plain 403 Forbidden whose message says "exceeded quota".
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from schemas.errors import AgentJobsError, PermanentError, TemporaryError

QUOTA_RETRY_AFTER = 5.0  # seconds; a quota frees up when some investigation ends


class AlreadyExists(AgentJobsError):
    """409 AlreadyExists: the object (e.g. the investigation's Job) was created before."""


class NotFound(AgentJobsError):
    """404 NotFound."""


class Conflict(AgentJobsError):
    """409 Conflict: a precondition (resourceVersion) failed; someone else changed it."""


def status_of(exc: ApiException) -> dict:
    """The Status body of an ApiException (empty dict if there is none)."""
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _retry_after(exc: ApiException) -> float | None:
    headers = exc.headers or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def classify(exc: BaseException, *, doing: str) -> AgentJobsError:
    """Our error for a client exception raised while ``doing`` something."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ClientError | ConnectionError):
        return TemporaryError(f"{doing}: Kubernetes API unreachable or slow ({exc!r})")
    if not isinstance(exc, ApiException):
        return TemporaryError(f"{doing}: unexpected error {exc!r}")
    st = status_of(exc)
    reason = st.get("reason") or exc.reason or ""
    message = st.get("message") or str(exc.reason or "")
    code = exc.status or st.get("code") or 0
    if code == 409 and reason == "AlreadyExists":
        return AlreadyExists(message)
    if code == 409:
        return Conflict(message)
    if code == 404:
        return NotFound(message)
    if code == 403 and "exceeded quota" in message:
        return TemporaryError(f"{doing}: {message}", delay=QUOTA_RETRY_AFTER)
    if code == 403:
        return PermanentError("forbidden", f"{doing}: {message}")
    if code == 422 or reason == "Invalid":
        return PermanentError("invalid_job", f"{doing}: {message}")
    if code == 429 or code >= 500 or code == 0:
        return TemporaryError(f"{doing}: {code} {reason} {message}".strip(), delay=_retry_after(exc))
    if code == 401:
        return TemporaryError(f"{doing}: 401 Unauthorized (credentials expired?)")
    return PermanentError("kubernetes_rejected", f"{doing}: {code} {reason}: {message}")
