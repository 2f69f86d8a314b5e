"""One investigation is one trace: the agent continues the Job's ``TRACEPARENT``.

The dispatcher puts the incident's trace context (or one derived from the
investigation) into the Job's environment; the agent extracts it, runs the
whole investigation inside an ``investigation`` span under it, and every
reasoning step and tool call is a child span (``Toolbox``, the reasoners). The
Finding carries the trace id. Spans go nowhere unless an exporter is
configured: with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set and ``opentelemetry-sdk``
plus ``opentelemetry-exporter-otlp`` installed, they are exported over OTLP;
otherwise the OpenTelemetry API is a no-op that still propagates the ids.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
tracer = trace.get_tracer("agentjobs.agent")


def trace_id_of(traceparent: str) -> str:
    """The 32-hex trace id of a W3C ``traceparent``, or "" (pure)."""
    match = _TRACEPARENT.match(traceparent.strip().lower())
    return match.group(1) if match else ""


def parent_context(traceparent: str) -> otel_context.Context:
    """The OpenTelemetry context that continues ``traceparent`` (empty when invalid)."""
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent.strip()})


@contextlib.contextmanager
def investigation_span(traceparent: str, **attributes: Any) -> Iterator[trace.Span]:
    """The root span of this investigation, a child of the Job's trace context."""
    with tracer.start_as_current_span("investigation", context=parent_context(traceparent),
                                      attributes={k: v for k, v in attributes.items() if v}) as span:
        yield span


def configure_export(environ: Mapping[str, str], *, service: str = "agentjobs-agent") -> Callable[[], None]:
    """Install an OTLP exporter when one is configured and installed; returns a flush-and-shutdown."""
    if not environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return lambda: None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:  # the exporter is optional: spans stay no-ops, ids still propagate
        return lambda: None
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider.shutdown
