"""Hypothesis strategies for hostile payloads: raw bytes, arbitrary JSON, and valid payloads mutated.

Mutations start from every format we accept (Alertmanager v4, CloudEvents 1.0 in
both modes, our own ``IncidentEvent``) and the feedback/phase wire messages, then
delete keys, swap values for arbitrary JSON, wrap, truncate or re-encode them —
the inputs most likely to reach deep into the decoders.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any

from hypothesis import strategies as st

from schemas import encode, utcnow
from schemas.codec import decode_incident
from tests.support.payloads import SAMPLE_WEBHOOK, am_alert, cloudevent, group

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False), st.text(max_size=40),
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=12,
)


def _seeds() -> list[Any]:
    alerts = [am_alert(starts_at="2026-11-27T02:00:00Z", instance=f"db-{i}") for i in range(3)]
    webhook = group(alerts)
    own = json.loads(encode(decode_incident(json.dumps(webhook).encode())))
    return [
        SAMPLE_WEBHOOK,
        webhook,
        own,
        cloudevent(webhook),
        {**cloudevent(None), "data_base64": base64.b64encode(json.dumps(webhook).encode()).decode()},
        {"kind": "feedback", "feedback_id": "f", "investigation_id": "i", "scope": "db", "phase": "shadow",
         "verdict": "accepted", "at": utcnow().isoformat()},
        {"kind": "phase_pin", "command_id": "c", "scope": "db", "phase": "read-only", "reason": "r",
         "at": utcnow().isoformat()},
        {"kind": "cancel", "job_name": "aj-x"},
    ]


SEEDS = _seeds()
def _keys(value: Any, out: set[str]) -> set[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            out.add(k)
            _keys(v, out)
    elif isinstance(value, list):
        for v in value:
            _keys(v, out)
    return out


KNOWN_KEYS = sorted(_keys(SEEDS, set()))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _replace(value: Any, path: tuple, new: Any, delete: bool) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        if delete and not rest:
            copy.pop(head, None)
        else:
            copy[head] = _replace(value[head], rest, new, delete)
        return copy
    copy_list = list(value)
    if delete and not rest:
        copy_list.pop(head)
    else:
        copy_list[head] = _replace(value[head], rest, new, delete)
    return copy_list


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid payload with a few fields deleted, replaced or renamed, then encoded (sometimes badly)."""
    value = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        choice = draw(st.integers(min_value=0, max_value=3))
        if choice == 0 and path:
            value = _replace(value, path, None, delete=True)
        elif choice == 1:
            value = _replace(value, path, draw(JSON), delete=False)
        elif choice == 2 and isinstance(value, dict):
            value = {**value, draw(st.sampled_from(KNOWN_KEYS)): draw(JSON)}
        else:
            value = _replace(value, path, draw(st.sampled_from([[], {}, "", 0, -1, "x" * 600, None])), delete=False)
    body = json.dumps(value).encode()
    how = draw(st.integers(min_value=0, max_value=9))
    if how == 0:
        body = body[: draw(st.integers(min_value=0, max_value=len(body)))]
    elif how == 1:
        body = body.decode().encode("utf-16")
    elif how == 2:
        body = b"\xef\xbb\xbf" + body
    return body


PAYLOADS = st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),
    mutated(),
    mutated(),
)


# -- bulk: hypothesis draws a seeded Random, plain Python mutates from it (fast, reproducible) ---------

_ODD = [[], {}, "", 0, -1, 1.5, True, None, "x" * 600, "\u0000", "ü" * 3, 2**70, -(2**63), "2026-13-40T99:00:00Z",
        "{{", '"kind": "feedback"', "aj-" + "a" * 70]


def _rand_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(2**40), 2**40)
    if kind == 3:
        return "".join(chr(rng.randrange(0x20, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice(_ODD)
    if kind in (5, 6):
        return {rng.choice(KNOWN_KEYS) if rng.random() < 0.7 else str(rng.random()): _rand_json(rng, depth + 1)
                for _ in range(rng.randrange(5))}
    return [_rand_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def _rand_mutation(rng: random.Random) -> bytes:
    value = rng.choice(SEEDS)
    for _ in range(rng.randint(1, 4)):
        path = rng.choice(_paths(value))
        op = rng.randrange(4)
        if op == 0 and path:
            value = _replace(value, path, None, delete=True)
        elif op == 1:
            value = _replace(value, path, _rand_json(rng), delete=False)
        elif op == 2 and isinstance(value, dict):
            value = {**value, rng.choice(KNOWN_KEYS): _rand_json(rng)}
        else:
            value = _replace(value, path, rng.choice(_ODD), delete=False)
    body = json.dumps(value).encode()
    how = rng.randrange(10)
    if how == 0:
        body = body[: rng.randrange(len(body) + 1)]
    elif how == 1:
        body = bytearray(body)
        for _ in range(rng.randint(1, 5)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        body = bytes(body)
    elif how == 2:
        body = b"\xef\xbb\xbf" + body
    return body


def random_payloads(rng: random.Random, n: int) -> list[bytes]:
    """``n`` hostile payloads: mostly mutated valid ones, some arbitrary JSON, some raw bytes."""
    out = []
    for _ in range(n):
        pick = rng.random()
        if pick < 0.1:
            out.append(rng.randbytes(rng.randrange(200)))
        elif pick < 0.3:
            out.append(json.dumps(_rand_json(rng)).encode())
        else:
            out.append(_rand_mutation(rng))
    return out


BATCH = 20  # payloads per hypothesis example in the bulk runs
