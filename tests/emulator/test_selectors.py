"""Label and field selectors: the parser on its own and through list calls."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiException

from tests.support.k8s.selectors import (SelectorError, parse_field_selector,
                                         parse_label_selector)

from .helpers import status_of

LABELS = {"app": "agent", "tier": "assist", "team": "sre"}


@pytest.mark.parametrize("selector, matches", [
    ("app=agent", True), ("app==agent", True), ("app!=agent", False), ("app=other", False),
    ("tier in (assist,shadow)", True), ("tier notin (assist)", False),
    ("team", True), ("!team", False), ("!missing", True), ("missing", False),
    ("app=agent,tier in (shadow)", False), ("app=agent, team notin (dba)", True),
    ("missing!=x", True), ("missing notin (x)", True), ("", True),
])
def test_label_selector_semantics(selector, matches):
    assert parse_label_selector(selector).matches(LABELS) is matches


@pytest.mark.parametrize("bad", ["app in ()", "a b", "app=(x", "=x", "tier in (a,b", ",x"])
def test_label_selector_parse_errors(bad):
    with pytest.raises(SelectorError):
        parse_label_selector(bad)


_value = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)


@given(labels=st.dictionaries(_value, _value, max_size=4), key=_value, value=_value)
def test_equality_and_inequality_are_complements(labels, key, value):
    eq = parse_label_selector(f"{key}={value}").matches(labels)
    ne = parse_label_selector(f"{key}!={value}").matches(labels)
    assert eq != ne
    assert parse_label_selector(f"{key} in ({value})").matches(labels) == eq


def test_field_selector_rejects_unknown_fields():
    assert parse_field_selector("metadata.name=a", "jobs").matches({"metadata": {"name": "a"}})
    with pytest.raises(SelectorError, match="field label not supported: spec.parallelism"):
        parse_field_selector("spec.parallelism=1", "jobs")


async def test_list_with_label_and_field_selectors(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    for name, labels in [("a", {"phase": "shadow"}), ("b", {"phase": "assist"}),
                         ("c", {"phase": "assist", "pinned": "yes"})]:
        await core.create_namespaced_secret(ns, {"metadata": {"name": name, "labels": labels}})

    async def names(**kw):
        return [s.metadata.name for s in (await core.list_namespaced_secret(ns, **kw)).items]
    assert await names(label_selector="phase=assist") == ["b", "c"]
    assert await names(label_selector="phase in (shadow,assist),!pinned") == ["a", "b"]
    assert await names(label_selector="pinned") == ["c"]
    assert await names(field_selector="metadata.name=b") == ["b"]
    assert await names(field_selector="metadata.name!=b", label_selector="phase=assist") == ["c"]
    with pytest.raises(ApiException) as err:
        await core.list_namespaced_secret(ns, label_selector="phase in ()")
    assert err.value.status == 400 and status_of(err.value)["reason"] == "BadRequest"
