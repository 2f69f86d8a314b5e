"""Scenarios, RabbitMQ on a private node of its own: a memory alarm that blocks publishers (never
induced on the shared broker).

Given the problem induced for real and the alert an SRE wrote for it, when the rules reasoner
investigates with the Job's real tools, then its top hypothesis names the cause and cites the fact
that decides it (see tests/scenarios/catalogue.py for each alert and what is expected).
"""

from __future__ import annotations

import pytest

from tests.scenarios.harness import Scenario, Sources
from tests.scenarios.suite import assert_diagnosed, cases, group_fixture

pytestmark = pytest.mark.integration

sources = group_fixture("private_rabbitmq")


@pytest.mark.parametrize("scenario", cases("private_rabbitmq"))
async def test_the_top_hypothesis_is_the_induced_cause_with_its_evidence(scenario: Scenario,
                                                                          sources: dict[str, Sources]) -> None:
    await assert_diagnosed(scenario, sources[scenario.name])
