"""The HTTP face of the emulator: an aiohttp app speaking the Kubernetes REST protocol.

Parses `/api/v1/...` and `/apis/GROUP/VERSION/...` paths, authenticates the
bearer token, applies RBAC and injected faults, and maps verbs to api.py —
plus the streaming endpoints (watch, pods/log), TokenReview, TokenRequest,
discovery and the OIDC documents.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from aiohttp import web

from . import resources, status
from .admission import AdmissionRequest
from .clock import rfc3339
from .cluster import Cluster, RequestRecord
from .faults import Fault
from .resources import NAMESPACES, PODS, SERVICEACCOUNTS, TOKENREVIEWS, ResourceType
from .selectors import SelectorError, parse_field_selector, parse_label_selector
from .tokens import Identity

log = logging.getLogger(__name__)
TRUE = ("true", "True", "1")


@dataclass
class Route:
    rt: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_path(path: str) -> Route | None:
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and (group, version, rest[2]) in resources.BY_PATH:
        namespace, rest = rest[1], rest[2:]
    rt = resources.BY_PATH.get((group, version, rest[0]))
    if rt is None or len(rest) > 3 or (namespace is not None and not rt.namespaced):
        return None
    name = rest[1] if len(rest) >= 2 else None
    sub = rest[2] if len(rest) == 3 else None
    if sub is not None and sub not in rt.subresources:
        return None
    return Route(rt, namespace, name, sub)


def json_response(body, code: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=code,
                        content_type="application/json", headers=headers)


class Server:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.app = web.Application(client_max_size=8 * 2**20)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.cluster.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.cluster.port}"
        return self.url

    async def stop(self) -> None:
        self.cluster.closing.set()
        self.cluster.store.close_watches()
        if self._runner:
            await self._runner.cleanup()

    # -- entry -----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        c = self.cluster
        token = request.headers.get("Authorization", "")
        token = token[7:] if token.startswith("Bearer ") else ""
        ident = c.tokens.authenticate(token)
        c.requests.append(RequestRecord(request.method, request.path, dict(request.query),
                                        request.headers.get("Content-Type", ""),
                                        ident.username if ident else "system:anonymous",
                                        dict(request.headers)))
        fault = c.faults.take(request.method, request.path)
        try:
            if token and ident is None:
                # A bearer token that does not authenticate (unknown, expired, or meant for another
                # audience such as Vault) is refused, as a real API server refuses it; only requests
                # without credentials fall back to anonymous.
                raise status.unauthorized()
            if fault is not None:
                early = await self._apply_fault(request, fault)
                if early is not None:
                    return early
            return await self._dispatch(request, ident, fault)
        except status.ApiError as exc:
            return json_response(exc.body, exc.code, exc.headers)

    async def _apply_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.timeout:
            await self.cluster.closing.wait()  # hang until the client gives up
            raise status.for_code(504)
        if fault.status is not None:
            raise status.for_code(fault.status, fault.retry_after)
        if fault.drop_stream and request.query.get("watch") not in TRUE and \
                request.query.get("follow") not in TRUE:
            request.transport.abort()  # type: ignore[union-attr]
            return web.Response(status=500)
        return None

    async def _dispatch(self, request: web.Request, ident: Identity | None,
                        fault: Fault | None) -> web.StreamResponse:
        c, path, method = self.cluster, request.path, request.method
        simple = self._non_resource(path)
        if simple is not None:
            return json_response(simple)
        route = parse_path(path)
        if route is None:
            return json_response(status.status(404, "NotFound",
                                               "the server could not find the requested resource",
                                               {}), 404)
        if ident is None:
            if c.rbac.enabled:
                raise status.unauthorized()
            ident = Identity("system:anonymous", groups=["system:masters"])
        q = request.query
        rt, ns, name, sub = route.rt, route.namespace, route.name, route.subresource
        watching = q.get("watch") in TRUE
        verb = {"GET": "watch" if watching else ("get" if name else "list"),
                "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}.get(method)
        if verb is None:
            raise status.method_not_supported(rt, method)
        if sub == "token" or rt is TOKENREVIEWS:
            verb = "create"
        if verb not in rt.verbs and sub is None:
            raise status.method_not_supported(rt, verb)
        if name and rt.namespaced and ns is None:
            return json_response(status.status(404, "NotFound", "the server could not find the "
                                               "requested resource", {}), 404)
        c.rbac.check(ident, "get" if sub == "log" else verb, rt, ns, name, sub)

        if rt is TOKENREVIEWS and method == "POST":
            return await self._token_review(request)
        if sub == "token" and method == "POST":
            return await self._token_request(request, ns, name)
        if sub == "log":
            return await self._pod_log(request, ns, name)
        dry_run = q.get("dryRun") == "All"
        if sub == "scale":
            return await self._scale(request, rt, ns, name)
        if method in ("PUT", "PATCH") and name and sub is None and c.policies:
            await self._admit_update(request, ident, rt, ns, name)
        if method == "GET":
            if name:
                return json_response(c.api.get(rt, ns, name))
            labels, fields = self._selectors(request, rt)
            if watching:
                return await self._watch(request, rt, ns, labels, fields, fault)
            limit = int(q["limit"]) if q.get("limit") else None
            return json_response(c.api.list(rt, ns, labels, fields, limit, q.get("continue")))
        if method == "POST" and not name:
            obj = c.api.create(rt, ns, await self._json(request), dry_run)
            return json_response(obj, 201)
        if method == "PUT" and name:
            return json_response(c.api.replace(rt, ns, name, await self._json(request), sub))
        if method == "PATCH" and name:
            code, obj = c.api.patch(rt, ns, name, await request.read(),
                                    request.headers.get("Content-Type", ""), sub,
                                    q.get("fieldManager"), dry_run)
            return json_response(obj, code)
        if method == "DELETE":
            opts = await self._json(request, default={})
            propagation = q.get("propagationPolicy") or opts.get("propagationPolicy")
            orphan = q.get("orphanDependents") or opts.get("orphanDependents")
            if propagation is None and orphan is not None:
                propagation = "Orphan" if str(orphan) in TRUE else "Background"
            grace = q.get("gracePeriodSeconds") or opts.get("gracePeriodSeconds")
            grace = int(grace) if grace is not None else None
            if name:
                if rt is NAMESPACES:
                    return json_response(self._delete_namespace(name))
                code, body, headers = c.gc.delete(rt, ns, name, propagation, grace,
                                                  opts.get("preconditions"))
                return json_response(body, code, headers)
            labels, fields = self._selectors(request, rt)
            for obj in c.api.list(rt, ns, labels, fields)["items"]:
                c.gc.delete(rt, obj["metadata"].get("namespace"), obj["metadata"]["name"],
                            propagation, grace)
            return json_response({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Success"})
        raise status.method_not_supported(rt, method)

    async def _scale(self, request: web.Request, rt: ResourceType, ns: str | None,
                     name: str) -> web.Response:
        api = self.cluster.api
        if request.method == "GET":
            return json_response(api.scale(rt, ns, name))
        if request.method == "PUT":
            return json_response(api.replace_scale(rt, ns, name, await self._json(request)))
        if request.method == "PATCH":
            return json_response(api.patch_scale(rt, ns, name, await request.read(),
                                                 request.headers.get("Content-Type", "")))
        raise status.method_not_supported(rt, request.method)

    async def _admit_update(self, request: web.Request, ident: Identity, rt: ResourceType,
                            ns: str | None, name: str) -> None:
        """Run the validating policies on the object this PUT or PATCH would store."""
        c = self.cluster
        old = c.api.get(rt, ns, name)
        if request.method == "PATCH":
            _, new = c.api.patch(rt, ns, name, await request.read(),
                                 request.headers.get("Content-Type", ""), None,
                                 request.query.get("fieldManager"), dry_run=True)
        else:
            new = await self._json(request)
        admission = AdmissionRequest("UPDATE", rt, None, ns, name, ident.username, new, old)
        for policy in c.policies:
            policy.validate(admission)

    # -- helpers -------------------------------------------------------------------------
    def _non_resource(self, path: str) -> dict | None:
        path = path.rstrip("/") or "/"
        if path == "/version":
            return resources.VERSION_INFO
        if path == "/api":
            return resources.api_versions(f"127.0.0.1:{self.cluster.port}")
        if path == "/apis":
            return resources.api_group_list()
        if path in ("/healthz", "/livez", "/readyz"):
            return {"status": "ok"}
        if path == "/.well-known/openid-configuration":
            return {"issuer": self.cluster.tokens.issuer,
                    "jwks_uri": f"http://127.0.0.1:{self.cluster.port}/openid/v1/jwks",
                    "response_types_supported": ["id_token"], "subject_types_supported":
                    ["public"], "id_token_signing_alg_values_supported": ["RS256"]}
        if path == "/openid/v1/jwks":
            return {"keys": [self.cluster.tokens.key.jwk()]}
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2:
            return resources.api_resource_list(parts[1])
        if parts[0] == "apis" and len(parts) == 3:
            gv = f"{parts[1]}/{parts[2]}"
            if gv in resources.group_versions():
                return resources.api_resource_list(gv)
        if parts[0] == "apis" and len(parts) == 2:
            for g in resources.api_group_list()["groups"]:
                if g["name"] == parts[1]:
                    return {"kind": "APIGroup", "apiVersion": "v1", **g}
        return None

    @staticmethod
    async def _json(request: web.Request, default=None):
        raw = await request.read()
        if not raw:
            if default is not None:
                return default
            raise status.bad_request("the body of the request was empty")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise status.bad_request(f"the object provided is unrecognized: {exc}")

    @staticmethod
    def _selectors(request: web.Request, rt: ResourceType):
        try:
            return (parse_label_selector(request.query.get("labelSelector")),
                    parse_field_selector(request.query.get("fieldSelector"), rt.plural))
        except SelectorError as exc:
            raise status.bad_request(str(exc))

    def _delete_namespace(self, name: str) -> dict:
        c = self.cluster
        ns = c.api.get(NAMESPACES, None, name)
        for rt in resources.ALL:
            if rt.namespaced:
                for obj in c.store.list(rt, name):
                    c.store.remove(rt, name, obj["metadata"]["name"])
        removed = c.store.remove(NAMESPACES, None, name)
        removed["status"] = {"phase": "Terminating"}
        removed["metadata"]["deletionTimestamp"] = rfc3339(c.clock.time())
        return removed or ns

    # -- streaming -----------------------------------------------------------------------
    async def _watch(self, request: web.Request, rt: ResourceType, ns: str | None, labels,
                     fields, fault: Fault | None) -> web.StreamResponse:
        c, q = self.cluster, request.query
        raw_rv = q.get("resourceVersion")
        since = None if raw_rv in (None, "", "0") else int(raw_rv)
        bookmarks = q.get("allowWatchBookmarks") in TRUE
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else 1800.0
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            watcher = c.store.watch(rt, ns, since, labels, fields, bookmarks)
        except ValueError as exc:
            error = {"type": "ERROR", "object": status.expired(since or 0, exc.args[0])}
            await resp.write(json.dumps(error).encode() + b"\n")
            await resp.write_eof()
            return resp
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        sent = 0
        try:
            while (remaining := end - loop.time()) > 0:
                if fault is not None and fault.silent_stream and sent >= fault.after_events:
                    await asyncio.sleep(remaining)  # quiet until the timeout, then cut without an end
                    request.transport.abort()  # type: ignore[union-attr]
                    return resp
                wait = min(remaining, c.bookmark_interval) if bookmarks else remaining
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except asyncio.TimeoutError:
                    watcher.bookmark(c.store.resource_version)
                    continue
                if item is None:
                    break
                etype, obj = item
                await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")
                sent += 1
                if fault is not None and fault.drop_stream and sent >= fault.after_events:
                    request.transport.abort()  # type: ignore[union-attr]
                    return resp
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            watcher.close()
        return resp

    async def _pod_log(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        c, q = self.cluster, request.query
        pod = c.api.get(PODS, ns, name)
        names = [ct["name"] for ct in pod["spec"]["containers"]]
        container = q.get("container")
        if not container:
            if len(names) != 1:
                raise status.bad_request(f"a container name must be specified for pod {name}, "
                                         f"choose one of: [{' '.join(names)}]")
            container = names[0]
        if container not in names:
            raise status.bad_request(f"container {container} is not valid for pod {name}")
        if q.get("previous") in TRUE:
            raise status.bad_request(f'previous terminated container "{container}" in pod '
                                     f'"{name}" not found')
        buf = c.kubelet.log_buffer(pod, container)
        if buf is None:
            cs = next((s for s in pod.get("status", {}).get("containerStatuses") or []
                       if s["name"] == container), {})
            reason = (cs.get("state", {}).get("waiting") or {}).get("reason", "ContainerCreating")
            raise status.bad_request(f'container "{container}" in pod "{name}" is waiting to '
                                     f'start: {reason}')
        chunks = buf.read(c.clock, q.get("follow") in TRUE,
                          int(q["tailLines"]) if q.get("tailLines") else None,
                          q.get("timestamps") in TRUE,
                          int(q["sinceSeconds"]) if q.get("sinceSeconds") else None,
                          int(q["limitBytes"]) if q.get("limitBytes") else None)
        if q.get("follow") not in TRUE:
            body = b"".join([chunk async for chunk in chunks])
            return web.Response(body=body, content_type="text/plain", charset="utf-8")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            async for chunk in chunks:
                await resp.write(chunk)
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp

    # -- authentication APIs -------------------------------------------------------------
    async def _token_review(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        spec = body.get("spec") or {}
        review = self.cluster.tokens.review(spec.get("token", ""), spec.get("audiences"))
        return json_response({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                              "metadata": {"creationTimestamp": None}, "spec": spec,
                              "status": review}, 201)

    async def _token_request(self, request: web.Request, ns: str, name: str) -> web.Response:
        c = self.cluster
        sa = c.api.get(SERVICEACCOUNTS, ns, name)
        body = await self._json(request)
        spec = dict(body.get("spec") or {})
        expiration = int(spec.get("expirationSeconds") or 3600)
        if expiration < 600:
            raise status.invalid(
                resources.ResourceType("authentication.k8s.io", "v1", "tokenrequests",
                                       "TokenRequest", True), name,
                [{"field": "spec.expirationSeconds", "reason": "FieldValueInvalid",
                  "message": f"Invalid value: {expiration}: may not specify a duration less "
                  "than 10 minutes"}])
        pod = None
        ref = spec.get("boundObjectRef") or {}
        if ref.get("kind") == "Pod":
            pod = c.api.get(PODS, ns, ref["name"])
        token, exp = c.tokens.mint(ns, name, sa["metadata"]["uid"], spec.get("audiences"),
                                   expiration, pod)
        spec.update(expirationSeconds=expiration, audiences=spec.get("audiences") or
                    [c.tokens.issuer], boundObjectRef=spec.get("boundObjectRef"))
        return json_response({"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                              "metadata": {"name": name, "namespace": ns,
                                           "creationTimestamp": None},
                              "spec": spec, "status": {"token": token,
                                                       "expirationTimestamp": rfc3339(exp)}}, 201)
