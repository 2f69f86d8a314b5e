"""KubernetesRuntime against the API emulator: the real kubernetes_asyncio client over HTTP."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.jobs import jobspec, k8s_raw
from dispatcher.jobs.runtime import JobState, LaunchOutcome
from dispatcher.jobs.kubernetes import KubernetesRuntime
from schemas import FailureReason, identify
from schemas.errors import PermanentError, TemporaryError
from tests.integration.k8s_helpers import EventLog, incident, manifest, prepare_cluster, settings_for
from tests.support.k8s.podfiles import PodFiles
from tests.support.k8s.resources import JOBS, SECRETS

pytestmark = pytest.mark.integration


@pytest.fixture
def runtime(k8s_emulator):
    prepare_cluster(k8s_emulator)
    return KubernetesRuntime(k8s_emulator.api_client, namespace=k8s_emulator.namespace, request_timeout=5,
                             watch_timeout=30, replica="replica-a", claim_timeout=2)


@pytest.fixture
def s(k8s_emulator):
    return settings_for(k8s_emulator.namespace)


def _pod_name(handle, job_name: str) -> str:
    return handle.cluster.pods_of_job(handle.namespace, job_name)[0]["metadata"]["name"]


async def test_launch_creates_one_job_with_an_owned_secret_and_a_second_launch_finds_it(k8s_emulator, runtime, s):
    event = incident(1)
    job = manifest(event, s)

    files = {"incident.json": b"{}", "wrapped-token": b"s.wrapping"}
    first = await runtime.launch(job, secret=files)
    second = await runtime.launch(job, secret=files)

    assert (first, second) == (LaunchOutcome.CREATED, LaunchOutcome.ALREADY_EXISTS)
    jobs = k8s_emulator.cluster.store.list(JOBS, k8s_emulator.namespace)
    assert [j["metadata"]["name"] for j in jobs] == [identify(event).job_name]
    secret = k8s_emulator.cluster.store.get(SECRETS, k8s_emulator.namespace, jobspec.secret_name(job["metadata"]["name"]))
    assert secret["metadata"]["ownerReferences"][0]["uid"] == jobs[0]["metadata"]["uid"]
    assert jobspec.FINALIZER in jobs[0]["metadata"]["finalizers"]


async def test_an_input_with_nothing_secret_rides_in_the_job_and_reaches_the_pod_as_the_same_file(
        k8s_emulator, runtime, s, tmp_path):
    event = incident(11)
    job = manifest(event, s)
    body = b'{"kind": "incident", "alerts": ["<untouched>"]}'

    assert await runtime.launch(job, secret={"incident.json": body}) is LaunchOutcome.CREATED

    name = job["metadata"]["name"]
    assert k8s_emulator.cluster.store.get(SECRETS, k8s_emulator.namespace, jobspec.secret_name(name)) is None
    pod = await k8s_emulator.cluster.wait_for_pod(k8s_emulator.namespace, name)
    files = PodFiles(k8s_emulator.cluster, pod, tmp_path)
    files.materialise(pod["spec"]["containers"][0])
    assert (files.mount_path(jobspec.INPUT_DIR) / "incident.json").read_bytes() == body


async def test_a_job_that_reads_its_input_from_the_secret_gets_it_even_when_the_input_could_ride_inline(
        k8s_emulator, runtime, s):
    job = manifest(incident(12), s)
    name = job["metadata"]["name"]
    # created by a dispatcher that kept every input in a Secret, and died before creating it
    await runtime._post("create job", runtime._jobs_path, k8s_raw.encode(job))
    assert await runtime.launch(job, secret={"incident.json": b"{}"}) is LaunchOutcome.ALREADY_EXISTS
    secret = k8s_emulator.cluster.store.get(SECRETS, k8s_emulator.namespace, jobspec.secret_name(name))
    assert secret is not None and secret["data"] == {"incident.json": "e30="}


async def test_once_listed_a_job_nobody_created_is_known_absent_without_asking_and_one_created_is_found(
        k8s_emulator, runtime, s):
    ours, theirs = manifest(incident(13), s), manifest(incident(14), s)
    async with EventLog(runtime).running():
        await _until(lambda: runtime._names is not None)
        reads_before = _job_reads(k8s_emulator)
        # a new investigation asks whether its Job exists: answered from the watched namespace
        assert await runtime.status(ours["metadata"]["name"]) is None
        assert _job_reads(k8s_emulator) == reads_before
        # a Job another replica created is found once the watch saw it, and a create meets it either way
        await runtime._post("create job", runtime._jobs_path, k8s_raw.encode(theirs))
        assert await runtime.launch(theirs, secret={"incident.json": b"{}"}) is LaunchOutcome.ALREADY_EXISTS
        await _until(lambda: theirs["metadata"]["name"] in runtime._names)
        assert (await runtime.status(theirs["metadata"]["name"])) is not None
    assert len(k8s_emulator.cluster.store.list(JOBS, k8s_emulator.namespace)) == 1


def _job_reads(handle) -> int:
    return sum(1 for r in handle.cluster.requests if r.method == "GET" and "/jobs/" in r.path)


async def _until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_success_is_reported_once_and_acknowledging_releases_the_job(k8s_emulator, runtime, s):
    job = manifest(incident(2), s)
    name = job["metadata"]["name"]
    async with EventLog(runtime).running() as log:
        await runtime.launch(job)
        pod = await k8s_emulator.cluster.wait_for_pod(k8s_emulator.namespace, name)
        k8s_emulator.kubelet.start(k8s_emulator.namespace, pod["metadata"]["name"])
        await log.wait_for(lambda ev: any(e.state is JobState.RUNNING for e in ev))
        k8s_emulator.kubelet.finish(k8s_emulator.namespace, pod["metadata"]["name"], 0)
        await log.wait_for(lambda ev: log.terminal(name))
        await k8s_emulator.cluster.wait_for(
            JOBS, k8s_emulator.namespace,
            lambda jobs: any(j["metadata"]["name"] == name and jobspec.FINALIZER not in (j["metadata"].get("finalizers") or []) for j in jobs),
        )
        k8s_emulator.cluster.compact()  # force a re-list: a reported Job must not be reported again
        k8s_emulator.cluster.bookmark()
    (terminal,) = log.terminal(name)
    assert terminal.state is JobState.SUCCEEDED
    assert terminal.investigation_id == job["metadata"]["labels"][jobspec.LABEL_INVESTIGATION]
    stored = k8s_emulator.cluster.job(k8s_emulator.namespace, name)
    assert stored["metadata"]["annotations"][jobspec.ANN_REPORTED] == "succeeded"


@pytest.mark.parametrize(
    ("ending", "state", "reason"),
    [
        ("oom", JobState.FAILED, FailureReason.OOM_KILLED),
        ("exit3", JobState.FAILED, FailureReason.BACKOFF_LIMIT_EXCEEDED),
        ("deadline", JobState.FAILED, FailureReason.DEADLINE_EXCEEDED),
    ],
)
async def test_failures_are_classified(k8s_emulator, runtime, s, ending, state, reason):
    job = manifest(incident(3), s)
    name = job["metadata"]["name"]
    ns = k8s_emulator.namespace
    async with EventLog(runtime).running() as log:
        await runtime.launch(job)
        pod = await k8s_emulator.cluster.wait_for_pod(ns, name)
        k8s_emulator.kubelet.start(ns, pod["metadata"]["name"])
        if ending == "oom":
            k8s_emulator.kubelet.oom(ns, pod["metadata"]["name"])
        elif ending == "exit3":
            k8s_emulator.kubelet.finish(ns, pod["metadata"]["name"], 3)
        else:
            k8s_emulator.clock.advance(job["spec"]["activeDeadlineSeconds"] + 1)
        await log.wait_for(lambda ev: log.terminal(name))
    (terminal,) = log.terminal(name)
    assert (terminal.state, terminal.reason) == (state, reason)
    if ending == "oom":
        assert "OOMKilled" in terminal.message and "137" in terminal.message
    if ending == "exit3":
        assert "code 3" in terminal.message


async def test_cancel_deletes_the_job_and_its_secret_and_reads_as_cancelled(k8s_emulator, runtime, s):
    job = manifest(incident(4), s)
    name = job["metadata"]["name"]
    ns = k8s_emulator.namespace
    async with EventLog(runtime).running() as log:
        await runtime.launch(job, secret={"incident.json": b"{}"})
        assert await runtime.cancel(name) is True
        await log.wait_for(lambda ev: log.terminal(name))
        await k8s_emulator.cluster.wait_for(JOBS, ns, lambda jobs: not any(j["metadata"]["name"] == name for j in jobs))
    assert [e.state for e in log.terminal(name)] == [JobState.CANCELLED]
    assert k8s_emulator.cluster.store.get(SECRETS, ns, jobspec.secret_name(name)) is None
    assert await runtime.cancel(name) is False


async def test_a_job_deleted_from_outside_is_reported_lost(k8s_emulator, runtime, s):
    job = manifest(incident(5), s)
    name = job["metadata"]["name"]
    async with EventLog(runtime).running() as log:
        await runtime.launch(job)
        await runtime.batch.delete_namespaced_job(name, k8s_emulator.namespace)  # kubectl delete job
        await log.wait_for(lambda ev: log.terminal(name))
    (terminal,) = log.terminal(name)
    assert (terminal.state, terminal.reason) == (JobState.LOST, FailureReason.JOB_LOST)


def _lists_and_watches(handle) -> tuple[int, int]:
    gets = [r for r in handle.cluster.requests if r.method == "GET" and r.path.endswith("/jobs")]
    watches = [r for r in gets if r.query.get("watch") in ("true", "True", "1")]
    return len(gets) - len(watches), len(watches)


async def test_watch_resumes_after_dropped_streams_and_relists_after_410(k8s_emulator, runtime, s):
    ns = k8s_emulator.namespace
    async with EventLog(runtime).running() as log:
        await k8s_emulator.cluster.watch_opened(JOBS)
        # Given the next two watch streams are cut after one event each
        dropped = k8s_emulator.faults.inject("GET", r"/jobs$", drop_stream=True, after_events=1, times=2)
        k8s_emulator.cluster.store.close_watches()
        jobs = [manifest(incident(10 + i), s) for i in range(3)]
        for job in jobs:
            await runtime.launch(job)
        await asyncio.wait_for(dropped.fired.wait(), 5)
        lists_before, _ = _lists_and_watches(k8s_emulator)
        # And a Job appears while no watch runs and history is compacted (the resume point expires)
        await k8s_emulator.cluster.watch_opened(JOBS)
        late = manifest(incident(13), s)
        k8s_emulator.cluster.store.close_watches()  # no await in between: the client sees none of it
        k8s_emulator.cluster.api.create(JOBS, ns, late)
        k8s_emulator.cluster.compact()
        jobs.append(late)
        for job in jobs:
            pod = await k8s_emulator.cluster.wait_for_pod(ns, job["metadata"]["name"])
            k8s_emulator.kubelet.start(ns, pod["metadata"]["name"])
            k8s_emulator.kubelet.finish(ns, pod["metadata"]["name"], 0)
        await log.wait_for(lambda ev: all(log.terminal(j["metadata"]["name"]) for j in jobs), timeout=20)
    lists_after, watches = _lists_and_watches(k8s_emulator)
    # Then every ending is reported exactly once, the 410 led to a re-list, streams were resumed
    for job in jobs:
        assert len(log.terminal(job["metadata"]["name"])) == 1
    assert lists_after > lists_before
    assert dropped.hits == 2 and watches >= 4


async def test_two_replicas_report_each_ending_exactly_once(k8s_emulator, runtime, s):
    other = KubernetesRuntime(k8s_emulator.api_client, namespace=k8s_emulator.namespace, request_timeout=5,
                              watch_timeout=30, replica="replica-b", claim_timeout=30)
    runtime.claim_timeout = 30
    ns = k8s_emulator.namespace
    jobs = [manifest(incident(20 + i), s) for i in range(6)]
    changed = asyncio.Event()
    async with EventLog(runtime, changed=changed).running() as a, EventLog(other, changed=changed).running() as b:
        for job in jobs:
            await (runtime if len(a.events) % 2 else other).launch(job)
            pod = await k8s_emulator.cluster.wait_for_pod(ns, job["metadata"]["name"])
            k8s_emulator.kubelet.start(ns, pod["metadata"]["name"])
            k8s_emulator.kubelet.finish(ns, pod["metadata"]["name"], 0)
        names = [j["metadata"]["name"] for j in jobs]
        await a.wait_for(lambda _: all(a.terminal(n) or b.terminal(n) for n in names))
        await k8s_emulator.cluster.wait_for(
            JOBS, ns, lambda js: all(jobspec.ANN_REPORTED in (j["metadata"].get("annotations") or {}) for j in js)
        )
    for name in names:
        assert len(a.terminal(name)) + len(b.terminal(name)) == 1


async def test_an_unacknowledged_ending_is_reported_again_after_a_restart(k8s_emulator, runtime, s):
    # Given a replica that saw an ending but crashed before reporting it
    job = manifest(incident(30), s)
    name = job["metadata"]["name"]
    ns = k8s_emulator.namespace
    async with EventLog(runtime, acknowledge=False).running() as crashed:
        await runtime.launch(job)
        pod = await k8s_emulator.cluster.wait_for_pod(ns, name)
        k8s_emulator.kubelet.finish(ns, pod["metadata"]["name"], 0)
        await crashed.wait_for(lambda ev: crashed.terminal(name))
    # When a new replica starts after the claim expired (claim_timeout=2 s on the emulator's clock)
    restarted = KubernetesRuntime(k8s_emulator.api_client, namespace=ns, request_timeout=5, watch_timeout=30,
                                  replica="replica-new", claim_timeout=0)
    async with EventLog(restarted).running() as log:
        await log.wait_for(lambda ev: log.terminal(name))
    # Then it reports the ending and releases the Job
    assert [e.state for e in log.terminal(name)] == [JobState.SUCCEEDED]
    assert jobspec.FINALIZER not in (k8s_emulator.cluster.job(ns, name)["metadata"].get("finalizers") or [])


@pytest.mark.parametrize("k8s_emulator", [{}], indirect=True)
async def test_api_errors_map_to_permanent_or_temporary(k8s_emulator, runtime, s):
    ns = k8s_emulator.namespace
    k8s_emulator.faults.inject("POST", r"/jobs$", status=503, times=1)
    with pytest.raises(TemporaryError):
        await runtime.launch(manifest(incident(40), s))
    k8s_emulator.faults.inject("POST", r"/jobs$", status=429, times=1)
    with pytest.raises(TemporaryError) as caught:
        await runtime.launch(manifest(incident(41), s))
    assert caught.value.delay is not None  # Retry-After honoured
    k8s_emulator.cluster.set_quota(ns, "runs", {"count/jobs.batch": 0})
    with pytest.raises(TemporaryError, match="exceeded quota"):
        await runtime.launch(manifest(incident(42), s))
    bad = manifest(incident(43), s)
    bad["spec"]["template"]["spec"]["containers"] = []
    with pytest.raises(PermanentError) as invalid:
        await runtime.launch(bad)
    assert invalid.value.reason == "invalid_job"


async def test_forbidden_by_rbac_is_permanent(k8s_emulator, s):
    prepare_cluster(k8s_emulator)
    token = k8s_emulator.cluster.mint_token(k8s_emulator.namespace, "no-rights")
    k8s_emulator.rbac.enabled = True
    api = k8s_emulator.client_for(token)
    try:
        restricted = KubernetesRuntime(api, namespace=k8s_emulator.namespace, request_timeout=5)
        with pytest.raises(PermanentError) as caught:
            await restricted.launch(manifest(incident(50), s))
        assert caught.value.reason == "forbidden" and "cannot create resource" in caught.value.message
    finally:
        await api.close()


async def test_a_silent_watch_is_dropped_and_resumed_so_endings_are_not_hidden(k8s_emulator, s):
    # Given a watch that would stay open for 5 minutes, and a stream that goes quiet at once
    # (no event, no bookmark, no end: a half-open connection behind a proxy)
    prepare_cluster(k8s_emulator)
    runtime = KubernetesRuntime(k8s_emulator.api_client, namespace=k8s_emulator.namespace, request_timeout=5,
                                watch_timeout=300, watch_idle_timeout=1.0, replica="replica-a", claim_timeout=2)
    ns = k8s_emulator.namespace
    job = manifest(incident(40), s)
    name = job["metadata"]["name"]
    async with EventLog(runtime).running() as log:
        await k8s_emulator.cluster.watch_opened(JOBS)
        silent = k8s_emulator.faults.inject("GET", r"/jobs$", silent_stream=True, times=1)
        k8s_emulator.cluster.store.close_watches()
        await asyncio.wait_for(silent.fired.wait(), 5)
        # When a Job is launched and ends while that stream is silent
        await runtime.launch(job)
        pod = await k8s_emulator.cluster.wait_for_pod(ns, name)
        k8s_emulator.kubelet.start(ns, pod["metadata"]["name"])
        k8s_emulator.kubelet.finish(ns, pod["metadata"]["name"], 0)
        # Then its ending is reported long before the silent watch would have been renewed
        await log.wait_for(lambda ev: log.terminal(name), timeout=30)
    assert [e.state for e in log.terminal(name)] == [JobState.SUCCEEDED]
    assert silent.hits == 1
