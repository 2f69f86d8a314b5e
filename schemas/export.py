"""JSON Schema files for every wire type, committed under ``schemas/json/``.

Consumers in other languages validate against these. ``check`` compares the
committed files with what the code would write, so a stale schema fails CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from .alertmanager import AlertmanagerWebhook
from .cloudevents import CloudEvent
from .codec import WIRE_TYPES

SCHEMA_DIR = Path(__file__).parent / "json"
# Intake formats we accept but do not own; exported so producers can validate too.
INTAKE_TYPES = (AlertmanagerWebhook, CloudEvent)


def _file_name(type_: type) -> str:
    tag = getattr(type_.__struct_config__, "tag", None)
    return f"{tag or type_.__name__}.schema.json"


def render() -> dict[str, str]:
    """File name → JSON text for every exported type (deterministic)."""
    files = {}
    for type_ in (*WIRE_TYPES, *INTAKE_TYPES):
        schema = msgspec.json.schema(type_)
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        files[_file_name(type_)] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of files that are missing, different, or no longer produced."""
    wanted = render()
    problems = []
    for name, text in wanted.items():
        path = directory / name
        if not path.exists():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: out of date")
    if directory.exists():
        for path in sorted(directory.glob("*.schema.json")):
            if path.name not in wanted:
                problems.append(f"{path.name}: no longer produced")
    return problems


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Write every schema file; remove ones no longer produced; return the names written."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = render()
    for name, text in wanted.items():
        (directory / name).write_text(text, encoding="utf-8")
    for path in directory.glob("*.schema.json"):
        if path.name not in wanted:
            path.unlink()
    return sorted(wanted)
