"""Bytes ↔ wire messages, with one encoder/decoder per type per process.

``decode_incident`` is the intake boundary: it accepts our ``IncidentEvent``,
a raw Alertmanager v4 webhook, or a CloudEvents 1.0 envelope around either,
and turns everything else into a ``DecodeError`` whose ``reason`` says exactly
what was wrong. It never raises anything else, whatever the bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, TypeVar

import msgspec

from . import alertmanager, cloudevents
from .actions import ActionRecord
from .control import ApproveAction, CancelInvestigation
from .credentials import CredentialsIssued
from .deadletter import DeadLetter
from .errors import DecodeError
from .feedback import OperatorFeedback
from .finding import Finding
from .incident import AlertStatus, IncidentEvent
from .lifecycle import LifecycleEvent
from .phase import PhaseChanged, PhasePin

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB; Alertmanager groups of thousands of alerts fit easily

WireMessage = (
    IncidentEvent | LifecycleEvent | Finding | OperatorFeedback | PhaseChanged | DeadLetter | CancelInvestigation
    | CredentialsIssued | PhasePin | ActionRecord | ApproveAction
)
WIRE_TYPES: tuple[type[msgspec.Struct], ...] = (
    IncidentEvent,
    LifecycleEvent,
    Finding,
    OperatorFeedback,
    PhaseChanged,
    DeadLetter,
    CancelInvestigation,
    CredentialsIssued,
    PhasePin,
    ActionRecord,
    ApproveAction,
)
KINDS = {t.__struct_config__.tag: t for t in WIRE_TYPES}

T = TypeVar("T", bound=msgspec.Struct)

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder] = {}


class _Sniff(msgspec.Struct):
    """Just enough of any JSON object to tell which format it is."""

    kind: Any = None
    specversion: Any = None
    version: Any = None


def _decoder(type_: Any) -> msgspec.json.Decoder:
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.json.Decoder(type_)
    return dec


def encode(message: msgspec.Struct) -> bytes:
    """Serialise a wire message to JSON bytes."""
    return _encoder.encode(message)


def decode(body: bytes, type_: type[T] | Any = WireMessage) -> T:
    """Decode a wire message of ``type_`` (default: any tagged wire type); raises ``DecodeError``."""
    return _strict_decode(body, type_)


def _classify(exc: Exception) -> DecodeError:
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        if text.startswith("Object missing required field"):
            return DecodeError("missing_field", text)
        if "matching regex" in text and "labels" in text:
            return DecodeError("invalid_label", text)
        if text.startswith("Invalid value") and "kind" in text:
            return DecodeError("unknown_kind", text)
        return DecodeError("invalid_field", text)
    if isinstance(exc, UnicodeDecodeError):
        return DecodeError("not_utf8", f"body is not valid UTF-8: {exc.reason} at byte {exc.start}")
    if isinstance(exc, RecursionError):
        return DecodeError("too_deep", "JSON nesting is too deep")
    return DecodeError("invalid_json", text)


def _strict_decode(body: bytes | memoryview, type_: Any) -> Any:
    try:
        return _decoder(type_).decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _classify(exc) from None


def _check_size(body: bytes, max_bytes: int) -> None:
    if not body or not body.strip():
        raise DecodeError("empty_body", "body is empty")
    if len(body) > max_bytes:
        raise DecodeError("too_large", f"body is {len(body)} bytes; the limit is {max_bytes}")
    if not body.isascii():  # msgspec skips unknown fields without checking their encoding
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _classify(exc) from None


def _sniff(body: bytes) -> _Sniff:
    try:
        return _decoder(_Sniff).decode(body)
    except msgspec.ValidationError as exc:
        raise DecodeError("not_an_object", f"top-level JSON value must be an object ({exc})") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _classify(exc) from None


def _content_id(body: bytes, prefix: str) -> str:
    # Same bytes → same id, so a re-delivered notification is recognisable.
    return f"{prefix}-{hashlib.sha256(body).hexdigest()[:32]}"


def _check_consistency(event: IncidentEvent) -> IncidentEvent:
    if event.status is AlertStatus.RESOLVED and event.firing_alerts:
        raise DecodeError(
            "inconsistent_status",
            f"group status is resolved but {len(event.firing_alerts)} alert(s) are firing",
        )
    return event


def _from_alertmanager(body: bytes, sniff: _Sniff, *, event_id: str, source: str) -> IncidentEvent:
    if sniff.version != alertmanager.SUPPORTED_VERSION:
        raise DecodeError(
            "unsupported_version",
            f"Alertmanager webhook version {sniff.version!r} is not supported (expected "
            f"{alertmanager.SUPPORTED_VERSION!r})",
        )
    payload = _strict_decode(body, alertmanager.AlertmanagerWebhook)
    return alertmanager.to_incident(payload, event_id=event_id, fallback_source=source)


def _from_own(body: bytes, sniff: _Sniff, *, event_id: str) -> IncidentEvent:
    if sniff.kind != IncidentEvent.__struct_config__.tag:
        known = ", ".join(sorted(KINDS))
        raise DecodeError(
            "unknown_kind",
            f"kind {sniff.kind!r} is not an incident (known kinds: {known})"
            if isinstance(sniff.kind, str) and sniff.kind in KINDS
            else f"unknown kind {sniff.kind!r} (known kinds: {known})",
        )
    event = _strict_decode(body, IncidentEvent)
    if not event.event_id:
        event = msgspec.structs.replace(event, event_id=event_id)
    return event


def _from_cloudevent(body: bytes, fallback_source: str) -> IncidentEvent:
    envelope = _strict_decode(body, cloudevents.CloudEvent)
    if envelope.specversion != cloudevents.SPEC_VERSION:
        raise DecodeError(
            "unsupported_specversion",
            f"CloudEvents specversion {envelope.specversion!r} is not supported (expected "
            f"{cloudevents.SPEC_VERSION!r})",
        )
    if not cloudevents.is_json_content_type(envelope.datacontenttype):
        raise DecodeError(
            "unsupported_content_type",
            f"CloudEvents datacontenttype {envelope.datacontenttype!r} is not JSON",
        )
    data = bytes(envelope.data)
    has_data = data.strip() not in (b"", b"null")
    if has_data and envelope.data_base64 is not None:
        raise DecodeError("invalid_cloudevent", "CloudEvent has both data and data_base64")
    if envelope.data_base64 is not None:
        try:
            inner = base64.b64decode(envelope.data_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError("invalid_base64", f"data_base64 is not valid base64: {exc}") from None
    elif has_data:
        inner = data
    else:
        raise DecodeError("missing_data", "CloudEvent carries no data")
    sniff = _sniff(inner)
    if sniff.specversion is not None:
        raise DecodeError("nested_cloudevent", "a CloudEvent must not wrap another CloudEvent")
    source = envelope.source or fallback_source
    if sniff.kind is not None:
        return _from_own(inner, sniff, event_id=envelope.id)
    if sniff.version is not None:
        return _from_alertmanager(inner, sniff, event_id=envelope.id, source=source)
    raise DecodeError(
        "unknown_format", "CloudEvent data is neither an IncidentEvent nor an Alertmanager webhook"
    )


def decode_incident(
    body: bytes,
    *,
    max_bytes: int = MAX_BODY_BYTES,
    fallback_source: str = alertmanager.DEFAULT_SOURCE,
) -> IncidentEvent:
    """Decode an incident in any accepted format; raises ``DecodeError`` with a precise reason."""
    body = bytes(body)
    _check_size(body, max_bytes)
    sniff = _sniff(body)
    if sniff.specversion is not None:
        event = _from_cloudevent(body, fallback_source)
    elif sniff.kind is not None:
        event = _from_own(body, sniff, event_id=_content_id(body, "ev"))
    elif sniff.version is not None:
        event = _from_alertmanager(body, sniff, event_id=_content_id(body, "am"), source=fallback_source)
    else:
        raise DecodeError(
            "unknown_format",
            "object is not an IncidentEvent (no 'kind'), an Alertmanager webhook (no 'version') "
            "or a CloudEvent (no 'specversion')",
        )
    return _check_consistency(event)
