"""Running services: the event loop they run on, and named, guarded background tasks.

A crashed background task is logged and stops the service; it never vanishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .logs import get_logger

log = get_logger("agentjobs.tasks")
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a service's main coroutine on uvloop when installed, else on the standard loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on our platforms
        return asyncio.run(main)
    return uvloop.run(main)


def spawn(
    coro: Coroutine[Any, Any, Any], *, name: str, on_crash: Callable[[str, BaseException], None]
) -> asyncio.Task[Any]:
    """Start ``coro`` as task ``name``; if it ends with an exception, call ``on_crash``."""
    task = asyncio.create_task(coro, name=name)

    def _done(t: asyncio.Task[Any]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            log.error("task_crashed", task=name, error=repr(exc), exc_info=exc)
            on_crash(name, exc)

    task.add_done_callback(_done)
    return task
