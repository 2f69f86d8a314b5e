"""Stopping long-running commands on SIGINT and SIGTERM, whatever disposition they inherited.

Python raises KeyboardInterrupt only when SIGINT was at its default at start: a parent that
ignores it (a shell without job control, ``nohup``, a supervisor's ``preexec_fn``) passes
SIG_IGN on, and a command relying on KeyboardInterrupt then ignores Ctrl-C and ``kill -INT``
for good. SIGTERM's default kills without any cleanup. ``loop.add_signal_handler`` installs
a real handler in either case, so every service and ``tail --follow`` takes its stop from here.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_event() -> asyncio.Event:
    """An Event that SIGINT or SIGTERM sets (call in the main thread, inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None if ``stop`` is set first (``work`` is then cancelled and awaited)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    if task.cancelled() and stop.is_set():
        return None
    return task.result()


def cancel_on(stop: asyncio.Event) -> Callable[[], None]:
    """Cancel the current task once ``stop`` is set; returns the call that disarms this.

    For a start-up made of many steps: a signal during any of them cancels the lot, and the
    caller's ``except asyncio.CancelledError`` (with ``stop.is_set()``) turns that into a stop.
    """
    current = asyncio.current_task()
    assert current is not None, "cancel_on needs a running task"
    armed = True

    async def watch() -> None:
        await stop.wait()
        if armed:
            current.cancel()

    watcher = asyncio.ensure_future(watch())

    def disarm() -> None:
        nonlocal armed
        armed = False
        watcher.cancel()

    return disarm
