"""A small, strict Kubernetes API emulator for tests: the real kubernetes_asyncio client over real HTTP.

No kube-apiserver can run on our machines, so the dispatcher's Kubernetes
code is tested against this. Start one with `running_emulator()` or the
pytest fixtures in `fixtures.py`; drive the world through `handle.cluster`
(clock, kubelet, faults, rbac, tokens). Module map: resources/status (wire
shapes), store (resourceVersion, history, watch), selectors, defaults and
validation, admission (RBAC, quota), gc (deletion), controller (Jobs, TTL),
kubelet + podfiles + logs (running pods), tokens + jwt (ServiceAccount
tokens, TokenReview), faults, server (HTTP), cluster (the handle).
"""

from .clock import Clock
from .cluster import Cluster
from .server import Server

__all__ = ["Cluster", "Clock", "Server"]
