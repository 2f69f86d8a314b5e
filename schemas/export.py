"""JSON Schema files for every wire type, committed under ``schemas/json/``.

Consumers in other languages validate against these. ``check`` compares the
committed files with what the code would write, so a stale schema fails CI.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

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


def _normalised(node: Any) -> Any:
    """Descriptions as ``inspect.cleandoc`` leaves them, whatever msgspec release exported them.

    msgspec 0.23 started dedenting docstrings in schemas (0.19 kept their indentation): the
    committed files are a contract, so a library's patch release must not change them.
    """
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k in ("description", "title") and isinstance(v, str)
                else _normalised(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_normalised(v) for v in node]
    return node


def render() -> dict[str, str]:
    """File name → JSON text for every exported type (deterministic, msgspec-release independent)."""
    files = {}
    for type_ in (*WIRE_TYPES, *INTAKE_TYPES):
        schema = _normalised(msgspec.json.schema(type_))
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
