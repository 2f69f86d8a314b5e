"""Object basics against the emulator with the real client: create/get/list, errors, Status bodies."""

from __future__ import annotations

import kubernetes_validate
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import ApiException

from .helpers import job_body, status_of, strip_status

K8S_SCHEMA_VERSION = "1.33"


async def test_create_sets_uid_timestamp_and_increasing_resource_versions(k8s_emulator):
    batch = client.BatchV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    a = await batch.create_namespaced_job(ns, job_body("a"))
    b = await batch.create_namespaced_job(ns, job_body("b"))
    assert a.metadata.uid and a.metadata.uid != b.metadata.uid
    assert a.metadata.creation_timestamp is not None
    assert int(b.metadata.resource_version) > int(a.metadata.resource_version)
    listed = await batch.list_namespaced_job(ns)
    assert [j.metadata.name for j in listed.items] == ["a", "b"]
    assert int(listed.metadata.resource_version) >= int(b.metadata.resource_version)


async def test_duplicate_create_is_409_already_exists_with_real_status_body(k8s_emulator):
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(k8s_emulator.namespace, job_body("inv-1"))
    with pytest.raises(ApiException) as err:
        await batch.create_namespaced_job(k8s_emulator.namespace, job_body("inv-1"))
    assert err.value.status == 409
    assert status_of(err.value) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'jobs.batch "inv-1" already exists', "reason": "AlreadyExists",
        "details": {"name": "inv-1", "group": "batch", "kind": "jobs"}, "code": 409}


async def test_missing_object_is_404_not_found(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_secret("nope", k8s_emulator.namespace)
    body = status_of(err.value)
    assert (err.value.status, body["reason"], body["message"]) == (
        404, "NotFound", 'secrets "nope" not found')
    assert body["details"] == {"name": "nope", "kind": "secrets"}


async def test_create_in_missing_namespace_is_404(k8s_emulator):
    batch = client.BatchV1Api(k8s_emulator.api_client)
    with pytest.raises(ApiException) as err:
        await batch.create_namespaced_job("ghost", job_body("x"))
    assert status_of(err.value)["message"] == 'namespaces "ghost" not found'


@pytest.mark.parametrize("mutate, field, reason", [
    (lambda b: b["spec"]["template"]["spec"].update(containers=[]),
     "spec.template.spec.containers", "FieldValueRequired"),
    (lambda b: b["metadata"].update(name="Bad_Name"), "metadata.name", "FieldValueInvalid"),
    (lambda b: b["metadata"].update(name="x" * 64), "spec.template.labels", "FieldValueInvalid"),
    (lambda b: b["spec"]["template"]["spec"].pop("restartPolicy"),
     "spec.template.spec.restartPolicy", "FieldValueNotSupported"),
    (lambda b: b["spec"].update(backoffLimit=-1), "spec.backoffLimit", "FieldValueInvalid"),
])
async def test_invalid_job_is_422_and_not_stored(k8s_emulator, mutate, field, reason):
    batch = client.BatchV1Api(k8s_emulator.api_client)
    body = job_body("valid-name")
    mutate(body)
    with pytest.raises(ApiException) as err:
        await batch.create_namespaced_job(k8s_emulator.namespace, body)
    status = status_of(err.value)
    assert err.value.status == 422 and status["reason"] == "Invalid"
    assert status["message"].startswith(f'Job.batch "{body["metadata"]["name"]}" is invalid: ')
    assert {"field": field, "reason": reason} in [
        {"field": c["field"], "reason": c["reason"]} for c in status["details"]["causes"]]
    assert status["details"]["kind"] == "Job" and status["details"]["group"] == "batch"
    assert (await batch.list_namespaced_job(k8s_emulator.namespace)).items == []


async def test_returned_job_and_pod_validate_against_kubernetes_openapi(k8s_emulator):
    ns = k8s_emulator.namespace
    batch = client.BatchV1Api(k8s_emulator.api_client)
    core = client.CoreV1Api(k8s_emulator.api_client)
    body = job_body("validated", activeDeadlineSeconds=60, ttlSecondsAfterFinished=30,
                    pod={"serviceAccountName": "default", "volumes": [
                        {"name": "creds", "secret": {"secretName": "creds"}}]})
    body["spec"]["template"]["spec"]["containers"][0].update(
        resources={"limits": {"memory": "256Mi", "cpu": "500m"}},
        volumeMounts=[{"name": "creds", "mountPath": "/var/run/agentjobs"}],
        env=[{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}])
    created = await batch.create_namespaced_job(ns, body)
    pod = await k8s_emulator.cluster.wait_for_pod(ns, "validated", phase="Running")
    raw_job = k8s_emulator.api_client.sanitize_for_serialization(
        await batch.read_namespaced_job("validated", ns))
    raw_pod = k8s_emulator.api_client.sanitize_for_serialization(
        await core.read_namespaced_pod(pod["metadata"]["name"], ns))
    assert kubernetes_validate.validate(strip_status(raw_job), K8S_SCHEMA_VERSION, strict=True)
    assert kubernetes_validate.validate(strip_status(raw_pod), K8S_SCHEMA_VERSION, strict=True)
    # the defaults a real apiserver adds are there
    assert created.spec.backoff_limit == 6 and created.spec.completion_mode == "NonIndexed"
    assert created.spec.selector.match_labels == {
        "batch.kubernetes.io/controller-uid": created.metadata.uid}
    assert raw_pod["metadata"]["labels"]["job-name"] == "validated"
    owner = raw_pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("Job", created.metadata.uid, True)


async def test_list_items_validate_too(k8s_emulator):
    batch = client.BatchV1Api(k8s_emulator.api_client)
    await batch.create_namespaced_job(k8s_emulator.namespace, job_body("listed"))
    raw = await batch.list_namespaced_job(k8s_emulator.namespace, _preload_content=False)
    item = (await raw.json())["items"][0]
    item.update(apiVersion="batch/v1", kind="Job")  # list items omit these, as on a real server
    kubernetes_validate.validate(strip_status(item), K8S_SCHEMA_VERSION, strict=True)


async def test_generate_name_and_pagination(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    names = set()
    for _ in range(5):
        s = await core.create_namespaced_secret(ns, {"metadata": {"generateName": "tok-"},
                                                     "stringData": {"k": "v"}})
        names.add(s.metadata.name)
    assert len(names) == 5 and all(n.startswith("tok-") and len(n) == 9 for n in names)
    page1 = await core.list_namespaced_secret(ns, limit=3)
    assert len(page1.items) == 3 and page1.metadata._continue
    page2 = await core.list_namespaced_secret(ns, limit=3, _continue=page1.metadata._continue)
    assert len(page2.items) == 2 and not page2.metadata._continue
    assert {s.metadata.name for s in page1.items + page2.items} == names


async def test_secret_string_data_is_stored_as_base64_data(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    s = await core.create_namespaced_secret(k8s_emulator.namespace, {
        "metadata": {"name": "wrap"}, "stringData": {"token": "s.abc"}})
    assert s.data == {"token": "cy5hYmM="} and s.type == "Opaque"
    await core.delete_namespaced_secret("wrap", k8s_emulator.namespace)
    with pytest.raises(ApiException):
        await core.read_namespaced_secret("wrap", k8s_emulator.namespace)


async def test_replace_with_stale_resource_version_is_409_conflict(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    first = await core.create_namespaced_secret(ns, {"metadata": {"name": "s"},
                                                     "stringData": {"a": "1"}})
    first.data = {"a": "Mg=="}
    await core.replace_namespaced_secret("s", ns, first)
    first.data = {"a": "Mw=="}
    with pytest.raises(ApiException) as err:
        await core.replace_namespaced_secret("s", ns, first)  # stale resourceVersion
    assert status_of(err.value)["reason"] == "Conflict"


async def test_patch_variants_and_status_subresource(k8s_emulator):
    batch = client.BatchV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    await batch.create_namespaced_job(ns, job_body("p", pod={"activeDeadlineSeconds": 5}))
    # strategic merge (the client's default for dict bodies)
    job = await batch.patch_namespaced_job("p", ns, {"metadata": {"labels": {"a": "1"}}})
    assert job.metadata.labels["a"] == "1" and job.metadata.labels["job-name"] == "p"
    # merge patch removing a key
    job = await batch.patch_namespaced_job("p", ns, {"metadata": {"labels": {"a": None}}},
                                           _content_type="application/merge-patch+json")
    assert "a" not in job.metadata.labels
    # JSON patch
    job = await batch.patch_namespaced_job(
        "p", ns, [{"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}}])
    assert job.metadata.annotations == {"x": "y"}
    # status changes via the main resource are ignored; via /status they stick
    job = await batch.patch_namespaced_job("p", ns, {"spec": {"suspend": True},
                                                     "status": {"failed": 9}})
    assert job.spec.suspend is True and job.status.failed is None
    job = await batch.patch_namespaced_job_status("p", ns, {"status": {"failed": 9}})
    assert job.status.failed == 9
    # the pod template is immutable
    with pytest.raises(ApiException) as err:
        await batch.patch_namespaced_job("p", ns, {"spec": {"template": {"spec": {
            "activeDeadlineSeconds": 9}}}})
    assert err.value.status == 422 and "field is immutable" in status_of(err.value)["message"]


async def test_server_side_apply_creates_then_updates(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "applied"},
            "stringData": {"a": "1"}}
    s = await core.patch_namespaced_secret("applied", ns, body, field_manager="agentjobs",
                                           _content_type="application/apply-patch+yaml")
    assert s.data == {"a": "MQ=="}
    body["stringData"] = {"b": "2"}
    s = await core.patch_namespaced_secret("applied", ns, body, field_manager="agentjobs",
                                           _content_type="application/apply-patch+yaml")
    assert s.data == {"a": "MQ==", "b": "Mg=="}
    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_secret("applied", ns, body,
                                           _content_type="application/apply-patch+yaml")
    assert err.value.status == 422


async def test_events_namespaces_serviceaccounts(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    assert (await core.read_namespace(ns)).status.phase == "Active"
    assert (await core.read_namespaced_service_account("default", ns)).metadata.uid
    await core.create_namespaced_event(ns, {
        "metadata": {"name": "e1"}, "involvedObject": {"kind": "Job", "name": "j",
                                                       "namespace": ns},
        "reason": "Dispatched", "message": "dispatched by agentjobs", "type": "Normal"})
    events = await core.list_namespaced_event(ns, field_selector="reason=Dispatched")
    assert [e.message for e in events.items] == ["dispatched by agentjobs"]


async def test_discovery_version_and_kubeconfig(k8s_emulator):
    version = await client.VersionApi(k8s_emulator.api_client).get_code()
    assert version.major == "1" and version.minor == "33"
    groups = await client.ApisApi(k8s_emulator.api_client).get_api_versions()
    assert "batch" in [g.name for g in groups.groups]
    resources = await client.BatchV1Api(k8s_emulator.api_client).get_api_resources()
    assert "jobs" in [r.name for r in resources.resources]
    # code that loads kubeconfigs reaches the emulator too
    cfg = client.Configuration()
    await config.load_kube_config_from_dict(k8s_emulator.kubeconfig, client_configuration=cfg)
    async with client.ApiClient(cfg) as api:
        ns = await client.CoreV1Api(api).read_namespace(k8s_emulator.namespace)
    assert ns.metadata.name == k8s_emulator.namespace
