"""One broker identity per component (issue 17): each Deployment reads only its own broker Secret.

The internet-facing bridge must not hold a credential that can promote a scope: bridge,
dispatcher and trust each get a Secret ``agentjobs-amqp-<component>`` whose URL carries that
component's broker user (``identities.<component>``), and that user is one of
``k8s/rabbitmq/definitions.json`` (with its permissions, without a password).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.manifests import render

COMPONENTS = {"agentjobs-bridge": "bridge", "agentjobs-dispatcher": "dispatcher", "agentjobs-trust": "trust",
              "agentjobs-tickets": "ticketing"}
BROKER_SECRET_PREFIX = "agentjobs-amqp"
DEFINITIONS = render.K8S / "rabbitmq" / "definitions.json"


def _secret_names(deployment: dict) -> set[str]:
    """Every Secret a Deployment's pods read: env, envFrom and volumes (projected too)."""
    pod = deployment["spec"]["template"]["spec"]
    names: set[str] = set()
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        for e in c.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                names.add(e["secretRef"]["name"])
    for v in pod.get("volumes", []):
        if "secret" in v:
            names.add(v["secret"]["secretName"])
        for source in (v.get("projected") or {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def _broker_secrets(deployment: dict) -> set[str]:
    return {n for n in _secret_names(deployment) if n.startswith(BROKER_SECRET_PREFIX)}


def _definitions() -> dict:
    return json.loads(DEFINITIONS.read_text())


@pytest.mark.parametrize("name", COMPONENTS)
def test_each_deployment_reads_the_broker_url_from_its_own_secret(overlay, name) -> None:
    env = {e["name"]: e for e in render.container(overlay, name)["env"]}
    ref = env["AGENTJOBS_AMQP__URL"]["valueFrom"]["secretKeyRef"]

    assert ref == {"name": f"agentjobs-amqp-{COMPONENTS[name]}", "key": "url"}
    assert "optional" not in ref  # a missing Secret stops the pod, never falls back to another user


@pytest.mark.parametrize("name", COMPONENTS)
def test_each_deployment_references_no_other_broker_secret(overlay, name) -> None:
    deployment = render.one(overlay, "Deployment", name)

    assert _broker_secrets(deployment) == {f"agentjobs-amqp-{COMPONENTS[name]}"}


def test_no_two_deployments_share_a_broker_secret(overlay) -> None:
    readers: dict[str, list[str]] = {}
    for deployment in render.find(overlay, "Deployment"):
        for secret in _broker_secrets(deployment):
            readers.setdefault(secret, []).append(deployment["metadata"]["name"])

    assert {s: len(r) for s, r in readers.items()} == {f"agentjobs-amqp-{c}": 1 for c in COMPONENTS.values()}
    assert BROKER_SECRET_PREFIX not in readers  # the old shared Secret is gone


def test_no_broker_credentials_are_shipped(overlay) -> None:
    # Secrets are created by the operator (k8s/base/kustomization.yaml says which), never rendered.
    shipped = {s["metadata"]["name"] for s in render.find(overlay, "Secret")}
    assert not {n for n in shipped if n.startswith(BROKER_SECRET_PREFIX)}
    for obj in overlay:
        assert not re.search(r"amqps?://[^/\s\"']+:[^@/\s\"']+@", json.dumps(obj)), obj["metadata"]["name"]


@pytest.mark.parametrize("name", COMPONENTS)
def test_the_user_of_each_secret_is_that_components_identity_in_definitions_json(overlay, name, tmp_path) -> None:
    component = COMPONENTS[name]
    settings = render.deployed_settings(overlay, tmp_path, deployment=name)
    user = getattr(settings.identities, component)
    defs = _definitions()

    assert user == f"agentjobs-{component}"  # the user the Secret's URL must carry (kustomization.yaml)
    (entry,) = [u for u in defs["users"] if u["name"] == user]
    assert entry["password_hash"] == ""  # no password committed: set from the Secret
    assert [p["user"] for p in defs["permissions"]].count(user) == 1


def test_definitions_json_users_carry_no_passwords() -> None:
    for user in _definitions()["users"]:
        assert "password" not in user
        assert user["password_hash"] == "", user["name"]


def test_base_kustomization_documents_each_broker_secret_with_its_user() -> None:
    text = (render.K8S / "base" / "kustomization.yaml").read_text()
    for component in COMPONENTS.values():
        line = next(line for line in text.splitlines() if f"agentjobs-system/agentjobs-amqp-{component} " in line)
        assert f"amqp://agentjobs-{component}:PASSWORD@" in line, line


def test_nothing_under_k8s_still_names_the_shared_broker_secret() -> None:
    shared = re.compile(r"\bagentjobs-amqp\b(?!-)")
    offenders = [str(p.relative_to(render.ROOT)) for p in render.K8S.rglob("*")
                 if p.is_file() and p.name != "definitions.json" and shared.search(p.read_text())]

    assert offenders == []
