"""The pytest side of the scenario suite: one module-scoped set-up per group, one test per scenario.

``group_fixture`` enters a group's world and induces all of its problems once (the waits overlap),
and ``cases`` turns the catalogue's scenarios into parameters — a scenario whose tool or sweep has
not landed yet is ``xfail(strict=True)``, so it turns the suite red the day it starts passing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from agent.reasoning.rules import RulesReasoner
from tests.scenarios.catalogue import WORLDS, of_group
from tests.scenarios.harness import Scenario, Sources, explain, induced, investigate, missing_evidence, top_cause


def cases(group: str) -> list[Any]:
    """The group's scenarios as pytest parameters (id: the scenario's name)."""
    return [pytest.param(s, id=s.name, marks=[pytest.mark.xfail(strict=True, reason=f"awaits {s.awaits}")]
                         if s.awaits else []) for s in of_group(group)]


def group_fixture(group: str) -> Any:
    """A module-scoped fixture: ``group``'s world entered and its problems induced, scenario name → Sources."""

    @pytest_asyncio.fixture(scope="module", loop_scope="session")
    async def sources() -> AsyncIterator[dict[str, Sources]]:
        async with WORLDS[group]() as world, induced(of_group(group), world) as found:
            yield found

    return sources


async def assert_diagnosed(scenario: Scenario, sources: Sources) -> None:
    """The evidence-driven rules reasoner's top hypothesis is the induced cause and cites the decisive fact."""
    assessment = await investigate(sources, scenario.incident(sources), RulesReasoner(selection="evidence"))

    assert top_cause(assessment) == scenario.expected, explain(assessment)
    missing = missing_evidence(scenario, sources, assessment)
    assert not missing, f"the top hypothesis does not cite {missing}:\n{explain(assessment)}"
