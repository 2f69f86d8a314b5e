"""Object storage with etcd-like semantics: one resourceVersion counter, history, watches.

Every write bumps a single cluster-wide resourceVersion (as etcd's revision
does), appends to a bounded history, and fans the event out to open watches.
A watch may resume from any resourceVersion still in history; older ones get
410 Expired, which `compact()` lets a test provoke on purpose. Stored objects
are never mutated in place: readers get deep copies.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from . import status
from .clock import Clock, rfc3339
from .jsoncopy import clone
from .resources import ResourceType
from .selectors import FieldSelector, LabelSelector, labels_of

Key = tuple[str, str, str]  # (plural, namespace or "", name)


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    rt: ResourceType
    obj: dict
    old: dict | None


def key_of(rt: ResourceType, namespace: str | None, name: str) -> Key:
    return (rt.plural, namespace or "", name)


class Watcher:
    """One open watch: filters store events the way the apiserver's watch cache does."""

    def __init__(self, store: "Store", rt: ResourceType, namespace: str | None,
                 labels: LabelSelector, fields: FieldSelector, bookmarks: bool) -> None:
        self.store, self.rt, self.namespace = store, rt, namespace
        self.labels, self.fields, self.bookmarks = labels, fields, bookmarks
        self.queue: asyncio.Queue[tuple[str, dict] | None] = asyncio.Queue()

    def _matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        if self.namespace and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels.matches(labels_of(obj)) and self.fields.matches(obj)

    def offer(self, ev: Event) -> None:
        if ev.rt is not self.rt:
            return
        new, old = self._matches(ev.obj), self._matches(ev.old)
        if ev.type == "ADDED" and new:
            self.queue.put_nowait(("ADDED", ev.obj))
        elif ev.type == "DELETED" and new:
            self.queue.put_nowait(("DELETED", ev.obj))
        elif ev.type == "MODIFIED":
            # An object moving into / out of the selector looks like ADDED / DELETED.
            if new and old:
                self.queue.put_nowait(("MODIFIED", ev.obj))
            elif new:
                self.queue.put_nowait(("ADDED", ev.obj))
            elif old:
                self.queue.put_nowait(("DELETED", ev.obj))

    def bookmark(self, rv: int) -> None:
        if self.bookmarks:
            self.queue.put_nowait(("BOOKMARK", {"kind": self.rt.kind,
                                                "apiVersion": self.rt.api_version,
                                                "metadata": {"resourceVersion": str(rv)}}))

    def close(self) -> None:
        self.queue.put_nowait(None)
        self.store._watchers.discard(self)


class Store:
    def __init__(self, clock: Clock, history_limit: int = 10_000, first_rv: int = 1000) -> None:
        self.clock = clock
        self._objects: dict[Key, dict] = {}
        self._rv = first_rv
        self._history: deque[Event] = deque()
        self._history_limit = history_limit
        self._compacted = first_rv  # watches can resume from any rv >= this
        self._watchers: set[Watcher] = set()
        self._listeners: list[Callable[[Event], None]] = []
        self._watch_waiters: list[asyncio.Future] = []

    # -- reading -------------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def oldest_resumable(self) -> int:
        return self._compacted

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict | None:
        obj = self._objects.get(key_of(rt, namespace, name))
        return clone(obj) if obj is not None else None

    def list(self, rt: ResourceType, namespace: str | None = None,
             where: Callable[[dict], bool] | None = None) -> list[dict]:
        """Copies of the stored objects of ``rt`` (those ``where`` accepts: filtered before copying)."""
        out = [clone(o) for (plural, ns, _), o in self._objects.items()
               if plural == rt.plural and (namespace is None or ns == namespace) and (where is None or where(o))]
        out.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return out

    def find_by_uid(self, uid: str) -> tuple[ResourceType, dict] | None:
        for obj in self._objects.values():
            if obj["metadata"].get("uid") == uid:
                from .resources import BY_KIND
                return BY_KIND[(obj["apiVersion"], obj["kind"])], clone(obj)
        return None

    # -- writing -------------------------------------------------------------------------
    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, ev: Event) -> None:
        self._history.append(ev)
        while len(self._history) > self._history_limit:
            self._compacted = self._history.popleft().rv
        for w in list(self._watchers):
            w.offer(ev)
        for listener in list(self._listeners):
            listener(ev)

    def create(self, rt: ResourceType, obj: dict) -> dict:
        meta = obj["metadata"]
        key = key_of(rt, meta.get("namespace"), meta["name"])
        if key in self._objects:
            raise status.already_exists(rt, meta["name"])
        obj = clone(obj)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", rfc3339(self.clock.time()))
        rv = self._bump()
        meta["resourceVersion"] = str(rv)
        self._objects[key] = obj
        self._emit(Event(rv, "ADDED", rt, clone(obj), None))
        return clone(obj)

    def update(self, rt: ResourceType, obj: dict, *, expect_rv: str | None = None) -> dict:
        """Replace an existing object; `expect_rv` enables optimistic concurrency (409 Conflict)."""
        meta = obj["metadata"]
        key = key_of(rt, meta.get("namespace"), meta["name"])
        current = self._objects.get(key)
        if current is None:
            raise status.not_found(rt, meta["name"])
        if expect_rv and expect_rv != current["metadata"]["resourceVersion"]:
            raise status.conflict(rt, meta["name"])
        obj = clone(obj)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        for immutable in ("uid", "creationTimestamp", "namespace", "name"):
            if immutable in current["metadata"]:
                obj["metadata"][immutable] = current["metadata"][immutable]
        rv = self._bump()
        obj["metadata"]["resourceVersion"] = str(rv)
        self._objects[key] = obj
        self._emit(Event(rv, "MODIFIED", rt, clone(obj), clone(current)))
        return clone(obj)

    def remove(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        key = key_of(rt, namespace, name)
        current = self._objects.pop(key, None)
        if current is None:
            raise status.not_found(rt, name)
        rv = self._bump()
        final = clone(current)
        final["metadata"]["resourceVersion"] = str(rv)
        self._emit(Event(rv, "DELETED", rt, clone(final), clone(current)))
        return final

    # -- watching ------------------------------------------------------------------------
    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Synchronous hook for in-process controllers; called after every write."""
        self._listeners.append(listener)

    def watch(self, rt: ResourceType, namespace: str | None, since: int | None,
              labels: LabelSelector, fields: FieldSelector, bookmarks: bool) -> Watcher:
        """Open a watch; `since=None` starts with ADDED for every current object.

        Raises ValueError(oldest) when `since` has been compacted away.
        """
        w = Watcher(self, rt, namespace, labels, fields, bookmarks)
        if since is None:
            for obj in self.list(rt, namespace):
                w.offer(Event(int(obj["metadata"]["resourceVersion"]), "ADDED", rt, obj, None))
        else:
            if since < self._compacted:
                raise ValueError(self._compacted)
            for ev in self._history:
                if ev.rv > since:
                    w.offer(ev)
        self._watchers.add(w)
        for fut in self._watch_waiters:
            if not fut.done():
                fut.set_result(w)
        self._watch_waiters.clear()
        return w

    def watch_count(self, rt: ResourceType) -> int:
        return sum(1 for w in self._watchers if w.rt is rt)

    async def next_watch(self) -> Watcher:
        """Resolves when the next watch opens (tests use it to avoid racing a watch request)."""
        fut = asyncio.get_running_loop().create_future()
        self._watch_waiters.append(fut)
        return await fut

    def compact(self) -> int:
        """Forget history up to now (like etcd compaction); older watches get 410."""
        self._history.clear()
        self._compacted = self._rv
        return self._rv

    def bookmark(self) -> None:
        """Send a BOOKMARK to every watch that asked for them."""
        for w in list(self._watchers):
            w.bookmark(self._rv)

    def close_watches(self) -> None:
        for w in list(self._watchers):
            w.close()

    def objects(self, rt: ResourceType) -> Iterable[dict]:
        return self.list(rt)
