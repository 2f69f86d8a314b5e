"""Records core/v1 Events the way controllers and the kubelet do (SuccessfulCreate, Killing …)."""

from __future__ import annotations

import time

from .clock import Clock, rfc3339
from .resources import EVENTS, NAMESPACES
from .store import Store


class Recorder:
    def __init__(self, store: Store, clock: Clock) -> None:
        self.store, self.clock = store, clock

    def record(self, obj: dict, type_: str, reason: str, message: str, component: str) -> None:
        meta = obj["metadata"]
        ns = meta.get("namespace") or "default"
        if self.store.get(NAMESPACES, None, ns) is None:
            return
        now = rfc3339(self.clock.time())
        self.store.create(EVENTS, {
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": ns},
            "involvedObject": {"kind": obj["kind"], "namespace": ns, "name": meta["name"],
                               "uid": meta.get("uid"), "apiVersion": obj["apiVersion"],
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message, "type": type_,
            "source": {"component": component}, "firstTimestamp": now, "lastTimestamp": now,
            "count": 1, "reportingComponent": component, "reportingInstance": "",
        })
