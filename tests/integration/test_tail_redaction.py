"""`agentjobs tail` against real RabbitMQ: counters shown as published, secrets masked."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest

from dispatcher.cli.ops import tail
from dispatcher.plumbing.settings import load_settings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas.routing import RESULTS
from schemas import Cost, Evidence, Finding, Phase, encode

pytestmark = pytest.mark.integration
TOKEN = "hvs.CAESIJ2x7Ld9q3ZrPwq1FvKmN0tS"


@pytest.mark.parametrize("as_json", [True, False])
async def test_tail_shows_a_findings_token_counters_and_masks_its_secrets(amqp_vhost, as_json):
    # Given a finding whose cost has zero LLM tokens and whose text carries a token and a password
    settings = load_settings(None, {"AGENTJOBS_AMQP__URL": amqp_vhost.url("operator")})
    finding = Finding(investigation_id="inv-redaction", incident_key="k", idempotency_key="inv-redaction:finding",
                      summary=f"pool exhausted; agent token {TOKEN}", probable_cause="c", confidence=0.8,
                      phase=Phase.SHADOW, domain="database",
                      evidence=(Evidence(source="postgres", excerpt="postgresql://agent:pg-pw-7@db/shop"),),
                      cost=Cost(llm_prompt_tokens=0, llm_completion_tokens=0, tool_calls=2))
    connection = await aio_pika.connect(amqp_vhost.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, dispatcher_topology(settings.amqp))
        lines: list[str] = []
        bound = asyncio.Event()
        tailing = asyncio.create_task(tail(settings, "findings", follow=False, as_json=as_json, filters={},
                                           echo=lines.append, idle_seconds=3, status=lambda _: bound.set()))
        await asyncio.wait_for(bound.wait(), 10)
        # When it is published and tailed
        await (await channel.get_exchange(RESULTS)).publish(
            aio_pika.Message(encode(finding), headers={"x-vault-token": TOKEN}), "finding.warning.database")
        assert await tailing == 1
    # Then the operator sees the counters as they are and no secret
    (line,) = lines
    assert TOKEN not in line and "pg-pw-7" not in line
    if as_json:
        shown = json.loads(line)
        assert shown["cost"]["llm_prompt_tokens"] == 0
        assert shown["cost"]["llm_completion_tokens"] == 0
        assert shown["headers"]["x-vault-token"] == "***"
        assert shown["evidence"][0]["excerpt"] == "postgresql://agent:***@db/shop"
    else:
        assert "pool exhausted; agent token ***" in line
