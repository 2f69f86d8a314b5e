"""The Redmine facts the ticketing connector relies on, against a real Redmine (Debian package).

One Redmine per module, from a copy of the golden image (``tests/support/redmine.py``); the
module skips with the reason when Redmine is not installed or cannot run here.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest

from tests.support.redmine import (
    KEY_FIELD,
    RedmineError,
    RedmineServer,
    custom_field,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reporter(redmine: RedmineServer) -> str:
    """A user with the Reporter role on the project (no view_private_notes, no closing); its API key."""
    user = redmine.request("POST", "/users.json", {"user": {
        "login": "reporter", "firstname": "Re", "lastname": "Porter", "mail": "reporter@example.invalid",
        "password": "reporter-password"}}, api_key=redmine.api_key)
    assert user[0] == 201, user
    uid = user[1]["user"]["id"]
    member = redmine.request("POST", f"/projects/{redmine.project}/memberships.json",
                             {"membership": {"user_id": uid, "role_ids": [redmine.meta["roles"]["Reporter"]]}},
                             api_key=redmine.api_key)
    assert member[0] == 201, member
    return redmine.request("GET", f"/users/{uid}.json", api_key=redmine.api_key)[1]["user"]["api_key"]


def new_key() -> str:
    return f"inc-{uuid.uuid4().hex[:12]}"


def cf_id(redmine: RedmineServer, name: str) -> int:
    return int(redmine.meta["custom_fields"][name])


def query(redmine: RedmineServer, **params: Any) -> list[dict[str, Any]]:
    status, body = redmine.request("GET", "/issues.json", params={"project_id": redmine.project, **params},
                                   api_key=redmine.api_key)
    assert status == 200, body
    return body["issues"]


def test_golden_image(redmine: RedmineServer) -> None:
    meta = redmine.meta
    assert set(meta["custom_fields"]) == {KEY_FIELD, "Root cause", "Actions taken"}
    assert meta["statuses"]["Closed"] in meta["statuses"].values()
    assert set(meta["closed_statuses"]) == {"Closed", "Rejected"}
    assert {"Low", "Normal", "High", "Urgent", "Immediate"} <= set(meta["priorities"])
    assert meta["admin_api_key"] == redmine.api_key and meta["operator_api_key"] == redmine.operator_api_key
    status, body = redmine.request("GET", f"/projects/{redmine.project}.json",
                                   params={"include": "trackers,enabled_modules"}, api_key=redmine.api_key)
    assert status == 200
    project = body["project"]
    assert project["is_public"] is False and project["id"] == meta["project_id"]
    assert {t["name"] for t in project["trackers"]} == set(meta["trackers"])
    assert [m["name"] for m in project["enabled_modules"]] == ["issue_tracking"]
    status, body = redmine.request("GET", "/custom_fields.json", api_key=redmine.api_key)
    key_field = next(cf for cf in body["custom_fields"] if cf["name"] == KEY_FIELD)
    assert key_field["field_format"] == "string" and key_field["is_filter"] and key_field["searchable"]
    assert key_field["visible"] and not key_field["is_required"]  # (is_for_all is not in the JSON)
    assert {t["name"] for t in key_field["trackers"]} == set(meta["trackers"])


def test_create_then_find_by_key_closed_ones_included(redmine: RedmineServer) -> None:
    key, field = new_key(), cf_id(redmine, KEY_FIELD)
    status, body = redmine.request("POST", "/issues.json", {"issue": {
        "project_id": redmine.project, "subject": "disk full on db-1", "description": "from the agent",
        "priority_id": redmine.meta["priorities"]["High"],
        "custom_fields": [{"id": field, "value": key}]}}, api_key=redmine.api_key)
    assert status == 201, body
    issue = body["issue"]
    assert custom_field(issue, KEY_FIELD) == key
    assert issue["status"] == {"id": redmine.meta["statuses"]["New"], "name": "New", "is_closed": False}
    assert issue["closed_on"] is None

    found = query(redmine, status_id="*", **{f"cf_{field}": key})
    assert [i["id"] for i in found] == [issue["id"]]

    redmine.update_issue(issue["id"], status="Closed", api_key=redmine.api_key)
    closed = redmine.get_issue(issue["id"], include_journals=False)
    assert closed["status"]["is_closed"] is True and closed["closed_on"]
    assert query(redmine, **{f"cf_{field}": key}) == []  # the default is open issues only
    assert [i["id"] for i in query(redmine, status_id="*", **{f"cf_{field}": key})] == [issue["id"]]
    assert [i["id"] for i in redmine.find_issues(key)] == [issue["id"]]

    redmine.update_issue(issue["id"], status="New", api_key=redmine.api_key)  # reopened: closed_on stays
    assert redmine.get_issue(issue["id"], include_journals=False)["closed_on"] == closed["closed_on"]


def test_notes_private_notes_and_custom_field_details(redmine: RedmineServer, reporter: str) -> None:
    issue = redmine.create_issue("replica lag", key=new_key(), api_key=redmine.api_key)
    redmine.update_issue(issue["id"], notes="public: looking at it", api_key=redmine.api_key)
    redmine.update_issue(issue["id"], notes="private: the raw evidence", private_notes=True,
                         api_key=redmine.api_key)
    redmine.update_issue(issue["id"], custom_fields={"Root cause": "log rotation stopped"},
                         api_key=redmine.api_key)

    journals = redmine.get_issue(issue["id"], api_key=redmine.api_key)["journals"]
    assert [(j["notes"], j["private_notes"]) for j in journals] == [
        ("public: looking at it", False), ("private: the raw evidence", True), ("", False)]
    assert all(j["user"]["id"] == redmine.meta["admin_id"] for j in journals)
    assert journals[2]["details"] == [{"property": "cf", "name": str(cf_id(redmine, "Root cause")),
                                       "old_value": None, "new_value": "log rotation stopped"}]
    # the operator (Manager) sees the private note; a Reporter gets the journal left out
    assert len(redmine.get_issue(issue["id"])["journals"]) == 3
    assert [j["notes"] for j in redmine.get_issue(issue["id"], api_key=reporter)["journals"]] == [
        "public: looking at it", ""]


def test_operator_closes_and_the_journal_says_who(redmine: RedmineServer, reporter: str) -> None:
    key = new_key()
    issue = redmine.create_issue("queue backlog", key=key, api_key=redmine.api_key)
    with pytest.raises(RedmineError, match="ignored"):  # 204, but the Reporter's workflow drops it
        redmine.update_issue(issue["id"], status="Closed", api_key=reporter)
    status, _ = redmine.request("PUT", f"/issues/{issue['id']}.json",
                                {"issue": {"status_id": 999}}, api_key=redmine.api_key)
    assert status == 204  # an unknown status is silently ignored as well
    assert redmine.get_issue(issue["id"], include_journals=False)["status"]["name"] == "New"

    redmine.update_issue(issue["id"], status="Closed", notes="fixed by hand",
                         custom_fields={"Actions taken": "restarted the consumer"})
    done = redmine.get_issue(issue["id"])
    assert done["status"]["name"] == "Closed" and done["closed_on"]
    last = done["journals"][-1]
    assert last["user"] == {"id": redmine.meta["operator_id"], "name": "On-call Operator"}
    assert last["notes"] == "fixed by hand"
    details = {(d["property"], d["name"]): (d["old_value"], d["new_value"]) for d in last["details"]}
    assert details == {
        ("attr", "status_id"): (str(redmine.meta["statuses"]["New"]), str(redmine.meta["statuses"]["Closed"])),
        ("cf", str(cf_id(redmine, "Actions taken"))): (None, "restarted the consumer"),
    }
    assert [i["id"] for i in redmine.find_issues(key)] == [issue["id"]]


def test_key_filter_edge_cases(redmine: RedmineServer) -> None:
    """What a connector must not trust: Redmine ignores filters it cannot apply and parses values."""
    a = redmine.create_issue("a", key=new_key(), api_key=redmine.api_key)
    b = redmine.create_issue("b", key=new_key(), api_key=redmine.api_key)
    key_a, key_b = custom_field(a, KEY_FIELD), custom_field(b, KEY_FIELD)
    field = cf_id(redmine, KEY_FIELD)
    assert query(redmine, status_id="*", **{f"cf_{field}": key_a.upper()}) == []  # exact, case-sensitive
    ored = query(redmine, status_id="*", **{f"cf_{field}": f"{key_a}|{key_b}"})
    assert {i["id"] for i in ored} == {a["id"], b["id"]}  # "|" separates alternatives
    everything = query(redmine, status_id="*", limit=100)
    unfilterable = query(redmine, status_id="*", limit=100, **{f"cf_{cf_id(redmine, 'Root cause')}": key_a})
    assert len(unfilterable) == len(everything) >= 2  # not is_filter: the filter is silently ignored
    assert {custom_field(i, KEY_FIELD) for i in query(redmine, **{f"cf_{field}": "~inc-"})} >= {
        key_a, key_b}  # a leading "~" means "contains"
    # the literal form: the value as is, and no status filter unless one is given (closed included)
    redmine.update_issue(a["id"], status="Closed", api_key=redmine.api_key)
    literal = query(redmine, **{"f[]": f"cf_{field}", f"op[cf_{field}]": "=", f"v[cf_{field}][]": key_a})
    assert [i["id"] for i in literal] == [a["id"]]
    odd = redmine.create_issue("odd key", key=f"!{key_a}|x", api_key=redmine.api_key)
    assert [i["id"] for i in redmine.find_issues(f"!{key_a}|x")] == [odd["id"]]


def test_wrong_or_missing_api_key_gets_no_data(redmine: RedmineServer) -> None:
    issue = redmine.create_issue("secret", key=new_key(), api_key=redmine.api_key)
    field = cf_id(redmine, KEY_FIELD)
    for key in ("0" * 40, ""):
        for path, params in ((f"/issues/{issue['id']}.json", None),
                             ("/issues.json", {"project_id": redmine.project, "status_id": "*",
                                               f"cf_{field}": custom_field(issue, KEY_FIELD)}),
                             (f"/projects/{redmine.project}.json", None)):
            status, body = redmine.request("GET", path, params=params, api_key=key)
            assert status in (401, 403, 404) and not body, (key, path, status, body)
    status, _ = redmine.request("PUT", f"/issues/{issue['id']}.json", {"issue": {"notes": "x"}}, api_key="0" * 40)
    assert status == 401


def test_stop_then_start_keeps_data_and_port(redmine: RedmineServer) -> None:
    key = new_key()
    issue = redmine.create_issue("survives an outage", key=key, api_key=redmine.api_key)
    url = redmine.url
    redmine.stop()
    assert not redmine.running
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", redmine.port), timeout=2):
        pass
    redmine.start()
    assert redmine.url == url
    assert [i["id"] for i in redmine.find_issues(key)] == [issue["id"]]
