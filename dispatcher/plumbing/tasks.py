"""Running services: the event loop they run on, and named, guarded background tasks.

A crashed background task is logged and stops the service; it never vanishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from schemas.logs import get_logger
from dispatcher.plumbing.signals import stop_event

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


async def run_until_signalled(
    *,
    start: Callable[[], Coroutine[Any, Any, Any]],
    stop: Callable[[float], Coroutine[Any, Any, Any]],
    crashed: asyncio.Event | None = None,
    name: str,
) -> int:
    """A service's whole life: start, run until SIGTERM/SIGINT or a crash, stop.

    Exit codes: 0 stopped by a signal (also while still starting, e.g. the broker is away),
    1 a background task crashed, 2 it could not start (``TemporaryError`` from ``start``).
    ``stop`` gets its drain timeout: short when the service never really ran.
    """
    from schemas.errors import TemporaryError

    signalled = stop_event()  # before start: a signal while starting stops it too
    starting = asyncio.create_task(start(), name=f"{name}-start")
    stopping = asyncio.create_task(signalled.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # SIGTERM while still starting: just go
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await stop(1.0)
        return 0
    stopping.cancel()
    try:
        starting.result()
    except TemporaryError as exc:
        log.error(f"{name}_start_failed", error=exc.message)
        await stop(1.0)
        return 2
    log.info(f"{name}_running")
    waiters = [asyncio.create_task(signalled.wait())]
    if crashed is not None:
        waiters.append(asyncio.create_task(crashed.wait()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    await stop(30.0)
    return 1 if crashed is not None and crashed.is_set() else 0
