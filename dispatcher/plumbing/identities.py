"""One broker identity per component, least privilege: who may configure, write and read what.

``grants`` decides (pure) each identity's vhost permissions and topic permissions; the same
grants go into ``k8s/rabbitmq/definitions.json`` (``definitions``) and onto the local broker
when ``agentjobs up`` starts (``apply`` through the management API). The broker's permissions
are the first layer; the consumers' sender checks (``dispatcher/intake/senders.py``) the second
— a permission too wide here never lets a message be *applied* that its sender may not send.

Regexes name our exchanges and queues exactly. Exchanges and queues share names
(``agentjobs.feedback`` is both), so vhost permissions cannot tell "publish to the feedback
exchange" from "bind the feedback queue"; topic permissions (per exchange, on routing keys) do
that part: only operators write ``feedback.*``, only admins ``pin.*``, nobody but trust
``phase.*``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from schemas.routing import CONTROL, FEEDBACK, INCIDENTS, PHASES, RESULTS

from dispatcher.plumbing.settings import IdentitySettings

NOTHING = "^$"  # no resource is named "" (the default exchange is "amq.default")
NEVER = "(?!)"  # a topic regex no routing key matches
# Private queues: broker-named (amq.gen-…) and aio-pika's robust ones (amq_<uuid hex>), which keep
# their name across reconnects.
PRIVATE = r"(?:amq\.gen-.*|amq_[0-9a-f]{32})"
ALL_OURS = r"^(agentjobs\..*|" + PRIVATE + ")$"
COMPONENTS = ("bridge", "dispatcher", "trust", "operator", "admin", "ticketing")
TICKETS_QUEUE = "agentjobs.tickets"  # declared by `agentjobs tickets` only (no connector: no queue filling up)
CREDENTIALS_FILE = "broker-identities.json"  # under runtime.state_dir, 0600


def _names(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


@dataclass(frozen=True, kw_only=True)
class TopicGrant:
    exchange: str
    write: str
    read: str = ".*"


@dataclass(frozen=True, kw_only=True)
class Grant:
    """One identity's rights on one vhost."""

    component: str
    user: str
    configure: str
    write: str
    read: str
    topics: tuple[TopicGrant, ...] = ()


def grants(ids: IdentitySettings) -> tuple[Grant, ...]:
    """Every component identity's permissions (pure). Operators/admins: the first of each list."""
    # Dispatcher and trust own the topology (each declares all of it, so start order is free);
    # they may not speak for operators or each other.
    no_verdicts = (TopicGrant(exchange=FEEDBACK, write=NEVER), TopicGrant(exchange=PHASES, write=NEVER))
    private = PRIVATE
    ops_read = "^(" + "|".join(re.escape(n) for n in (RESULTS, PHASES, FEEDBACK, "agentjobs.dead", "agentjobs.feedback-log",
                                                       "agentjobs.phase-log", "agentjobs.trust-snapshots",
                                                       "agentjobs.incidents", "agentjobs.control", "agentjobs.action-log"))
    ops_read += "|" + private + ")$"
    human_write = "^(" + "|".join(re.escape(n) for n in (INCIDENTS, FEEDBACK, CONTROL)) + "|" + private + ")$"
    out = [
        Grant(component="bridge", user=ids.bridge, configure=NOTHING, write=_names(INCIDENTS), read=NOTHING,
              topics=(TopicGrant(exchange=INCIDENTS, write=r"^alertmanager\..+", read=NEVER),)),
        Grant(component="dispatcher", user=ids.dispatcher, configure=ALL_OURS,
              write=r"^(agentjobs\..*|" + PRIVATE + r"|amq\.default)$", read=ALL_OURS, topics=no_verdicts),
        Grant(component="trust", user=ids.trust, configure=ALL_OURS,
              write=r"^(agentjobs\..*|" + PRIVATE + r"|amq\.default)$", read=ALL_OURS,
              topics=(TopicGrant(exchange=FEEDBACK, write=NEVER), TopicGrant(exchange=INCIDENTS, write=NEVER),
                      TopicGrant(exchange=CONTROL, write=NEVER), TopicGrant(exchange=RESULTS, write=NEVER))),
    ]
    # The ticketing connector: its own queue on the results exchange, dead letters, and operators'
    # verdicts read off closed tickets (feedback.*) — nothing else.
    out.append(Grant(component="ticketing", user=ids.ticketing,
                     configure="^(" + re.escape(TICKETS_QUEUE) + "|" + private + ")$",
                     write="^(" + "|".join(re.escape(n) for n in (TICKETS_QUEUE, FEEDBACK, "agentjobs.dead"))
                           + "|" + private + ")$",
                     read="^(" + "|".join(re.escape(n) for n in (TICKETS_QUEUE, RESULTS)) + "|" + private + ")$",
                     topics=(TopicGrant(exchange=FEEDBACK, write=r"^feedback\..+"),
                             TopicGrant(exchange=PHASES, write=NEVER))))
    if ids.operators:
        out.append(Grant(component="operator", user=ids.operators[0], configure="^" + private + "$",
                         write=human_write, read=ops_read,
                         topics=(TopicGrant(exchange=FEEDBACK, write=r"^feedback\..+"),
                                 TopicGrant(exchange=PHASES, write=NEVER))))
    if ids.admins:
        out.append(Grant(component="admin", user=ids.admins[0], configure="^" + private + "$",
                         write=human_write, read=ops_read,
                         topics=(TopicGrant(exchange=FEEDBACK, write=r"^(feedback|pin)\..+"),
                                 TopicGrant(exchange=PHASES, write=NEVER))))
    return tuple(out)


def definitions(ids: IdentitySettings, vhost: str = "/") -> dict[str, Any]:
    """``users``, ``permissions`` and ``topic_permissions`` in RabbitMQ's definitions format.

    Users carry no password (``password_hash`` empty: set it when deploying, e.g. with
    ``rabbitmqctl change_password`` from the Secret of that component).
    """
    gs = grants(ids)
    return {
        "users": [{"name": g.user, "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256",
                   "tags": []} for g in gs],
        "permissions": [{"user": g.user, "vhost": vhost, "configure": g.configure, "write": g.write,
                         "read": g.read} for g in gs],
        "topic_permissions": [{"user": g.user, "vhost": vhost, "exchange": t.exchange, "write": t.write,
                               "read": t.read} for g in gs for t in g.topics],
    }


def url_as(url: str, user: str, password: str) -> str:
    """``url`` with its credentials replaced (pure)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def vhost_of(url: str) -> str:
    path = urlsplit(url).path
    return "/" if path in ("", "/") else path[1:].replace("%2F", "/").replace("%2f", "/")


# --------------------------------------------------------------------------- #
# stored credentials (the state dir of `agentjobs up`)
# --------------------------------------------------------------------------- #


def credentials_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / CREDENTIALS_FILE


def load_credentials(state_dir: str | Path) -> dict[str, dict[str, str]]:
    """``{component: {"user", "password", "url"}}`` stored by ``up``; empty when there are none."""
    path = credentials_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and {"user", "password", "url"} <= v.keys()}


def store_credentials(state_dir: str | Path, creds: Mapping[str, Mapping[str, str]]) -> Path:
    """Write the credentials 0600 (created so: never world-readable, not even for a moment)."""
    path = credentials_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with open(fd, "w") as out:
        json.dump({k: dict(v) for k, v in creds.items()}, out, indent=2, sort_keys=True)
    tmp.replace(path)
    return path


def same_broker(a: str, b: str) -> bool:
    """True if two AMQP URLs name the same host, port and vhost (credentials aside; pure)."""
    pa, pb = urlsplit(a), urlsplit(b)
    return ((pa.hostname, pa.port or 5672, vhost_of(a)) == (pb.hostname, pb.port or 5672, vhost_of(b)))


def url_for_component(settings_amqp_url: str, state_dir: str | Path, component: str) -> str:
    """The URL ``component`` connects with: the one ``agentjobs up`` stored for this broker and vhost
    in ``state_dir``, else ``settings_amqp_url`` (a deployment gives each component its own)."""
    stored = load_credentials(state_dir).get(component) or {}
    url = stored.get("url", "")
    return url if url and same_broker(url, settings_amqp_url) else settings_amqp_url


def new_password() -> str:
    return secrets.token_urlsafe(24)


# --------------------------------------------------------------------------- #
# the management API (I/O)
# --------------------------------------------------------------------------- #


async def apply(http: Any, base: str, auth: Any, vhost: str, grant: Grant, password: str) -> None:
    """Create/update ``grant.user`` with ``password`` and set its permissions on ``vhost``.

    ``http`` is an aiohttp ``ClientSession``; idempotent (PUTs only). Existing topic permissions
    of the user on this vhost are replaced.
    """
    user, v = quote(grant.user, safe=""), quote(vhost, safe="")

    async def call(method: str, path: str, body: Any = None) -> None:
        async with http.request(method, f"{base}{path}", json=body, auth=auth) as answer:
            if answer.status not in (200, 201, 204) and not (method == "DELETE" and answer.status == 404):
                text = (await answer.text())[:200]
                raise RuntimeError(f"{method} {path}: HTTP {answer.status} {text}")

    await call("PUT", f"/api/users/{user}", {"password": password, "tags": ""})
    await call("PUT", f"/api/permissions/{v}/{user}",
               {"configure": grant.configure, "write": grant.write, "read": grant.read})
    await call("DELETE", f"/api/topic-permissions/{v}/{user}")
    for topic in grant.topics:
        await call("PUT", f"/api/topic-permissions/{v}/{user}",
                   {"exchange": topic.exchange, "write": topic.write, "read": topic.read})


async def ensure_identities(settings_amqp_url: str, base: str, auth: Any, ids: IdentitySettings,
                            known: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Every component identity on the broker of ``settings_amqp_url``'s vhost; returns their credentials.

    Passwords in ``known`` (stored by an earlier run) are kept; new identities get fresh ones.
    """
    import aiohttp

    vhost = vhost_of(settings_amqp_url)
    out: dict[str, dict[str, str]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        for grant in grants(ids):
            old = known.get(grant.component) or {}
            password = old.get("password") if old.get("user") == grant.user else None
            password = password or new_password()
            await apply(http, base, auth, vhost, grant, password)
            out[grant.component] = {"user": grant.user, "password": password,
                                    "url": url_as(settings_amqp_url, grant.user, password)}
    return out
