"""Copies of JSON documents (API objects), fast.

Stored objects are never shared with callers, so the emulator copies on every
read and write. ``copy.deepcopy`` spent most of the emulator's CPU under load
(its memo and dispatch are for arbitrary Python objects); API objects are JSON
data, so a msgspec round trip copies them an order of magnitude faster. Anything
that is not plain JSON (a tuple a test built by hand, say) falls back to
``deepcopy`` so the copy is never lossy.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import msgspec

T = TypeVar("T")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def clone(obj: T) -> T:
    """An independent copy of ``obj``; equal to ``copy.deepcopy(obj)``."""
    if type(obj) in (dict, list):
        try:
            copied = _decode(_encode(obj))
        except (TypeError, msgspec.ValidationError, OverflowError):
            return copy.deepcopy(obj)
        if type(copied) is type(obj) and (copied == obj):
            return copied
        return copy.deepcopy(obj)
    return copy.deepcopy(obj)
