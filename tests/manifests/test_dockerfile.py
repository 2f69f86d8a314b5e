"""The Dockerfile, linted with a parser: two targets, slim non-root final stages, no build tools.

No image can be built here (no Docker engine), so these checks read the
Dockerfile's instructions (dockerfile-parse) and follow each target's stage
chain (``FROM runtime AS agent`` → ``FROM ${PYTHON_IMAGE} AS runtime``).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field

import pytest
from dockerfile_parse import DockerfileParser

from dispatcher.jobs import jobspec
from dispatcher.plumbing.settings import Settings
from tests.manifests import render

DOCKERFILE = render.ROOT / "Dockerfile"
TARGETS = ("dispatcher", "agent")
PYPROJECT = tomllib.loads((render.ROOT / "pyproject.toml").read_text())
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|make|build-essential|clang|cargo|rustc|git|curl|wget|[\w.+-]+-dev)\b"
)
INSTALLERS = re.compile(r"\b(apt-get|apt|apk|yum|dnf|pip3?|uv|poetry)\s+(install|add)\b|\bpython\S*\s+-m\s+pip\s+install\b")


@dataclass
class Stage:
    name: str
    base: str  # resolved (ARG defaults substituted)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]


def parse(path) -> dict[str, Stage]:
    """The Dockerfile's stages by name (unnamed ones as #index), ARG defaults resolved."""
    parser = DockerfileParser(path=str(path))
    bases = iter(parser.parent_images)  # one per FROM, ARGs resolved
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            parts = value.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = Stage(name, next(bases))
        elif current is not None and instruction != "COMMENT":
            current.instructions.append((instruction, value))
    return stages


STAGES = parse(DOCKERFILE)


def chain(target: str, stages: dict[str, Stage] | None = None) -> list[Stage]:
    """The stages a target's image is made of, the target first."""
    stages = STAGES if stages is None else stages
    found = [stages[target]]
    while found[-1].base in stages:
        found.append(stages[found[-1].base])
    return found


def _last(target: str, instruction: str, stages: dict[str, Stage] | None = None) -> str | None:
    for stage in chain(target, stages):  # the target's own instruction wins over inherited ones
        found = stage.values(instruction)
        if found:
            return found[-1]
    return None


def final_stage_problems(target: str, stages: dict[str, Stage] | None = None) -> list[str]:
    """Installs, build tools, or files not from a build stage in the image a target produces."""
    problems = []
    for stage in chain(target, stages):
        for instruction, value in stage.instructions:
            if instruction == "RUN" and INSTALLERS.search(value):
                problems.append(f"stage {stage.name}: installs: {value}")
            if instruction == "RUN" and BUILD_TOOLS.search(value):
                problems.append(f"stage {stage.name}: build tool: {value}")
            if instruction in ("COPY", "ADD") and not value.startswith("--from="):
                problems.append(f"stage {stage.name}: {instruction} from the build context: {value}")
    return problems


def user_problems(target: str, stages: dict[str, Stage] | None = None) -> list[str]:
    """Why the target's USER is not the numeric non-root user the pods run as."""
    user = _last(target, "USER", stages)
    if user is None:
        return ["no USER: runs as root"]
    uid, _, gid = user.partition(":")
    if not uid.isdigit():
        return [f"USER {user}: not numeric, the kubelet cannot verify runAsNonRoot"]
    if int(uid) != jobspec.NONROOT_UID:
        return [f"USER {user}: not {jobspec.NONROOT_UID} (runAsUser in the Job and Deployments)"]
    if gid and (not gid.isdigit() or int(gid) == 0):
        return [f"USER {user}: group must be numeric and not root"]
    return []


def test_both_targets_exist() -> None:
    assert set(TARGETS) <= set(STAGES)


@pytest.mark.parametrize("target", TARGETS)
def test_final_image_comes_from_a_slim_python_base_that_fits_the_project(target) -> None:
    base = chain(target)[-1].base
    name, tag, _ = render.split_image(base)

    assert "slim" in tag or "distroless" in name, base
    assert name.endswith("python"), base
    version = re.match(r"(\d+)\.(\d+)", tag)
    required = re.match(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert version and required
    assert tuple(map(int, version.groups())) >= tuple(map(int, required.groups()))


@pytest.mark.parametrize("target", TARGETS)
def test_final_image_runs_as_the_numeric_non_root_user_the_pods_expect(target) -> None:
    assert user_problems(target) == []


@pytest.mark.parametrize("target", TARGETS)
def test_no_build_tools_or_installs_in_the_final_image(target) -> None:
    assert final_stage_problems(target) == []


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_the_agentjobs_console_script_on_path(target) -> None:
    entrypoint = json.loads(_last(target, "ENTRYPOINT") or "null")
    script = next(iter(PYPROJECT["project"]["scripts"]))

    assert entrypoint == [script]  # exec form: signals reach the process
    env = " ".join(v for s in chain(target) for v in s.values("ENV"))
    path = re.search(r"PATH=(\S+)", env)
    assert path and "/opt/agentjobs/bin" in path.group(1).split(":")
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem


def test_default_commands_match_what_the_cluster_runs() -> None:
    assert json.loads(_last("agent", "CMD") or "null") == Settings().k8s.agent_command[1:]
    assert json.loads(_last("dispatcher", "CMD") or "null") == ["dispatcher"]


def test_build_stage_installs_the_project_not_an_editable_checkout() -> None:
    final = {stage.name for target in TARGETS for stage in chain(target)}
    runs = " ".join(v for s in STAGES.values() if s.name not in final for v in s.values("RUN"))

    assert re.search(r"pip install --require-hashes -r requirements\.lock", runs)
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs)
    assert "-e " not in runs and "--editable" not in runs


def test_lint_catches_a_root_image_with_build_tools(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:3.11 AS agent\n"
        "RUN apt-get update && apt-get install -y gcc\n"
        "COPY . /src\n"
        "USER app\n"
        'ENTRYPOINT ["agentjobs"]\n'
    )
    stages = parse(bad)

    assert len(final_stage_problems("agent", stages)) == 3
    assert user_problems("agent", stages) != []


def test_dockerignore_keeps_the_context_small() -> None:
    text = (render.ROOT / ".dockerignore").read_text()
    patterns = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    assert patterns[0] == "**"  # ignore everything, then allow exactly what the build copies
    # Every source of every COPY from the build context (the last word is the destination).
    copied = {src for s in STAGES.values() for i, v in s.instructions
              if i == "COPY" and not v.startswith("--from=") for src in v.split()[:-1]}
    assert {p.removeprefix("!") for p in patterns if p.startswith("!")} == copied
