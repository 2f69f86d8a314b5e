"""``KubernetesRuntime``: one batch/v1 Job per investigation, observed until its ending is reported.

Launch creates the Job (409 AlreadyExists → ``ALREADY_EXISTS``: that is how
"exactly one Job per investigation" holds across replicas) and then its input
Secret, owned by the Job so it is deleted with it — unless the input holds nothing
secret (only the incident: ``jobspec.inline_input``), which then rides in the Job. Jobs carry the finalizer
``agentjobs.dev/report``: however a Job ends — completes, fails, hits its
deadline, is deleted by an operator, by TTL, or by our cancel — it stays
visible until a dispatcher has reported its ending and acknowledged it.

Observation is list + watch by label, resumed from the last resourceVersion
and re-listed on 410 Expired. Replicas all watch; the one whose claim (an
annotation patched with a resourceVersion precondition) succeeds reports.
A claim left by a crashed replica expires after ``claim_timeout`` seconds.
Every call passes ``_request_timeout`` (and watches ``timeout_seconds``):
kubernetes_asyncio has no read timeout otherwise. A watch also has an idle
read timeout (``watch_idle_timeout``): a stream that stays silent — no event,
no bookmark — is dropped and resumed instead of hiding Job endings until it
would have been renewed.

``status(name)`` reads one Job: its terminal condition (or the state recorded
when its ending was reported) tells a restarted dispatcher that the
investigation ended. ``cancel(name, reason=…)`` records the reason in the
``cancel-reason`` annotation before deleting, so it is the CANCELLED event's
message whichever replica reports it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import socket
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import aiohttp
import msgspec
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from schemas import FailureReason, utcnow
from schemas.errors import AgentJobsError, TemporaryError

from dispatcher.jobs import jobspec, k8s_raw
from dispatcher.jobs.k8s_errors import AlreadyExists, Conflict, NotFound, classify
from schemas.logs import get_logger
from dispatcher.plumbing.retry import Backoff
from dispatcher.jobs.runtime import CANCEL_REASON, JobState, JobStatus, LaunchOutcome, RuntimeEvent
from dispatcher.plumbing.settings import KubernetesSettings

log = get_logger("agentjobs.runtime.kubernetes")
MERGE_PATCH = "application/merge-patch+json"
ACKNOWLEDGED_MEMORY = 50_000  # uids; more than a namespace holds Jobs within their TTL


def _annotations(job: Mapping[str, Any]) -> dict[str, str]:
    return dict((job.get("metadata") or {}).get("annotations") or {})


def _condition(job: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def ending_of(job: Mapping[str, Any], *, deleted: bool = False) -> tuple[JobState, FailureReason | None, str] | None:
    """How a Job object says it ended (pure), or None while it runs.

    A terminal condition wins over deletion; a deletion we asked for reads as cancelled,
    any other as lost.
    """
    if _condition(job, "Complete"):
        return JobState.SUCCEEDED, None, "Job completed"
    failed = _condition(job, "Failed")
    if failed:
        reason = failed.get("reason", "")
        message = failed.get("message", "") or reason
        if reason == "DeadlineExceeded":
            return JobState.FAILED, FailureReason.DEADLINE_EXCEEDED, message
        if reason == "BackoffLimitExceeded":
            return JobState.FAILED, FailureReason.BACKOFF_LIMIT_EXCEEDED, message
        return JobState.FAILED, FailureReason.AGENT_ERROR, f"{reason}: {message}"
    if deleted or (job.get("metadata") or {}).get("deletionTimestamp"):
        cancel = _annotations(job).get(jobspec.ANN_CANCEL)
        if cancel:
            return JobState.CANCELLED, None, cancel
        return JobState.LOST, FailureReason.JOB_LOST, "the Job was deleted before it finished"
    return None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def status_of(job: Mapping[str, Any]) -> JobStatus:
    """What a Job object says about its investigation (pure): ended or not, and when."""
    meta = job.get("metadata") or {}
    annotations = _annotations(job)
    ending = ending_of(job)
    reported = annotations.get(jobspec.ANN_REPORTED, "")
    state = ending[0] if ending is not None else JobState.RUNNING
    if ending is None and reported:  # reported before (e.g. a cancelled Job whose deletion is pending)
        try:
            state = JobState(reported)
        except ValueError:
            state = JobState.LOST
    finished = None
    if state.terminal:
        status = job.get("status") or {}
        conditions = [c for c in status.get("conditions") or [] if c.get("status") == "True"
                      and c.get("type") in ("Complete", "Failed")]
        finished = (_time(status.get("completionTime")) or
                    (_time(conditions[0].get("lastTransitionTime")) if conditions else None) or
                    _time(meta.get("deletionTimestamp")))
    return JobStatus(job_name=meta.get("name", ""),
                     investigation_id=(meta.get("labels") or {}).get(jobspec.LABEL_INVESTIGATION, ""),
                     state=state, created_at=_time(meta.get("creationTimestamp")), finished_at=finished,
                     reported=bool(reported), labels=dict(meta.get("labels") or {}), annotations=annotations)


def pod_failure(pods: list[Mapping[str, Any]]) -> tuple[FailureReason | None, str, int | None]:
    """OOMKilled (or the agent's exit code) from a failed Job's pods (pure): reason, detail, exit code."""
    detail, exit_code = "", None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if not term:
                continue
            if term.get("reason") == "OOMKilled":
                code = term.get("exitCode", 137)
                return FailureReason.OOM_KILLED, f"container {cs.get('name')} was OOMKilled (exit {code})", code
            if term.get("exitCode"):
                exit_code = term["exitCode"]
                detail = f"container {cs.get('name')} exited with code {exit_code} ({term.get('reason', 'Error')})"
    return None, detail, exit_code


def without_per_request_env_lookups(api_client: ApiClient) -> None:
    """Stop aiohttp from consulting ``~/.netrc`` and proxy variables on every API call.

    kubernetes_asyncio opens its session with ``trust_env=True``; aiohttp (3.10+) then
    hops to a worker thread for a netrc read and a proxy lookup on *each* request. On a
    busy dispatcher every hop waits for the GIL (up to the 5 ms switch interval), which
    dominated dispatch latency. The API server's proxy, if any, is read once instead
    (``from_settings`` → ``Configuration.proxy``, which the client passes explicitly).
    """
    session = getattr(api_client.rest_client, "pool_manager", None)
    if session is not None and getattr(session, "_trust_env", False):
        session._trust_env = False  # no public setter; ``session.trust_env`` reads it back


def env_proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``/``NO_PROXY``), read once."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme) or None


class KubernetesRuntime:
    """The production runtime (see module docstring)."""

    def __init__(
        self,
        api_client: ApiClient,
        *,
        namespace: str,
        request_timeout: float = 10.0,
        watch_timeout: int = 300,
        watch_idle_timeout: float = 90.0,
        replica: str | None = None,
        claim_timeout: float = 60.0,
        clock: Callable[[], datetime] = utcnow,
        owns_client: bool = False,
    ) -> None:
        self.api = api_client
        without_per_request_env_lookups(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self._raw = k8s_raw.RawWriter(api_client)
        self.namespace = namespace
        ns = urllib.parse.quote(namespace, safe="")
        self._jobs_path = f"/apis/batch/v1/namespaces/{ns}/jobs"
        self._secrets_path = f"/api/v1/namespaces/{ns}/secrets"
        self.request_timeout = request_timeout  # seconds per call
        self.watch_timeout = watch_timeout  # seconds a watch stays open
        self.watch_idle_timeout = watch_idle_timeout  # seconds a watch may stay silent
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_timeout = claim_timeout  # seconds before another replica may take over a claim
        self.clock = clock
        self._owns_client = owns_client
        self._started: set[str] = set()  # Job uids reported as running by this process
        self._emitted: dict[str, float] = {}  # Job uid → when its terminal event was emitted
        # uids whose ending we reported; stale watch events for them must not re-open it
        self._acknowledged: OrderedDict[str, None] = OrderedDict()
        self._backoff = Backoff(base=0.2, cap=5.0)
        self._rv: str | None = None  # newest resourceVersion seen by list or watch
        self._recheck_at: float | None = None  # monotonic time of the next forced re-list
        self._closed = asyncio.Event()  # set by close(): events() ends
        self._watching: watch.Watch | None = None  # the open watch stream, cut by close()
        self._names: set[str] | None = None  # names of the Jobs that exist, once events() has listed them

    @classmethod
    async def from_settings(cls, k8s: KubernetesSettings) -> KubernetesRuntime:
        """In-cluster config, else the kubeconfig from settings or ~/.kube/config."""
        cfg = client.Configuration()
        if k8s.kubeconfig:
            await config.load_kube_config(config_file=k8s.kubeconfig, context=k8s.context or None,
                                          client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                await config.load_kube_config(context=k8s.context or None, client_configuration=cfg)
        cfg.proxy = cfg.proxy or env_proxy_for(cfg.host)
        return cls(ApiClient(cfg), namespace=k8s.namespace, request_timeout=k8s.request_timeout,
                   watch_timeout=k8s.watch_timeout, watch_idle_timeout=k8s.watch_idle_timeout,
                   claim_timeout=k8s.claim_timeout, owns_client=True)

    async def _call(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, _request_timeout=self.request_timeout, **kwargs)
        except Exception as exc:  # mapped here and only here
            raise classify(exc, doing=doing) from exc

    async def _read_json(self, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        response = await self._call(doing, fn, *args, _preload_content=False, **kwargs)
        try:
            body = await response.read()
        except Exception as exc:
            raise classify(exc, doing=doing) from exc
        finally:
            response.release()
        if not 200 <= response.status <= 299:  # unpreloaded responses are not checked by the client
            error = ApiException(status=response.status, reason=response.reason)
            error.body, error.headers = body, response.headers
            raise classify(error, doing=doing)
        return msgspec.json.decode(body)

    # -- launch / cancel ---------------------------------------------------------------------

    async def _post(self, doing: str, path: str, body: bytes) -> bytes:
        """A hot write (msgspec-encoded, the client's own session: ``k8s_raw``), errors classified."""
        try:
            return await self._raw.post(path, body, timeout=self.request_timeout)
        except Exception as exc:  # mapped here and only here
            raise classify(exc, doing=doing) from exc

    async def launch(self, job: Mapping[str, Any], *, secret: Mapping[str, bytes] | None = None) -> LaunchOutcome:
        name = job["metadata"]["name"]
        given = dict(secret or {})
        manifest, files = jobspec.inline_input(dict(job), given)  # nothing secret: no Secret at all
        try:
            created = _created.decode(await self._post(f"create job {name}", self._jobs_path,
                                                       k8s_raw.encode(manifest)))
            outcome = LaunchOutcome.CREATED
            if self._names is not None:
                self._names.add(name)
        except AlreadyExists:
            try:
                existing = await self._read_json(f"read job {name}", self.batch.read_namespaced_job,
                                                 name, self.namespace)
            except NotFound as exc:  # deleted between our create and read: try again later
                raise TemporaryError(f"job {name} vanished right after 409") from exc
            created = msgspec.convert(existing, _Created)
            outcome = LaunchOutcome.ALREADY_EXISTS
            # The Job that exists decides: one created (by us or an older dispatcher) to read its
            # input from the Secret gets it, even where this launch would have inlined it.
            files = given if jobspec.reads_input_secret(existing) else {}
        if files:
            await self._ensure_secret(created.metadata, files)
        return outcome

    async def _ensure_secret(self, meta: _CreatedMeta, files: Mapping[str, bytes]) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": jobspec.secret_name(meta.name),
                "namespace": self.namespace,
                "labels": {jobspec.LABEL_MANAGED_BY: jobspec.MANAGED_BY,
                           jobspec.LABEL_INVESTIGATION: meta.labels.get(jobspec.LABEL_INVESTIGATION, "")},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta.name,
                                     "uid": meta.uid, "controller": False, "blockOwnerDeletion": False}],
            },
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
        }
        try:
            await self._post(f"create secret for {meta.name}", self._secrets_path, k8s_raw.encode(body))
        except AlreadyExists:
            pass

    async def cancel(self, job_name: str, *, reason: str = CANCEL_REASON) -> bool:
        patch = {"metadata": {"annotations": {jobspec.ANN_CANCEL: reason or CANCEL_REASON}}}
        try:
            await self._call(f"annotate job {job_name}", self.batch.patch_namespaced_job, job_name,
                             self.namespace, patch, _content_type=MERGE_PATCH)
            await self._call(f"delete job {job_name}", self.batch.delete_namespaced_job, job_name,
                             self.namespace, propagation_policy="Foreground")
        except NotFound:
            return False
        return True

    async def status(self, job_name: str) -> JobStatus | None:
        """The Job's state from its conditions (or its reported ending); None when there is no such Job.

        Once ``events()`` has listed the namespace, a name it has never seen is answered from memory
        (None, without a GET: every new investigation asks). A Job another replica created a moment
        ago may not have reached the watch yet; then the create that follows meets 409 and finds it,
        as it would have with the GET — and a Job that already *ended* was listed or watched long ago.
        """
        if self._names is not None and job_name not in self._names:
            return None
        try:
            job = await self._read_json(f"read job {job_name}", self.batch.read_namespaced_job,
                                        job_name, self.namespace)
        except NotFound:
            return None
        return status_of(job)

    @property
    def where(self) -> str:
        return f"kubernetes/{self.namespace}"

    async def active(self) -> list[str]:
        return list(await self.active_annotations())

    async def active_annotations(self) -> dict[str, dict[str, str]]:
        return {j["metadata"]["name"]: _annotations(j) for j in await self.jobs()
                if ending_of(j) is None and jobspec.ANN_REPORTED not in _annotations(j)}

    async def close(self) -> None:
        """End ``events()`` (cutting an open watch) and release the client if ours; Jobs keep running."""
        self._closed.set()
        watching = self._watching
        if watching is not None:  # a watch blocks up to watch_timeout: cut it so events() ends now
            watching.stop()
            if watching.resp is not None:
                watching.resp.close()
        if self._owns_client:
            await self.api.close()

    # -- observation -------------------------------------------------------------------------

    async def jobs(self) -> list[dict[str, Any]]:
        """Every Job agentjobs manages in the namespace, as the API server returns them (read only)."""
        return (await self._list()).get("items", [])

    async def _list(self) -> dict[str, Any]:
        return await self._read_json("list jobs", self.batch.list_namespaced_job, self.namespace,
                                     label_selector=jobspec.SELECTOR)

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        attempt = 0
        while not self._closed.is_set():
            try:
                self._recheck_at = None
                listing = await self._list()
                attempt = 0
                self._names = {(job.get("metadata") or {}).get("name", "") for job in listing.get("items", [])}
                for job in listing.get("items", []):
                    async for event in self._observe(job):
                        yield event
                self._rv = listing.get("metadata", {}).get("resourceVersion")
                while not self._closed.is_set():  # resume from the last resourceVersion until it expires
                    async for kind, job in self._watch(self._rv, self._watch_seconds()):
                        self._seen(kind, job)
                        async for event in self._observe(job, deleted=kind == "DELETED"):
                            yield event
                    if self._recheck_at is not None and time.monotonic() >= self._recheck_at:
                        break  # something deferred is due: look at everything again
            except _Expired:
                log.info("watch_expired_relisting")
            except TemporaryError as exc:
                if self._closed.is_set():
                    return  # our own close() cut the stream
                attempt += 1
                wait = self._backoff.delay(attempt, floor=exc.delay)
                log.warning("watch_failed", error=exc.message, retry_in_s=round(wait, 2))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._closed.wait()

    def _defer(self, seconds: float) -> None:
        """Look at the Jobs again (re-list) after ``seconds``: a claim expires, a call failed."""
        due = time.monotonic() + max(seconds, 0.0)
        self._recheck_at = due if self._recheck_at is None else min(self._recheck_at, due)

    def _seen(self, kind: str, job: Mapping[str, Any]) -> None:
        """Keep the names of the Jobs that exist (``status`` answers the others from memory)."""
        name = (job.get("metadata") or {}).get("name")
        if self._names is not None and name:
            if kind == "DELETED":
                self._names.discard(name)
            else:
                self._names.add(name)

    def _watch_seconds(self) -> int:
        if self._recheck_at is None:
            return self.watch_timeout
        return max(1, min(self.watch_timeout, math.ceil(self._recheck_at - time.monotonic())))

    async def _watch(self, resource_version: str | None, seconds: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Watch from ``resource_version`` until the server ends the stream (then re-list)."""
        w = _RawWatch()
        self._watching = w
        try:
            stream = w.stream(self.batch.list_namespaced_job, self.namespace, label_selector=jobspec.SELECTOR,
                              resource_version=resource_version, timeout_seconds=seconds,
                              allow_watch_bookmarks=True,
                              _request_timeout=aiohttp.ClientTimeout(
                                  total=seconds + self.request_timeout, sock_connect=self.request_timeout,
                                  sock_read=self.watch_idle_timeout))
            async for item in stream:
                kind = item.get("type", "")
                rv = (item.get("raw_object") or {}).get("metadata", {}).get("resourceVersion")
                if rv:
                    self._rv = rv  # bookmarks too: resume from the newest point we saw
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    yield kind, item["raw_object"]
        except aiohttp.ServerTimeoutError as exc:  # silent for watch_idle_timeout: drop it, resume
            raise TemporaryError(f"watch jobs: nothing received for {self.watch_idle_timeout:g} s "
                                 "(no event, no bookmark); resuming") from exc
        except Exception as exc:
            if _is_expired(exc):
                raise _Expired() from exc
            raise classify(exc, doing="watch jobs") from exc
        finally:
            self._watching = None
            await w.close()

    async def _observe(self, job: dict[str, Any], *, deleted: bool = False) -> AsyncIterator[RuntimeEvent]:
        meta = job.get("metadata") or {}
        uid = meta.get("uid", "")
        annotations = _annotations(job)
        if uid in self._acknowledged and jobspec.ANN_REPORTED not in annotations:
            return  # a stale event from before our acknowledgement
        if jobspec.ANN_REPORTED in annotations:
            if jobspec.FINALIZER in (meta.get("finalizers") or []) and not deleted:
                try:
                    await self._release(job)  # reported, but the finalizer removal was lost
                except TemporaryError:
                    self._defer(1.0)
            return
        ending = ending_of(job, deleted=deleted)
        if ending is None:
            status = job.get("status") or {}
            if status.get("active") and uid not in self._started:
                self._started.add(uid)
                yield self._event(job, JobState.RUNNING, None, "agent pod is running")
            return
        if deleted and jobspec.FINALIZER in (meta.get("finalizers") or []):
            return  # cannot be: the finalizer keeps it; ignore odd streams
        if uid in self._emitted:
            # Handed to our watcher, which retries until it can acknowledge: never twice from here.
            # (Another replica may take over once our claim is older than claim_timeout; the
            # deterministic message ids let consumers drop that rare duplicate.)
            return
        if not deleted and not await self._claim(job):
            return
        state, reason, message = ending
        exit_code = None
        if state is JobState.FAILED and reason is not FailureReason.DEADLINE_EXCEEDED:
            pod_reason, detail, exit_code = await self._pod_failure(meta["name"])
            reason = pod_reason or reason
            message = detail or message
        self._emitted[uid] = time.monotonic()
        yield self._event(job, state, reason, message, exit_code)

    async def _claim(self, job: dict[str, Any]) -> bool:
        """Become the replica that reports this Job's ending (optimistic concurrency)."""
        meta = job["metadata"]
        claim = _annotations(job).get(jobspec.ANN_CLAIM, "")
        if claim and not claim.startswith(f"{self.replica}@"):
            try:
                age = time.time() - float(claim.rsplit("@", 1)[1])
            except (IndexError, ValueError):
                age = float("inf")
            if age < self.claim_timeout:
                self._defer(self.claim_timeout - age)  # take over if that replica went away
                return False
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"],
                              "annotations": {jobspec.ANN_CLAIM: f"{self.replica}@{time.time():.3f}"}}}
        try:
            await self._call(f"claim job {meta['name']}", self.batch.patch_namespaced_job, meta["name"],
                             self.namespace, patch, _content_type=MERGE_PATCH)
        except (Conflict, NotFound):
            return False  # another replica was faster (or it changed; the watch brings it again)
        except TemporaryError as exc:
            log.warning("claim_failed", job_name=meta["name"], error=exc.message)
            self._defer(1.0)
            return False
        return True

    async def _pod_failure(self, job_name: str) -> tuple[FailureReason | None, str, int | None]:
        try:
            pods = await self._read_json(f"list pods of {job_name}", self.core.list_namespaced_pod,
                                         self.namespace, label_selector=f"job-name={job_name}")
        except AgentJobsError as exc:
            log.warning("pod_lookup_failed", job_name=job_name, error=str(exc))
            return None, "", None
        return pod_failure(pods.get("items", []))

    def _event(self, job: Mapping[str, Any], state: JobState, reason: FailureReason | None, message: str,
               exit_code: int | None = None) -> RuntimeEvent:
        meta = job.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        return RuntimeEvent(
            job_name=meta.get("name", ""),
            investigation_id=labels.get(jobspec.LABEL_INVESTIGATION, ""),
            state=state,
            at=self.clock(),
            reason=reason,
            message=message,
            exit_code=exit_code,
            labels=labels,
            annotations={**_annotations(job), "uid": meta.get("uid", "")},
        )

    async def acknowledge(self, event: RuntimeEvent) -> dict[str, str]:
        """Mark the Job reported and drop our finalizer, so TTL/deletion can proceed.

        Returns the Job's annotations as they were when it was released (a late login-token
        accessor recorded after ``event`` was observed is among them).
        """
        try:
            job = await self._read_json(f"read job {event.job_name}", self.batch.read_namespaced_job,
                                        event.job_name, self.namespace)
        except NotFound:
            return dict(event.annotations)
        annotations = {jobspec.ANN_REPORTED: event.state.value}
        await self._release(job, annotations)
        uid = job["metadata"].get("uid", "")
        self._emitted.pop(uid, None)
        self._acknowledged[uid] = None
        while len(self._acknowledged) > ACKNOWLEDGED_MEMORY:
            self._acknowledged.popitem(last=False)
        self._started.discard(job["metadata"].get("uid", ""))
        return _annotations(job)

    async def annotate_unless_reported(self, job_name: str, annotations: Mapping[str, str]) -> bool:
        """Add annotations to a Job whose ending is not yet reported; False if it is (or is gone)."""
        try:
            job = await self._read_json(f"read job {job_name}", self.batch.read_namespaced_job,
                                        job_name, self.namespace)
        except NotFound:
            return False
        meta = job["metadata"]
        if jobspec.ANN_REPORTED in _annotations(job) or jobspec.FINALIZER not in (meta.get("finalizers") or []):
            return False
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"], "annotations": dict(annotations)}}
        try:
            await self._call(f"annotate job {job_name}", self.batch.patch_namespaced_job, job_name,
                             self.namespace, patch, _content_type=MERGE_PATCH)
        except NotFound:
            return False
        except Conflict as exc:  # changed meanwhile (maybe just reported): look again
            raise TemporaryError(f"job {job_name} changed while annotating it") from exc
        return True

    async def _release(self, job: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> None:
        meta = job["metadata"]
        finalizers = [f for f in meta.get("finalizers") or [] if f != jobspec.FINALIZER]
        patch: dict[str, Any] = {"metadata": {"resourceVersion": meta["resourceVersion"], "finalizers": finalizers}}
        if annotations:
            patch["metadata"]["annotations"] = dict(annotations)
        try:
            await self._call(f"release job {meta['name']}", self.batch.patch_namespaced_job, meta["name"],
                             self.namespace, patch, _content_type=MERGE_PATCH)
        except NotFound:
            return
        except Conflict as exc:  # changed under us: read again and retry via the caller's retry
            raise TemporaryError(f"job {meta['name']} changed while releasing it") from exc


class _CreatedMeta(msgspec.Struct):
    """What a launch needs of the Job the API server answered with (the rest is not decoded)."""

    name: str
    uid: str = ""
    labels: dict[str, str] = {}


class _Created(msgspec.Struct):
    metadata: _CreatedMeta


_created = msgspec.json.Decoder(_Created)


class _RawWatch(watch.Watch):
    """A Watch that leaves objects as the JSON dicts we read (no model conversion per event), each
    line decoded once with msgspec instead of stdlib ``json``, into what the runtime reads of a Job
    (``_ObjectView``), with the base class's semantics: error events raise ``ApiException`` with
    their code, so a 410 still means "re-list")."""

    def get_return_type(self, func: object) -> None:  # type: ignore[override]
        return None

    def unmarshal_event(self, data: str | bytes, response_type: str | None) -> Any:
        try:
            line = _watch_line.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return data
        seen = line.object
        if line.type is None or seen is None:
            if line.code is not None:
                raise ApiException(status=line.code, reason=f"{line.reason}: {line.message}")
            raise TemporaryError(f"watch jobs: malformed event without type/object: {str(data)[:200]}")
        kind = line.type.lower()
        if kind == "error":
            raise ApiException(status=seen.code, reason=f"{seen.reason}: {seen.message}")
        obj = {"metadata": seen.metadata, "status": seen.status if isinstance(seen.status, dict) else {}}
        rv = seen.metadata.get("resourceVersion")
        if rv:
            self.resource_version = rv
        elif kind == "bookmark":
            raise TemporaryError(f"watch jobs: bookmark without a resourceVersion: {str(data)[:200]}")
        return {"type": line.type, "object": obj, "raw_object": obj}


class _ObjectView(msgspec.Struct):
    """The parts of a watched Job the runtime reads — metadata and status; ``spec`` (the whole pod
    template, the inline incident with it) is skipped, never built. An error event's object is a
    Status instead: its code, reason and message."""

    metadata: dict[str, Any] = {}
    status: Any = None  # a Job's status object; a Status's "Failure"
    code: int | None = None
    reason: str | None = None
    message: str | None = None


class _WatchLine(msgspec.Struct):
    type: str | None = None
    object: _ObjectView | None = None
    code: int | None = None  # a bare Status line (no event)
    reason: str | None = None
    message: str | None = None


_watch_line = msgspec.json.Decoder(_WatchLine)


class _Expired(Exception):
    """The watch's resourceVersion is too old (410): re-list."""


def _is_expired(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 410
