"""Fixtures of the integration tier beyond the session-wide services of ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redmine import RedmineServer, RedmineUnavailable, prepare


@pytest.fixture(scope="module")
def redmine() -> Iterator[RedmineServer]:
    """A real Redmine (Debian's package) for this module, from a copy of the golden image; the
    module's tests skip with the reason where it is not installed or cannot run."""
    try:
        golden = prepare()
    except RedmineUnavailable as exc:
        pytest.skip(f"Redmine is not available here: {exc.reason}")
    with RedmineServer(golden) as server:
        yield server
