"""structlog, configured once per process, with secrets kept out of every line.

JSON lines off a TTY (what log shippers want), a readable console on a TTY.
stdlib loggers (aio-pika, aiormq, kubernetes_asyncio, aiohttp) are routed
through the same processors, so their lines are redacted and formatted too.
Per-message context is bound with ``structlog.contextvars`` (see ``bound``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any, Literal, TextIO

import msgspec
import structlog

from . import redaction


class LoggingSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[logging]``: the one settings section the agent and the control plane share."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop values of secret-looking keys, mask tokens and URL passwords."""
    for key, value in list(event_dict.items()):
        event_dict[key] = redaction.redact(value, key)
    return event_dict


def _use_json(settings: LoggingSettings, stream: TextIO) -> bool:
    if settings.format == "json":
        return True
    if settings.format == "console":
        return False
    return not (hasattr(stream, "isatty") and stream.isatty())


def configure(settings: LoggingSettings | None = None, *, stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging once for this process."""
    settings = settings or LoggingSettings()
    stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,  # last before rendering: sees everything, including formatted tracebacks
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if _use_json(settings, stream)
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    level = getattr(logging, settings.level.upper())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty libraries stay at warning unless we debug.
    for name in ("aio_pika", "aiormq", "kubernetes_asyncio", "aiohttp.access", "hvac", "urllib3"):
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger, optionally with bound values.

    Without values it stays a lazy proxy, so module-level loggers pick up ``configure``
    even when it runs after import (binding would freeze the default configuration).
    """
    logger = structlog.stdlib.get_logger(name)
    return logger.bind(**initial) if initial else logger


@contextlib.contextmanager
def bound(**context: Any) -> Iterator[None]:
    """Bind context (investigation_id, incident_key, message_id, attempt…) for a block."""
    tokens = structlog.contextvars.bind_contextvars(**context)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
