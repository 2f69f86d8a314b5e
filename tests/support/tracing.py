"""Recording the spans the code under test makes (the OpenTelemetry SDK's in-memory exporter).

The global tracer provider can be set once per process; ``recorded_spans`` installs an SDK
provider the first time and gives each caller a fresh exporter on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_provider: TracerProvider | None = None


@contextlib.contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    global _provider
    if _provider is None:
        _provider = TracerProvider()
        trace.set_tracer_provider(_provider)
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    _provider.add_span_processor(processor)
    try:
        yield exporter
    finally:
        processor.shutdown()  # stops recording into this exporter
