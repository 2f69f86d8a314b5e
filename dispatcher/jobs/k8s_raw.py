"""The hot writes (create Job, create Secret) as msgspec-encoded bodies through the client's own session.

kubernetes_asyncio turns every body into JSON with ``sanitize_for_serialization`` (a recursive
walk: ~180 calls for one Job) and stdlib ``json.dumps``; for the two POSTs of every launch that
was the largest single cost of a dispatch. Here the manifest is encoded once with msgspec and
sent on the *same* aiohttp session the generated client uses — so TLS (its connector's SSL
context and client certificate), the proxy, the TLS server name and the auth (``BearerToken``
through ``update_params_for_auth``, which runs the client's token refresh hook) are exactly the
client's. Errors come back as the client's ``ApiException`` (status, reason, body, headers), so
``k8s_errors.classify`` maps them as it maps every other call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

_encoder = msgspec.json.Encoder()


def encode(body: Mapping[str, Any]) -> bytes:
    return _encoder.encode(body)


class RawWriter:
    """``POST`` pre-encoded JSON to API paths with the client's session, auth and TLS."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    async def post(self, path: str, body: bytes, *, timeout: float) -> bytes:
        """The response body of a 2xx answer; ``ApiException`` otherwise (aiohttp errors as raised)."""
        api, rest = self.api, self.api.rest_client
        headers: dict[str, str] = {**api.default_headers, "Content-Type": "application/json",
                                   "Accept": "application/json"}
        if api.cookie:
            headers["Cookie"] = api.cookie
        await api.update_params_for_auth(headers, [], ["BearerToken"])
        args: dict[str, Any] = {"data": body, "headers": headers, "timeout": aiohttp.ClientTimeout(total=timeout)}
        if rest.proxy:
            args["proxy"] = rest.proxy
        if rest.proxy_headers:
            args["proxy_headers"] = rest.proxy_headers
        if rest.server_hostname:
            args["server_hostname"] = rest.server_hostname
        async with rest.pool_manager.post(api.configuration.host + path, **args) as response:
            data = await response.read()
            if 200 <= response.status <= 299:
                return data
            error = ApiException(status=response.status, reason=response.reason)
            error.body, error.headers = data, response.headers
            raise error
