"""Picks the Job runtime named in settings (``runtime.kind``)."""

from __future__ import annotations

from pathlib import Path

from .runtime import JobRuntime
from .settings import Settings


async def open_runtime(settings: Settings) -> JobRuntime:
    """The configured runtime, ready to launch."""
    if settings.runtime.kind == "kubernetes":
        from .runtime_k8s import KubernetesRuntime

        return await KubernetesRuntime.from_settings(settings.k8s)
    from .runtime_local import LocalRuntime

    return LocalRuntime(Path(settings.runtime.state_dir) / "local")
