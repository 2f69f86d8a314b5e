"""What the lifecycle tests share: a dispatcher on the emulated cluster that can be restarted, a
Vault client that counts the tokens it mints (the real client, real OpenBao), and the group's payloads."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from dispatcher.credentials.tokens import VaultCredentials, WrappedToken
from dispatcher.intake.service import DispatcherService
from dispatcher.jobs.kubernetes import KubernetesRuntime
from dispatcher.plumbing.metrics import Metrics
from tests.integration.k8s_helpers import settings_for
from tests.support.identities import url_for
from tests.support.payloads import am_alert, dumps, group

STARTS = "2026-11-26T02:00:00Z"


class CountingCredentials(VaultCredentials):
    """The real Vault client, counting what it mints (a restart must mint nothing for an ended investigation)."""

    minted: list[str]

    async def mint(self, **kwargs) -> WrappedToken:  # type: ignore[override]
        token = await super().mint(**kwargs)
        self.minted = [*getattr(self, "minted", []), kwargs["investigation_id"]]
        return token


@contextlib.asynccontextmanager
async def dispatcher(handle, amqp_url: str, *, counting: bool = False, **env: str) -> AsyncIterator[DispatcherService]:
    """A dispatcher process's worth of state (fresh memory each time), on the emulated cluster."""
    settings = settings_for(handle.namespace, AGENTJOBS_AMQP__URL=url_for(amqp_url, "dispatcher"), **env)
    runtime = KubernetesRuntime(handle.api_client, namespace=handle.namespace, request_timeout=2,
                                watch_timeout=30, claim_timeout=5)
    metrics = Metrics()
    credentials = None
    if counting:
        credentials = CountingCredentials(settings.vault, scope=runtime.where, metrics=metrics)
        credentials.minted = []
    service = DispatcherService(settings, runtime, health_port=0, metrics=metrics, credentials=credentials)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(drain_timeout=5)


def outcomes(service: DispatcherService) -> dict[str, float]:
    """How the dispatcher handled incidents so far, by outcome label."""
    return {s.labels["outcome"]: s.value for m in service.metrics.incidents.collect() for s in m.samples
            if s.name.endswith("_total")}


def firing(name: str, *instances: str, key: str = "") -> bytes:
    alerts = [am_alert(starts_at=STARTS, alertname=name, instance=i) for i in instances]
    return dumps(group(alerts, group_key=key or f"lc-{name}"))


def resolved(name: str, *instances: str, key: str = "") -> bytes:
    alerts = [am_alert(starts_at=STARTS, alertname=name, instance=i, status="resolved",
                       ends_at="2026-11-26T02:30:00Z") for i in instances]
    return dumps(group(alerts, group_key=key or f"lc-{name}"))
