"""TokenReview (what OpenBao's kubernetes auth calls) and the TokenRequest API."""

from __future__ import annotations

import json

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiException

from tests.support.k8s import jwt


def review(token: str, audiences: list[str] | None = None) -> dict:
    spec: dict = {"token": token}
    if audiences is not None:
        spec["audiences"] = audiences
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}


async def test_tokenreview_accepts_a_minted_token_and_echoes_audiences(k8s_emulator):
    ns = k8s_emulator.namespace
    auth = client.AuthenticationV1Api(k8s_emulator.api_client)
    core = client.CoreV1Api(k8s_emulator.api_client)
    await core.create_namespaced_service_account(ns, {"metadata": {"name": "agent-shadow"}})
    sa = await core.read_namespaced_service_account("agent-shadow", ns)
    minted = await core.create_namespaced_service_account_token(
        "agent-shadow", ns, {"spec": {"audiences": ["vault"], "expirationSeconds": 600}})
    token = minted.status.token
    claims = json.loads(jwt.b64url_decode(token.split(".")[1]))
    assert json.loads(jwt.b64url_decode(token.split(".")[0]))["alg"] == "RS256"
    result = await auth.create_token_review(review(token, ["vault"]))
    assert result.status.authenticated is True
    assert result.status.user.username == f"system:serviceaccount:{ns}:agent-shadow"
    assert result.status.user.uid == sa.metadata.uid == claims["kubernetes.io"][
        "serviceaccount"]["uid"]
    assert result.status.audiences == ["vault"]
    assert f"system:serviceaccounts:{ns}" in result.status.user.groups


@pytest.mark.parametrize("case", ["garbage", "wrong-audience", "expired", "sa-deleted",
                                  "revoked"])
async def test_tokenreview_rejects(k8s_emulator, case):
    ns = k8s_emulator.namespace
    cluster = k8s_emulator.cluster
    token = cluster.mint_token(ns, "agent", audiences=["vault"], expiration_seconds=600)
    audiences = ["vault"]
    if case == "garbage":
        token = token[:-8] + "AAAAAAAA"
    elif case == "wrong-audience":
        audiences = ["https://kubernetes.default.svc.cluster.local"]
    elif case == "expired":
        k8s_emulator.clock.advance(601)
    elif case == "sa-deleted":
        await client.CoreV1Api(k8s_emulator.api_client).delete_namespaced_service_account(
            "agent", ns)
    elif case == "revoked":
        k8s_emulator.tokens.revoke(token)
    result = await client.AuthenticationV1Api(k8s_emulator.api_client).create_token_review(
        review(token, audiences))
    assert not result.status.authenticated
    assert result.status.error.startswith("[invalid bearer token, ")


async def test_registered_static_token_is_configurable(k8s_emulator):
    k8s_emulator.tokens.register("hand-made.jwt.value", "agentjobs", "agent-assist",
                                 uid="1234", audiences=["openbao"])
    result = await client.AuthenticationV1Api(k8s_emulator.api_client).create_token_review(
        review("hand-made.jwt.value", ["openbao"]))
    assert result.status.authenticated
    assert (result.status.user.username, result.status.user.uid) == (
        "system:serviceaccount:agentjobs:agent-assist", "1234")


async def test_token_request_rejects_short_expiry(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_service_account_token(
            "default", k8s_emulator.namespace, {"spec": {"expirationSeconds": 60}})
    assert err.value.status == 422


async def test_jwks_verifies_minted_tokens(k8s_emulator):
    session = k8s_emulator.api_client.rest_client.pool_manager
    async with session.get(f"{k8s_emulator.url}/openid/v1/jwks") as resp:
        jwk = (await resp.json())["keys"][0]
    token = k8s_emulator.cluster.mint_token(k8s_emulator.namespace, "default")
    head, body, sig = token.split(".")
    n = int.from_bytes(jwt.b64url_decode(jwk["n"]), "big")
    e = int.from_bytes(jwt.b64url_decode(jwk["e"]), "big")
    key = k8s_emulator.tokens.key
    assert (n, e) == (key.n, key.e) and key.verify(f"{head}.{body}".encode(),
                                                   jwt.b64url_decode(sig))
