"""Kubernetes resource quantities ("256Mi", "500m", "1e3") as numbers."""

from __future__ import annotations

import re
from decimal import Decimal

_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}
_RE = re.compile(r"^([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")


def parse(text: str | int | float) -> Decimal:
    """Parse a quantity; raises ValueError like apiserver's quantity validation."""
    if isinstance(text, (int, float)):
        return Decimal(str(text))
    m = _RE.match(str(text).strip())
    if not m:
        raise ValueError("quantities must match the regular expression "
                         "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
    number = Decimal(m.group(1))
    if m.group(2):
        return number * Decimal(10) ** int(m.group(2)[1:])
    return number * Decimal(_SUFFIX[m.group(3) or ""])


def is_valid(text: str | int | float) -> bool:
    try:
        parse(text)
    except (ValueError, ArithmeticError):
        return False
    return True
