"""Picks the Job runtime named in settings (``runtime.kind``)."""

from __future__ import annotations

from pathlib import Path

from dispatcher.jobs.runtime import JobRuntime
from dispatcher.plumbing.settings import Settings


async def open_runtime(settings: Settings) -> JobRuntime:
    """The configured runtime, ready to launch."""
    if settings.runtime.kind == "kubernetes":
        from dispatcher.jobs.kubernetes import KubernetesRuntime

        return await KubernetesRuntime.from_settings(settings.k8s)
    from dispatcher.jobs.local import LocalRuntime

    return LocalRuntime(Path(settings.runtime.state_dir) / "local")
