"""The messaging sweep: what an on-call SRE asks a RabbitMQ broker first, whatever the alert is called.

Questions, in order: is a node in a memory or disk alarm (every publisher is then
blocked)? Are publishers held back without an alarm (credit flow control)? Does
the queue the alert names — and, so that an alert naming no queue still finds
it, the most backed-up queues of the alert's vhost (else of every vhost the
agent's user sees) — have no consumer, consumers that are stalled (every
consumer's prefetch window full of unacknowledged messages, nothing delivered or
acknowledged) or consumers that are merely too slow (deliveries flow, the
backlog still grows)?

Each answer moves competing hypotheses up or down (``Draft.supports`` /
``Draft.contradicts``): the ``assess_*`` functions are pure, over the rabbitmq
tool's observations; ``sweep`` only calls the tool. Without the management
operations (no management URL), the named queue is still read with a passive
declare (``rules.assess_queue``).

Causes: ``no_consumer``, ``stalled_consumer``, ``consumers_too_slow``,
``broker_memory_alarm``, ``broker_disk_alarm``, ``publishers_blocked``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from agent.tools.base import Observation

from .base import Investigation, quote_untrusted
from .rules import QUEUE_BACKLOG, QUEUE_BACKLOG_PER_CONSUMER, AlertFacts, Draft, assess_queue, read_queue_status

TOOL = "rabbitmq"
STALL_RATE = 0.01  # messages per second below which nothing is delivered or acknowledged
MAX_SUSPECTS = 3  # backed-up queues besides the named one looked at in detail (one call each)
HELD_BY_ALARM = ("blocked", "blocking")  # connection states an alarm causes (flow is credit flow control)


def _q(text: str) -> str:
    return quote_untrusted(text or "(none)", 80)


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _rate(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------------------------
# Reading the rabbitmq tool's management observations (shapes: agent/tools/rabbitmq.py).
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Node:
    name: str
    mem_alarm: bool
    disk_alarm: bool
    mem_used: int | None
    mem_limit: int | None
    disk_free: int | None
    disk_free_limit: int | None


def read_nodes(obs: Observation) -> list[Node] | None:
    """rabbitmq.overview ``nodes``: ``name``, ``mem_alarm``, ``disk_free_alarm``, ``mem_used``, ``mem_limit``,
    ``disk_free``, ``disk_free_limit``; None when the overview failed."""
    nodes = obs.data.get("nodes") if obs.ok and isinstance(obs.data, Mapping) else None
    if not isinstance(nodes, list):
        return None
    return [Node(name=str(n.get("name", "")), mem_alarm=bool(n.get("mem_alarm")),
                 disk_alarm=bool(n.get("disk_free_alarm")), mem_used=_int(n.get("mem_used")),
                 mem_limit=_int(n.get("mem_limit")), disk_free=_int(n.get("disk_free")),
                 disk_free_limit=_int(n.get("disk_free_limit")))
            for n in nodes if isinstance(n, Mapping)]


@dataclass(frozen=True, kw_only=True)
class HeldConnection:
    name: str
    user: str
    vhost: str
    client_name: str
    state: str  # blocked, blocking or flow


def read_held_connections(obs: Observation) -> list[HeldConnection] | None:
    """rabbitmq.connections ``connections`` (only those blocked, blocking or in flow): ``name``, ``user``,
    ``vhost``, ``client_name``, ``state``; None when the call failed."""
    rows = obs.data.get("connections") if obs.ok and isinstance(obs.data, Mapping) else None
    if not isinstance(rows, list):
        return None
    return [HeldConnection(name=str(c.get("name", "")), user=str(c.get("user", "")), vhost=str(c.get("vhost", "")),
                           client_name=str(c.get("client_name", "")), state=str(c.get("state", "")))
            for c in rows if isinstance(c, Mapping) and c.get("state") in ("blocked", "blocking", "flow")]


@dataclass(frozen=True, kw_only=True)
class QueueView:
    vhost: str
    name: str
    ready: int
    unacked: int
    consumers: int
    publish_rate: float | None  # messages per second; None: no sample yet
    deliver_rate: float | None
    ack_rate: float | None
    ready_rate: float | None  # growth of ready messages per second
    idle_since: str = ""
    detailed: bool = False  # from rabbitmq.queue: the consumers' prefetch below is known
    prefetch: tuple[int | None, ...] = ()  # each consumer's prefetch_count (0: unlimited, or its channel's global)
    ack_required: bool = True  # every consumer acknowledges (auto-ack windows never fill)
    channel_unacked: int | None = None  # unacked messages of the consumers' channels, summed
    prefetch_total: int | None = None  # the tool's sum of the windows (channel-global prefetch included)

    @property
    def window(self) -> int | None:
        """The consumers' prefetch windows summed; None when unknown or unlimited (pure)."""
        if not self.detailed or not self.prefetch or not self.ack_required:
            return None
        if self.prefetch_total is not None:
            return self.prefetch_total
        if any(not n for n in self.prefetch):
            return None
        return sum(n for n in self.prefetch if n)


def _view(q: Mapping[str, Any], *, detailed: bool) -> QueueView | None:
    ready, consumers = _int(q.get("messages_ready")), _int(q.get("consumers"))
    if ready is None or consumers is None:  # not sampled yet: nothing to say about it
        return None
    if str(q.get("type") or "") == "stream":  # a stream keeps its messages by design: "ready" is no backlog
        return None
    consumer_rows = [c for c in q.get("consumer_details") or [] if isinstance(c, Mapping)] if detailed else []
    channels = [c for c in q.get("channels") or [] if isinstance(c, Mapping)] if detailed else []
    channel_unacked = [n for c in channels if (n := _int(c.get("messages_unacknowledged"))) is not None]
    return QueueView(
        vhost=str(q.get("vhost", "")), name=str(q.get("name", "")), ready=max(0, ready),
        unacked=max(0, _int(q.get("messages_unacknowledged")) or 0), consumers=max(0, consumers),
        publish_rate=_rate(q.get("publish_rate")), deliver_rate=_rate(q.get("deliver_rate")),
        ack_rate=_rate(q.get("ack_rate")), ready_rate=_rate(q.get("ready_rate")),
        idle_since=str(q.get("idle_since") or ""), detailed=detailed,
        prefetch=tuple(_int(c.get("prefetch_count")) for c in consumer_rows),
        ack_required=all(bool(c.get("ack_required", True)) for c in consumer_rows),
        channel_unacked=sum(channel_unacked) if channel_unacked else None,
        prefetch_total=_int(q.get("prefetch_total")) if detailed else None)


def read_queues(obs: Observation) -> list[QueueView] | None:
    """rabbitmq.queues ``queues`` rows (``messages_ready``, ``messages_unacknowledged``, ``consumers``, rates),
    most ready first; None when the call failed."""
    rows = obs.data.get("queues") if obs.ok and isinstance(obs.data, Mapping) else None
    if not isinstance(rows, list):
        return None
    views = [v for q in rows if isinstance(q, Mapping) and (v := _view(q, detailed=False)) is not None]
    return sorted(views, key=lambda v: -v.ready)


def read_queue_detail(obs: Observation) -> QueueView | None:
    """rabbitmq.queue: the ``queues`` row plus ``consumer_details`` (``prefetch_count``, ``ack_required``) and
    ``channels`` (``messages_unacknowledged``); None when the call failed."""
    if not obs.ok or not isinstance(obs.data, Mapping):
        return None
    return _view(obs.data, detailed=True)


# --------------------------------------------------------------------------------------------
# Pure assessments.
# --------------------------------------------------------------------------------------------

def _where(vhost: str, name: str) -> str:
    return f"queue {_q(name)} in vhost {_q(vhost)}"


def _rate_text(rate: float | None) -> str:
    return "no sample" if rate is None else f"{rate:.3g}/s"


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def assess_alarms(overview: Observation, connections: Observation | None = None) -> list[Draft]:
    """A memory or disk alarm on a node — every publisher blocked until it clears — or none (pure)."""
    mem_h = Draft(cause="broker_memory_alarm", statement="a RabbitMQ node is in a memory alarm: publishers are blocked")
    disk_h = Draft(cause="broker_disk_alarm", statement="a RabbitMQ node is in a disk alarm: publishers are blocked")
    nodes = read_nodes(overview)
    if nodes is None:  # the failure is in the finding; neither hypothesis was examined
        return [mem_h, disk_h]
    held = (read_held_connections(connections) if connections is not None else None) or []
    blocked = [c for c in held if c.state in HELD_BY_ALARM]
    for h, alarmed, what in ((mem_h, [n for n in nodes if n.mem_alarm], "memory"),
                             (disk_h, [n for n in nodes if n.disk_alarm], "disk")):
        if not alarmed:
            figures = "; ".join(
                f"{n.name}: mem_used {_gib(n.mem_used)} of {_gib(n.mem_limit)}" if what == "memory"
                else f"{n.name}: disk_free {_gib(n.disk_free)}, limit {_gib(n.disk_free_limit)}" for n in nodes)
            h.contradicts(overview, f"no node is in a {what} alarm ({figures or 'no node listed'})", 2.5)
            continue
        node = alarmed[0]
        if what == "memory":
            figures = f"mem_used {_gib(node.mem_used)} of limit {_gib(node.mem_limit)}"
            over = node.mem_used is not None and node.mem_limit is not None and node.mem_used >= node.mem_limit
        else:
            figures = f"disk_free {_gib(node.disk_free)} below limit {_gib(node.disk_free_limit)}"
            over = (node.disk_free is not None and node.disk_free_limit is not None
                    and node.disk_free <= node.disk_free_limit)
        h.statement = (f"RabbitMQ node {_q(node.name)} is in a {what} alarm ({figures}): the broker blocks every "
                       "publishing connection until it clears")
        h.supports(overview, f"node {_q(node.name)} reports a {what} alarm ({figures})", 3.0)
        if over:
            h.supports(overview, f"{figures}: over the watermark", 0.5)
        if blocked:
            h.supports(connections or overview,
                       f"{_plural(len(blocked), 'connection')} blocked or blocking, as an alarm does", 0.5)
    return [mem_h, disk_h]


def assess_held_publishers(connections: Observation, overview: Observation | None = None, *,
                           scoped: bool = True) -> Draft:
    """Publishers held back without an alarm: blocked/blocking connections or credit flow control (pure).

    A connection in flow is normal for a moment under load: a few in flow say little, most of them a lot.
    ``scoped``: the connections are the alert's vhost's (else the whole broker's).
    """
    h = Draft(cause="publishers_blocked", statement="the broker holds publishers back (flow control)")
    held = read_held_connections(connections)
    if held is None:
        return h
    total = _int(connections.data.get("total")) or len(held)
    if not held:
        h.contradicts(connections, "no connection is blocked, blocking or in flow control", 2.0)
        return h
    names = ", ".join(f"{_q(c.client_name or c.name)} ({c.state}, user {_q(c.user)})" for c in held[:5])
    blocked = [c for c in held if c.state in HELD_BY_ALARM]
    h.statement = (f"{_plural(len(held), 'publishing connection')} {'is' if len(held) == 1 else 'are'} held back by "
                   f"the broker ({'blocked' if blocked else 'flow control'}): {names}")
    if blocked:
        h.supports(connections, f"{_plural(len(blocked), 'connection')} blocked or blocking: {names}", 2.0)
    elif len(held) >= 3 or 2 * len(held) >= total:
        h.supports(connections, f"{len(held)} of {_plural(total, 'connection')} in flow control: {names}", 1.5)
    else:
        h.supports(connections, f"{len(held)} of {_plural(total, 'connection')} in flow control (a moment of "
                                f"flow is normal under load): {names}", 0.75)
    if not blocked and not scoped:
        h.contradicts(connections, "the alert names no vhost: these connections may publish elsewhere", 0.5)
    nodes = read_nodes(overview) if overview is not None else None
    if nodes is not None:
        alarmed = [n for n in nodes if n.mem_alarm or n.disk_alarm]
        if alarmed:
            h.contradicts(overview, f"node {_q(alarmed[0].name)} is in an alarm: the alarm blocks them, it is the "
                                    "cause", 2.5)
        else:
            h.supports(overview, "no node is in a memory or disk alarm: the broker throttles them by flow control",
                       1.0)
    return h


def assess_queue_view(obs: Observation, q: QueueView, *, named: bool, scoped: bool = True) -> list[Draft]:
    """No consumer, stalled consumers or consumers too slow, for one queue (pure).

    ``named``: the alert names this queue. Another queue needs live publishers before "no consumer" counts
    fully: an idle queue nobody reads is often a parked dead-letter queue or an old backlog, not this
    incident. ``scoped``: the alert names the queue's vhost; a queue found in a vhost the alert does not
    name says less about it.
    """
    where = _where(q.vhost, q.name)
    none_h = Draft(cause="no_consumer", statement=f"{where} has ready messages and no consumer")
    stalled_h = Draft(cause="stalled_consumer", statement=f"the consumers of {where} are stalled")
    slow_h = Draft(cause="consumers_too_slow", statement=f"the consumers of {where} do not keep up with its publishers")
    drafts = [none_h, stalled_h, slow_h]
    if not named and not scoped:
        for h in drafts:
            h.contradicts(obs, f"the alert names neither {where} nor its vhost", 1.0)
    n, c, u = q.ready, q.consumers, q.unacked
    growing = q.ready_rate is not None and q.ready_rate > STALL_RATE
    publishing = q.publish_rate is not None and q.publish_rate > STALL_RATE
    if n == 0 and u == 0:
        for h in drafts:
            h.contradicts(obs, f"{where} is empty now (0 ready, 0 unacked, {_plural(c, 'consumer')}): no backlog", 2.5)
        return drafts
    if c == 0:
        if n == 0:
            for h in drafts:
                h.contradicts(obs, f"{where} has no ready messages: nothing waits for delivery", 2.0)
            return drafts
        none_h.statement = f"{where} has {_plural(n, 'ready message')} and no consumer"
        none_h.supports(obs, f"{where} has no consumer", 2.0)
        none_h.supports(obs, f"{n} message(s) in {where} are ready, waiting for delivery", 1.5)
        if n >= QUEUE_BACKLOG:
            none_h.supports(obs, f"{n} ready messages is a backlog (>= {QUEUE_BACKLOG})", 0.5)
        if growing or publishing:
            none_h.supports(obs, f"publishers still publish ({_rate_text(q.publish_rate)}; ready grows "
                                 f"{_rate_text(q.ready_rate)})", 0.5)
        elif not named:
            none_h.contradicts(obs, f"{where} is not the alert's queue and nothing is published to it now "
                                    f"(publish {_rate_text(q.publish_rate)}): perhaps a parked queue or an old "
                                    "backlog", 1.5)
        for h in (stalled_h, slow_h):
            h.contradicts(obs, f"{where} has no consumer that could be stalled or slow", 3.0)
        return drafts

    none_h.contradicts(obs, f"{where} has {_plural(c, 'consumer')}", 3.0)
    rates_known = q.ack_rate is not None or q.deliver_rate is not None
    stuck = rates_known and (q.ack_rate or 0.0) < STALL_RATE and (q.deliver_rate or 0.0) < STALL_RATE
    flowing = rates_known and not stuck
    rates = f"deliver {_rate_text(q.deliver_rate)}, ack {_rate_text(q.ack_rate)}"

    # Stalled: every prefetch window full of unacknowledged messages and nothing moves.
    window = q.window
    held = max(u, q.channel_unacked or 0)
    if window is not None and held >= window:  # the statement says only what the evidence shows
        stalled_h.statement = (f"the {_plural(c, 'consumer')} of {where} are stalled: {held} unacknowledged "
                               f"message(s) fill their prefetch window ({window}), {n} message(s) wait")
        windows = "+".join(str(p) for p in q.prefetch) if all(q.prefetch) else str(window)
        stalled_h.supports(obs, f"every consumer's prefetch window is full: {held} unacked = prefetch "
                                f"{windows} over {_plural(c, 'consumer')}", 2.0)
    elif window is not None:
        stalled_h.contradicts(obs, f"{held} unacked of a prefetch window of {window}: the consumers have room for "
                                   "more", 2.0)
    elif q.detailed:
        stalled_h.contradicts(obs, "the consumers have no prefetch limit or do not acknowledge: no window can fill",
                              1.0)
    if stuck:
        stalled_h.supports(obs, f"nothing is delivered or acknowledged ({rates})", 1.0)
    elif flowing:
        stalled_h.contradicts(obs, f"deliveries and acks flow ({rates})", 2.0)
    if n > 0:
        stalled_h.supports(obs, f"{n} ready message(s) wait behind them", 0.5)
    if growing:
        stalled_h.supports(obs, f"ready grows {_rate_text(q.ready_rate)}", 0.5)

    # Too slow: deliveries flow, the backlog still builds up.
    slow_h.statement = (f"the {_plural(c, 'consumer')} of {where} do not keep up: {n} message(s) ready ({rates}, "
                        f"ready grows {_rate_text(q.ready_rate)})")
    if stuck:
        slow_h.contradicts(obs, f"nothing is delivered or acknowledged ({rates}): the consumers are stuck, not slow",
                           1.5)
    elif flowing:
        slow_h.supports(obs, f"deliveries flow ({rates})", 1.0)
    if growing:
        slow_h.supports(obs, f"ready grows {_rate_text(q.ready_rate)} while consumers take {rates}", 1.0)
    if n >= QUEUE_BACKLOG:
        slow_h.supports(obs, f"{n} messages in {where} are ready despite {_plural(c, 'consumer')}", 1.0)
        if n >= QUEUE_BACKLOG_PER_CONSUMER * c:
            slow_h.supports(obs, f"{n // c} ready messages per consumer", 0.5)
    elif not growing:
        slow_h.contradicts(obs, f"only {n} message(s) ready and not growing: no real backlog", 1.0)
    return drafts


def assess_no_backlog(obs: Observation, where: str) -> list[Draft]:
    """A queue listing in which nothing is ready: no queue hypothesis holds (pure)."""
    drafts = [Draft(cause=cause, statement=f"a queue in {where} {what}")
              for cause, what in (("no_consumer", "has ready messages and no consumer"),
                                  ("stalled_consumer", "has stalled consumers"),
                                  ("consumers_too_slow", "has consumers that do not keep up"))]
    for h in drafts:
        h.contradicts(obs, f"no queue in {where} holds ready messages", 2.0)
    return drafts


def exact_counts(named: Observation, view: QueueView, declared: Observation) -> tuple[Observation, QueueView]:
    """The queue's view with the passive declare's ready and consumer counts, which are exact now, where they
    differ from the management API's sampled ones — and that observation as the one to cite (pure)."""
    exact = read_queue_status(declared)
    if exact is None or (exact.ready, exact.consumers) == (view.ready, view.consumers):
        return named, view
    return declared, replace(view, ready=exact.ready, consumers=exact.consumers)


def suspects(queues: list[QueueView], seen: set[tuple[str, str]], limit: int = MAX_SUSPECTS) -> list[QueueView]:
    """The most backed-up queues not looked at yet (ready > 0, most first) (pure)."""
    return [q for q in queues if q.ready > 0 and (q.vhost, q.name) not in seen][:limit]


# --------------------------------------------------------------------------------------------
# The sweep: tool calls only.
# --------------------------------------------------------------------------------------------

async def sweep(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Alarms, held publishers, the named queue first, then the most backed-up queues of the alert's vhost
    (else of every vhost the agent sees)."""
    drafts: list[Draft] = []
    offers = {op: inv.offers(TOOL, op) for op in ("overview", "connections", "queues", "queue", "queue_status")}
    overview = await inv.call(TOOL, "overview", {}) if offers["overview"] else None
    # Alarms block every vhost's publishers; flow control elsewhere is not this alert's business.
    where = {"vhost": alert.vhost} if alert.vhost else {}
    connections = await inv.call(TOOL, "connections", where) if offers["connections"] else None
    if overview is not None:
        drafts += assess_alarms(overview, connections)
    if connections is not None:
        drafts.append(assess_held_publishers(connections, overview, scoped=alert.vhost is not None))

    seen: set[tuple[str, str]] = set()
    scoped = alert.vhost is not None
    if alert.queue is not None:
        vhost = alert.vhost or ""
        params = {"queue": alert.queue, **({"vhost": alert.vhost} if alert.vhost else {})}
        named = await inv.call(TOOL, "queue", params) if offers["queue"] else None
        view = read_queue_detail(named) if named is not None else None
        if named is not None and view is not None:
            if offers["queue_status"]:  # the management API's counts lag by its sampling interval (~5 s)
                named, view = exact_counts(named, view, await inv.call(TOOL, "queue_status", params))
            drafts += assess_queue_view(named, view, named=True)
            seen.add((view.vhost, view.name))
        elif offers["queue_status"]:  # no management answer: the passive declare still counts
            drafts += assess_queue(alert, await inv.call(TOOL, "queue_status", params))
            seen.add((vhost, alert.queue))

    if offers["queues"]:
        listing = await inv.call(TOOL, "queues", where)
        views = read_queues(listing)
        if views is not None:
            found = suspects(views, seen)
            if not found and not seen:
                where = f"vhost {_q(alert.vhost)}" if alert.vhost else "any vhost the agent sees"
                drafts += assess_no_backlog(listing, where)
            for q in found:
                if q.consumers == 0 or not offers["queue"]:  # prefetch only matters with consumers
                    drafts += assess_queue_view(listing, q, named=False, scoped=scoped)
                    continue
                detail = await inv.call(TOOL, "queue", {"queue": q.name, "vhost": q.vhost})
                view = read_queue_detail(detail)
                drafts += assess_queue_view(detail, view, named=False, scoped=scoped) if view is not None \
                    else assess_queue_view(listing, q, named=False, scoped=scoped)
    return drafts
