"""Untrusted alert text always becomes a label value the API server accepts."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.k8snames import dns_slug, is_label_value, label_value

# The API server's own definition (k8s.io/apimachinery validation.IsValidLabelValue).
API_SERVER_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@pytest.mark.parametrize(
    ("raw", "expected_prefix"),
    [
        ("pg 0 primary", "pg-0-primary-"),
        ("Zürich", "Zurich-"),
        ("../../etc/passwd", "etc-passwd-"),
        ("数据库", ""),
        ("-leading-and-trailing-", "leading-and-trailing-"),
    ],
)
def test_invalid_values_are_sanitised_readably_with_a_distinguishing_hash(raw, expected_prefix) -> None:
    value = label_value(raw)
    assert is_label_value(value)
    assert value.startswith(expected_prefix)


def test_valid_values_pass_through_unchanged() -> None:
    assert label_value("checkout-7d9f.v2_1") == "checkout-7d9f.v2_1"
    assert label_value("") == ""


def test_different_invalid_values_stay_distinct() -> None:
    assert label_value("a b") != label_value("a/b")
    assert label_value("x" * 80) != label_value("x" * 81)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=400))
def test_any_text_becomes_a_valid_label_value(raw: str) -> None:
    value = label_value(raw)
    assert len(value) <= 63
    assert API_SERVER_LABEL_VALUE.match(value), value


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200), st.integers(min_value=0, max_value=63))
def test_dns_slug_is_a_dns_fragment_within_length(raw: str, room: int) -> None:
    slug = dns_slug(raw, room)
    assert len(slug) <= room
    assert re.fullmatch(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?)?", slug), slug
