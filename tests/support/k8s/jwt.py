"""RS256 JSON Web Tokens in pure Python, so ServiceAccount tokens look like the real thing.

OpenBao's kubernetes auth parses the JWT (it insists on an RS/ES algorithm)
before asking TokenReview; the emulator therefore signs with a real RSA key
(generated once per process, no third-party crypto dependency) and publishes
it at /openid/v1/jwks.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import secrets

_SMALL_PRIMES = [p for p in range(3, 2000, 2) if all(p % d for d in range(3, int(p**0.5) + 1, 2))]
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _probably_prime(n: int, rounds: int = 24) -> bool:
    if any(n % p == 0 for p in _SMALL_PRIMES):
        return n in _SMALL_PRIMES
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
        if _probably_prime(candidate):
            return candidate


class RsaKey:
    def __init__(self, bits: int = 2048, e: int = 65537) -> None:
        while True:
            p, q = _prime(bits // 2), _prime(bits // 2)
            phi = (p - 1) * (q - 1)
            if p != q and phi % e:
                break
        self.n, self.e, self.d = p * q, e, pow(e, -1, phi)
        self.size = (self.n.bit_length() + 7) // 8
        self.kid = b64url(hashlib.sha256(self.n.to_bytes(self.size, "big")).digest())

    def _em(self, message: bytes) -> int:
        t = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        em = b"\x00\x01" + b"\xff" * (self.size - len(t) - 3) + b"\x00" + t
        return int.from_bytes(em, "big")

    def sign(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256."""
        return pow(self._em(message), self.d, self.n).to_bytes(self.size, "big")

    def verify(self, message: bytes, signature: bytes) -> bool:
        return pow(int.from_bytes(signature, "big"), self.e, self.n) == self._em(message)

    def jwk(self) -> dict:
        return {"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256",
                "n": b64url(self.n.to_bytes(self.size, "big")),
                "e": b64url(self.e.to_bytes(3, "big"))}


@functools.cache
def process_key() -> RsaKey:
    """One signing key per test process: generating RSA in pure Python takes a moment."""
    return RsaKey()


def encode(claims: dict, key: RsaKey) -> str:
    header = {"alg": "RS256", "kid": key.kid}
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode()))
    return signing_input + "." + b64url(key.sign(signing_input.encode()))


def decode_verified(token: str, key: RsaKey) -> dict | None:
    """Claims if the signature is ours, else None (expiry is the caller's business)."""
    try:
        head, body, sig = token.split(".")
        if not key.verify(f"{head}.{body}".encode(), b64url_decode(sig)):
            return None
        return json.loads(b64url_decode(body))
    except (ValueError, json.JSONDecodeError):
        return None
