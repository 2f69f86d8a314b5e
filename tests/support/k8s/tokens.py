"""Who a bearer token is: the admin token, minted ServiceAccount JWTs, and tokens tests register.

Backs request authentication (for RBAC mode), the TokenRequest subresource,
projected ServiceAccount token volumes, and TokenReview — the call OpenBao's
kubernetes auth makes to decide whether an agent's JWT is genuine.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from . import jwt
from .clock import Clock
from .resources import PODS, SERVICEACCOUNTS
from .store import Store

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ADMIN_TOKEN = "emulator-admin-token"
ADMIN_USER = "kubernetes-admin"
NODE_NAME = "emulator-node"
NODE_UID = "00000000-0000-4000-8000-000000000001"


@dataclass
class Identity:
    username: str
    uid: str = ""
    groups: list[str] = field(default_factory=list)
    audiences: list[str] = field(default_factory=lambda: [API_AUDIENCE])
    expires: float | None = None
    extra: dict[str, list[str]] = field(default_factory=dict)
    # For bound ServiceAccount tokens: the objects whose deletion invalidates them.
    sa: tuple[str, str, str] | None = None  # (namespace, name, uid)
    pod: tuple[str, str, str] | None = None  # (namespace, name, uid)

    @property
    def is_admin(self) -> bool:
        return "system:masters" in self.groups


def sa_username(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def sa_groups(namespace: str) -> list[str]:
    return ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
            "system:authenticated"]


class Tokens:
    def __init__(self, clock: Clock, store: Store, issuer: str = API_AUDIENCE) -> None:
        self.clock, self.store, self.issuer = clock, store, issuer
        self.key = jwt.process_key()
        self._static: dict[str, Identity] = {
            ADMIN_TOKEN: Identity(ADMIN_USER, groups=["system:masters", "system:authenticated"]),
        }
        self._revoked: set[str] = set()

    def register(self, token: str, namespace: str, service_account: str, uid: str,
                 audiences: list[str] | None = None, expires: float | None = None) -> None:
        """Declare an arbitrary token valid for a ServiceAccount (e.g. a hand-made JWT)."""
        self._static[token] = Identity(
            sa_username(namespace, service_account), uid, sa_groups(namespace),
            list(audiences or [API_AUDIENCE]), expires,
        )

    def register_user(self, token: str, username: str, groups: list[str] | None = None) -> None:
        """A plain user token (e.g. for RBAC tests)."""
        self._static[token] = Identity(username, str(uuid.uuid4()),
                                       list(groups or ["system:authenticated"]))

    def revoke(self, token: str) -> None:
        self._revoked.add(token)

    def mint(self, namespace: str, service_account: str, sa_uid: str,
             audiences: list[str] | None = None, expiration_seconds: int = 3600,
             pod: dict | None = None) -> tuple[str, float]:
        """Sign a bound ServiceAccount JWT like the TokenRequest API; returns (token, exp)."""
        now = int(self.clock.time())
        exp = now + int(expiration_seconds)
        claims: dict = {
            "aud": list(audiences or [API_AUDIENCE]),
            "exp": exp,
            "iat": now,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": sa_uid},
            },
            "nbf": now,
            "sub": sa_username(namespace, service_account),
        }
        if pod is not None:
            claims["kubernetes.io"]["node"] = {"name": NODE_NAME, "uid": NODE_UID}
            claims["kubernetes.io"]["pod"] = {"name": pod["metadata"]["name"],
                                              "uid": pod["metadata"]["uid"]}
        return jwt.encode(claims, self.key), float(exp)

    def _from_jwt(self, token: str) -> Identity | None:
        claims = jwt.decode_verified(token, self.key)
        if not claims or "serviceaccount" not in claims.get("kubernetes.io", {}):
            return None
        k = claims["kubernetes.io"]
        ns, sa = k["namespace"], k["serviceaccount"]
        extra = {"authentication.kubernetes.io/credential-id": [f"JTI={claims['jti']}"]}
        pod = None
        if "pod" in k:
            pod = (ns, k["pod"]["name"], k["pod"]["uid"])
            extra.update({
                "authentication.kubernetes.io/node-name": [k["node"]["name"]],
                "authentication.kubernetes.io/node-uid": [k["node"]["uid"]],
                "authentication.kubernetes.io/pod-name": [k["pod"]["name"]],
                "authentication.kubernetes.io/pod-uid": [k["pod"]["uid"]],
            })
        return Identity(sa_username(ns, sa["name"]), sa["uid"], sa_groups(ns),
                        list(claims["aud"]), float(claims["exp"]), extra,
                        (ns, sa["name"], sa["uid"]), pod)

    def _lookup(self, token: str) -> tuple[Identity | None, str]:
        """(identity, error) — error texts follow the apiserver's authenticators."""
        if not token or token in self._revoked:
            return None, "Token has been invalidated" if token else "token is empty"
        ident = self._static.get(token) or self._from_jwt(token)
        if ident is None:
            return None, "square/go-jose: error in cryptographic primitive"
        if ident.expires is not None and self.clock.time() >= ident.expires:
            return None, "service account token has expired"
        if ident.sa is not None:
            ns, name, uid = ident.sa
            sa = self.store.get(SERVICEACCOUNTS, ns, name)
            if sa is None or sa["metadata"]["uid"] != uid:
                return None, (f'service account {ns}/{name} has been deleted'
                              if sa is None else "service account UID mismatch")
        if ident.pod is not None:
            ns, name, uid = ident.pod
            pod = self.store.get(PODS, ns, name)
            if pod is None or pod["metadata"]["uid"] != uid:
                return None, f'pod "{name}" not found'
        return ident, ""

    def authenticate(self, token: str | None) -> Identity | None:
        """Identity for an API request's bearer token (must be meant for the API server)."""
        ident, _ = self._lookup(token or "")
        if ident is None or (API_AUDIENCE not in ident.audiences and not ident.is_admin):
            return None
        return ident

    def review(self, token: str, audiences: list[str] | None) -> dict:
        """The `status` of a TokenReview."""
        ident, error = self._lookup(token)
        if ident is None:
            return {"user": {}, "error": f"[invalid bearer token, {error}]"}
        wanted = list(audiences or [API_AUDIENCE])
        matched = [a for a in wanted if a in ident.audiences]
        if not matched:
            got = ", ".join(f'"{a}"' for a in ident.audiences)
            want = ", ".join(f'"{a}"' for a in wanted)
            return {"user": {}, "error": f"[invalid bearer token, token audiences [{got}] is "
                                         f"invalid for the target audiences [{want}], unknown]"}
        user: dict = {"username": ident.username, "uid": ident.uid, "groups": ident.groups}
        if ident.extra:
            user["extra"] = ident.extra
        return {"authenticated": True, "user": user, "audiences": matched}
