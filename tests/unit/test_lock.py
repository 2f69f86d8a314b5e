"""The locks cover what pyproject.toml asks for, pinned with hashes (what .ci/install installs)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _pins(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    return {m[1].lower().replace("_", "-"): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_runtime_dependency_and_build_tool_is_pinned_in_the_runtime_lock() -> None:
    project = _project()
    wanted = _names(project["project"]["dependencies"]) | _names(project["build-system"]["requires"])

    assert wanted - set(_pins("requirements.lock")) == set()


def test_the_test_lock_adds_the_test_extras_and_keeps_every_runtime_pin() -> None:
    runtime, test = _pins("requirements.lock"), _pins("requirements-test.lock")

    assert _names(_project()["project"]["optional-dependencies"]["test"]) - set(test) == set()
    assert {name: test.get(name) for name in runtime} == runtime


def test_every_pin_carries_a_hash_so_pip_installs_in_require_hashes_mode() -> None:
    for lock in ("requirements.lock", "requirements-test.lock"):
        entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", (ROOT / lock).read_text())
        unhashed = [e.split()[0] for e in entries if "==" in e.split("\n")[0] and "--hash=sha256:" not in e]
        assert unhashed == [], lock
