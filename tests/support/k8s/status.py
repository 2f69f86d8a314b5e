"""Status bodies shaped like kube-apiserver's, so clients branch on `reason` exactly as in production.

Every error the emulator returns goes through here; message formats are copied
from k8s.io/apimachinery/pkg/api/errors so log lines and tests read the same
as against a real cluster.
"""

from __future__ import annotations

from typing import Any

from .resources import ResourceType


class ApiError(Exception):
    """Raised inside the emulator; the server turns it into a Status response."""

    def __init__(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("message", ""))
        self.body = body
        self.code: int = body["code"]
        self.headers = headers or {}


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict[str, Any]:
    """A failure Status object."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details:
        body["details"] = details
    body["code"] = code
    return body


def _details(rt: ResourceType, name: str | None, kind: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if name:
        d["name"] = name
    if rt.group:
        d["group"] = rt.group
    d["kind"] = kind or rt.plural
    return d


def _subject(rt: ResourceType, name: str | None) -> str:
    return f'{rt.qualified} "{name}"' if name else rt.qualified


def success(rt: ResourceType, name: str, uid: str) -> dict[str, Any]:
    """The Status a DELETE returns for resources that do not echo the deleted object."""
    details = _details(rt, name)
    details["uid"] = uid
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    }


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(status(404, "NotFound", f"{_subject(rt, name)} not found", _details(rt, name)))


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        status(409, "AlreadyExists", f"{_subject(rt, name)} already exists", _details(rt, name))
    )


def conflict(rt: ResourceType, name: str) -> ApiError:
    msg = (
        f"Operation cannot be fulfilled on {_subject(rt, name)}: the object has been modified; "
        "please apply your changes to the latest version and try again"
    )
    return ApiError(status(409, "Conflict", msg, _details(rt, name)))


def forbidden(
    rt: ResourceType,
    name: str | None,
    user: str,
    verb: str,
    namespace: str | None,
    subresource: str | None = None,
) -> ApiError:
    resource = rt.plural + (f"/{subresource}" if subresource else "")
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    msg = (
        f'{_subject(rt, name)} is forbidden: User "{user}" cannot {verb} resource '
        f'"{resource}" in API group "{rt.group}" {scope}'
    )
    return ApiError(status(403, "Forbidden", msg, _details(rt, name)))


def quota_exceeded(
    rt: ResourceType, name: str, quota: str, key: str, requested: int, used: int, limited: int
) -> ApiError:
    msg = (
        f"{_subject(rt, name)} is forbidden: exceeded quota: {quota}, "
        f"requested: {key}={requested}, used: {key}={used}, limited: {key}={limited}"
    )
    return ApiError(status(403, "Forbidden", msg, _details(rt, name)))


def invalid(rt: ResourceType, name: str, causes: list[dict[str, str]]) -> ApiError:
    """422 Invalid; each cause is {field, reason, message} like field.Error."""
    rendered = [f"{c['field']}: {c['message']}" for c in causes]
    joined = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
    details = _details(rt, name, kind=rt.kind)
    details["causes"] = [
        {"reason": c["reason"], "message": c["message"], "field": c["field"]} for c in causes
    ]
    return ApiError(status(422, "Invalid", f'{rt.kind}.{rt.group or ""}'.rstrip(".")
                           + f' "{name}" is invalid: {joined}', details))


def bad_request(message: str) -> ApiError:
    return ApiError(status(400, "BadRequest", message))


def unauthorized() -> ApiError:
    return ApiError(status(401, "Unauthorized", "Unauthorized"))


def method_not_supported(rt: ResourceType, verb: str) -> ApiError:
    msg = f"{verb} is not supported on resources of kind \"{rt.qualified}\""
    return ApiError(status(405, "MethodNotAllowed", msg, _details(rt, None)))


def expired(requested: int, oldest: int) -> dict[str, Any]:
    """The in-stream ERROR object a watch gets for a compacted resourceVersion."""
    return status(410, "Expired", f"too old resource version: {requested} ({oldest})")


def too_many_requests(retry_after: int) -> ApiError:
    body = status(
        429,
        "TooManyRequests",
        "Too many requests, please try again later.",
        {"retryAfterSeconds": retry_after},
    )
    return ApiError(body, {"Retry-After": str(retry_after)})


def for_code(code: int, retry_after: int | None = None) -> ApiError:
    """A plausible Status for an injected HTTP status code."""
    if code == 429:
        return too_many_requests(retry_after or 1)
    table = {
        400: ("BadRequest", "the server rejected our request for an unknown reason"),
        401: ("Unauthorized", "Unauthorized"),
        403: ("Forbidden", "forbidden (injected fault)"),
        404: ("NotFound", "the server could not find the requested resource"),
        409: ("Conflict", "the object has been modified (injected fault)"),
        500: ("InternalError", "Internal error occurred: injected fault"),
        502: ("InternalError", "Internal error occurred: bad gateway (injected fault)"),
        503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
        504: (
            "Timeout",
            "Timeout: request did not complete within requested timeout - "
            "context deadline exceeded",
        ),
    }
    reason, message = table.get(code, ("InternalError", f"injected status {code}"))
    details = {"causes": [{"message": message}]} if code == 500 else None
    if retry_after is not None:
        details = {**(details or {}), "retryAfterSeconds": retry_after}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return ApiError(status(code, reason, message, details), headers)
