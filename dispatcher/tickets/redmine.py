"""Redmine, through its REST API (``X-Redmine-API-Key``), as a ticketing backend.

One issue per investigation in one (private) project; the investigation id is kept in a string
custom field that is "used as a filter", so ``GET /issues.json?f[]=cf_<id>&op[cf_<id>]==&v[cf_<id>][]=<key>``
finds it again, closed or not — after a restart, a redelivery, or a create whose answer was lost. Every note ends with
``(agentjobs op <op_id>)``; before writing, the issue's journals *by the connector's own user*
are read, and a note already there is not written again. Custom-field, status, priority and
tracker names are resolved once (lazily: the connector starts and holds messages while Redmine
is down); resolving custom fields needs an administrator's key.

The root-cause and actions fields are filled from the finding only while empty, the priority
from its severity only while no operator changed it (an operator's value is never overwritten),
and "resolved" never reopens a ticket an operator already closed.
A verdict is read where an operator (any user but the connector's) closed the ticket, or changed
its cause or actions on a closed ticket — e.g. one closed on resolution (``resolved_status``
set to a closed status).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp

from schemas import Severity
from schemas.errors import PermanentError, TemporaryError
from schemas.logs import get_logger

from dispatcher.plumbing.settings import RedmineSettings
from dispatcher.tickets import render
from dispatcher.tickets.backend import Applied, Closed
from dispatcher.tickets.plan import Note, Plan
from dispatcher.trust.feedback_classify import TicketFields

log = get_logger("agentjobs.tickets.redmine")
REJECTED = "ticket_rejected"  # dead-letter reason: Redmine refused the ticket's content (422)
_PAGE = 100


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, kw_only=True)
class Meta:
    """Ids the connector needs, resolved by name once."""

    user_id: int
    project_id: int
    fields: Mapping[str, int]
    statuses: Mapping[str, int]
    closed: frozenset[int]
    priorities: Mapping[str, int]
    tracker_id: int | None


class RedmineBackend:
    name = "redmine"
    feedback = True

    def __init__(self, settings: RedmineSettings, *, api_key: str) -> None:
        if not settings.url:
            raise ValueError("tickets.redmine.url is not set")
        if not api_key:
            raise ValueError("no Redmine API key (tickets.secret_path key redmine_api_key, or tickets.redmine.api_key)")
        self.settings = settings
        self._base = settings.url.rstrip("/")
        self._key = api_key
        self._http: aiohttp.ClientSession | None = None
        self._meta: Meta | None = None
        self._meta_lock = asyncio.Lock()

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
            headers={"X-Redmine-API-Key": self._key, "Accept": "application/json"})

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    # -- HTTP ------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                    body: Any = None) -> Any:
        assert self._http is not None, "start() first"
        url = f"{self._base}{path}"
        try:
            async with self._http.request(method, url, params=params, json=body) as answer:
                text = await answer.text()
                status = answer.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TemporaryError(f"Redmine {method} {path}: {type(exc).__name__} {exc}".strip()) from exc
        if status in (200, 201):
            try:
                return _json(text)
            except ValueError as exc:
                raise TemporaryError(f"Redmine {method} {path}: HTTP {status} with a body that is not JSON") from exc
        if status == 204:
            return None
        detail = text[:300].strip()
        if status == 422:
            raise PermanentError(REJECTED, f"Redmine refused {method} {path}: {detail}")
        if status in (401, 403):
            raise TemporaryError(f"Redmine {method} {path}: HTTP {status} — is the API key right and may its user "
                                 f"write project {self.settings.project!r}?")
        raise TemporaryError(f"Redmine {method} {path}: HTTP {status} {detail}".strip())

    # -- names → ids -----------------------------------------------------------------------

    async def meta(self) -> Meta:
        async with self._meta_lock:
            if self._meta is None:
                self._meta = await self._resolve()
                log.info("redmine_resolved", project_id=self._meta.project_id, fields=self._meta.fields,
                         user_id=self._meta.user_id)
            return self._meta

    async def _resolve(self) -> Meta:
        s = self.settings
        me = (await self._call("GET", "/users/current.json"))["user"]
        project = (await self._call("GET", f"/projects/{s.project}.json"))["project"]
        fields = (await self._call("GET", "/custom_fields.json"))["custom_fields"]
        by_name = {f["name"]: f["id"] for f in fields if f.get("customized_type") == "issue"}
        wanted = {"key": s.key_field, "cause": s.cause_field, "actions": s.actions_field}
        missing = [name for name in wanted.values() if name not in by_name]
        if missing:
            raise TemporaryError(f"Redmine has no issue custom field(s) {', '.join(map(repr, missing))} "
                                 "(see README: connecting Redmine)")
        statuses = (await self._call("GET", "/issue_statuses.json"))["issue_statuses"]
        priorities = (await self._call("GET", "/enumerations/issue_priorities.json"))["issue_priorities"]
        tracker_id = None
        if s.tracker:
            trackers = (await self._call("GET", "/trackers.json"))["trackers"]
            tracker_id = next((t["id"] for t in trackers if t["name"] == s.tracker), None)
            if tracker_id is None:
                raise TemporaryError(f"Redmine has no tracker {s.tracker!r}")
        return Meta(user_id=me["id"], project_id=project["id"],
                    fields={k: by_name[v] for k, v in wanted.items()},
                    statuses={st["name"]: st["id"] for st in statuses},
                    closed=frozenset(st["id"] for st in statuses if st.get("is_closed")),
                    priorities={p["name"]: p["id"] for p in priorities}, tracker_id=tracker_id)

    # -- apply a plan ------------------------------------------------------------------------

    async def find(self, key: str) -> dict[str, Any] | None:
        m = await self.meta()
        cf = f"cf_{m.fields['key']}"
        # The literal filter form: ``cf_N=<value>`` would parse ``|``, ``!``, ``~`` in the value.
        found = await self._call("GET", "/issues.json", params=[
            ("project_id", str(m.project_id)), ("f[]", cf), (f"op[{cf}]", "="), (f"v[{cf}][]", key),
            ("limit", "5")])
        issues = found.get("issues", [])
        if any(_field(i, m.fields["key"]) != key for i in issues):
            # Redmine drops a filter it cannot apply and lists everything: never create blindly then.
            raise TemporaryError(f"Redmine ignored the filter on custom field {self.settings.key_field!r}: "
                                 "make it 'used as a filter' (see README: connecting Redmine)")
        return issues[0] if issues else None

    async def apply(self, plan: Plan) -> Applied:
        m = await self.meta()
        issue = await self.find(plan.opening.key)
        created = issue is None
        if issue is None:
            issue = await self._create(plan, m)
        if not plan.notes:
            return Applied(ticket=str(issue["id"]), created=created, written=0)
        full = await self._call("GET", f"/issues/{issue['id']}.json", params={"include": "journals"})
        full = full["issue"]
        done = {render.marker_of(j.get("notes") or "") for j in full.get("journals", [])
                if j.get("user", {}).get("id") == m.user_id}
        written = 0
        for note in plan.notes:
            if note.op_id in done:
                continue
            await self._write(full, note, m)
            written += 1
        return Applied(ticket=str(issue["id"]), created=created, written=written)

    async def _create(self, plan: Plan, m: Meta) -> dict[str, Any]:
        o = plan.opening
        body: dict[str, Any] = {"project_id": m.project_id, "subject": o.subject[:255], "description": o.description,
                                "custom_fields": [{"id": m.fields["key"], "value": o.key}]}
        priority = m.priorities.get(self.settings.priorities.get(o.severity.value, ""))
        if priority is not None:
            body["priority_id"] = priority
        if m.tracker_id is not None:
            body["tracker_id"] = m.tracker_id
        answer = await self._call("POST", "/issues.json", body={"issue": body})
        log.info("ticket_created", ticket=answer["issue"]["id"], key=o.key)
        return answer["issue"]

    async def _write(self, issue: dict[str, Any], note: Note, m: Meta) -> None:
        update: dict[str, Any] = {"notes": render.with_marker(note.text, note.op_id), "private_notes": note.private}
        fields = []
        if note.cause is not None and not (_field(issue, m.fields["cause"]) or "").strip():
            fields.append({"id": m.fields["cause"], "value": note.cause})
        if note.actions is not None and not (_field(issue, m.fields["actions"]) or "").strip():
            fields.append({"id": m.fields["actions"], "value": render.join_lines(note.actions)})
        if fields:
            update["custom_fields"] = fields
        priority = m.priorities.get(self.settings.priorities.get(note.severity.value, "")) if note.severity else None
        if priority is not None and not _changed_by_others(issue, "priority_id", m.user_id):
            update["priority_id"] = priority
        if note.resolve:
            status = m.statuses.get(self.settings.resolved_status)
            current = issue.get("status", {}).get("id")
            if status is not None and current not in m.closed:
                update["status_id"] = status
        await self._call("PUT", f"/issues/{issue['id']}.json", body={"issue": update})

    # -- reading operators' closings back ---------------------------------------------------

    async def closed_since(self, since: datetime) -> list[Closed]:
        m = await self.meta()
        out: list[Closed] = []
        offset = 0
        while True:
            page = await self._call("GET", "/issues.json", params={
                "project_id": m.project_id, "status_id": "closed", "updated_on": f">={_iso(since)}",
                "sort": "updated_on", "limit": _PAGE, "offset": offset})
            for issue in page.get("issues", []):
                if _field(issue, m.fields["key"]):
                    closed = await self._closed(issue["id"], m)
                    if closed is not None:
                        out.append(closed)
            offset += _PAGE
            if offset >= int(page.get("total_count", 0)):
                return out

    async def _closed(self, ticket: int, m: Meta) -> Closed | None:
        issue = (await self._call("GET", f"/issues/{ticket}.json", params={"include": "journals"}))["issue"]
        journals = issue.get("journals", [])
        judged = {str(m.fields["cause"]), str(m.fields["actions"])}

        def verdict_of_operator(j: Mapping[str, Any]) -> bool:
            """An operator closed it, or changed its cause or actions (e.g. after it closed on resolution)."""
            return j.get("user", {}).get("id") != m.user_id and any(
                (d.get("property") == "attr" and d.get("name") == "status_id" and _int(d.get("new_value")) in m.closed)
                or (d.get("property") == "cf" and str(d.get("name")) in judged)
                for d in j.get("details", []))

        closing = next((j for j in reversed(journals) if verdict_of_operator(j)), None)
        if closing is None:
            return None  # closed by the connector itself (or on creation), and no operator said anything
        ours = [j for j in journals if j.get("user", {}).get("id") == m.user_id]
        record = next((r for r in (render.parse_record(j.get("notes") or "") for j in reversed(ours)) if r), None)
        close_id = f"redmine-{ticket}-{closing['id']}"
        noted = any(render.marker_of(j.get("notes") or "") == f"verdict:{close_id}" for j in ours)
        priority = issue.get("priority", {}).get("name", "")
        severity = next((sev for sev, name in self.settings.priorities.items() if name == priority), None)
        return Closed(
            ticket=str(ticket), key=_field(issue, m.fields["key"]) or "", close_id=close_id,
            closed_at=_utc(closing["created_on"]), closed_by=closing.get("user", {}).get("name", ""),
            final=TicketFields(cause=_field(issue, m.fields["cause"]),
                               actions=render.lines_of(_field(issue, m.fields["actions"])),
                               severity=Severity(severity).value if severity else None),
            record=record, verdict_noted=noted)

    async def note_verdict(self, closed: Closed, text: str) -> None:
        body = {"issue": {"notes": render.with_marker(text, f"verdict:{closed.close_id}"), "private_notes": True}}
        await self._call("PUT", f"/issues/{closed.ticket}.json", body=body)


def _json(text: str) -> Any:
    return json.loads(text) if text.strip() else None


def _changed_by_others(issue: Mapping[str, Any], attribute: str, our_user: int) -> bool:
    """True if a journal by someone other than the connector changed ``attribute``."""
    return any(d.get("property") == "attr" and d.get("name") == attribute
               for j in issue.get("journals", []) if j.get("user", {}).get("id") != our_user
               for d in j.get("details", []))


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _field(issue: Mapping[str, Any], field_id: int) -> str | None:
    for f in issue.get("custom_fields", []):
        if f.get("id") == field_id:
            value = f.get("value")
            return value if isinstance(value, str) else None
    return None
