"""The house rules, read off the source: who may import whom.

``agent/`` runs inside the untrusted Job and carries the wire contract only (``schemas``);
``dispatcher``'s sub-packages form layers without cycles, and the plumbing imports no
subsystem. Imports are read with ``ast`` (every ``import`` / ``from … import``, also the ones
inside functions), so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBSYSTEMS = ("plumbing", "jobs", "credentials", "intake", "trust", "bridge", "tickets", "cli")
# what each sub-package may import besides itself and ``schemas``
ALLOWED = {
    "plumbing": set(),
    "jobs": {"plumbing"},
    "credentials": {"jobs", "plumbing"},
    "intake": {"credentials", "jobs", "plumbing"},
    "trust": {"intake", "plumbing"},
    "bridge": {"plumbing"},
    "tickets": {"credentials", "intake", "plumbing", "trust"},
    "cli": {"bridge", "credentials", "intake", "jobs", "plumbing", "tickets", "trust"},
}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def _sources(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def _subsystem(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "dispatcher" and parts[1] in SUBSYSTEMS else None


def test_the_agent_depends_on_the_wire_contract_only() -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "dispatcher")
                 for p in _sources("agent")}

    assert {f: ms for f, ms in offenders.items() if ms} == {}


def test_schemas_import_nothing_of_the_control_plane_or_the_agent() -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                                  if m.split(".")[0] in ("dispatcher", "agent"))
                 for p in _sources("schemas")}

    assert {f: ms for f, ms in offenders.items() if ms} == {}


@pytest.mark.parametrize("package", SUBSYSTEMS)
def test_each_subsystem_imports_only_the_layers_below_it(package: str) -> None:
    wrong: dict[str, set[str]] = defaultdict(set)
    for path in _sources(f"dispatcher/{package}"):
        for module in imported_modules(path):
            other = _subsystem(module)
            if other and other != package and other not in ALLOWED[package]:
                wrong[str(path.relative_to(ROOT))].add(other)
            if module.split(".")[0] == "agent" and package != "cli":  # `agentjobs agent` runs it
                wrong[str(path.relative_to(ROOT))].add("agent")

    assert dict(wrong) == {}


def test_the_allowed_layers_have_no_cycle() -> None:
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert seen.get(node) != 1, f"cycle: {' -> '.join((*path, node))}"
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for dep in ALLOWED[node]:
            visit(dep, (*path, node))
        seen[node] = 2

    for package in SUBSYSTEMS:
        visit(package, ())


def test_every_dispatcher_module_lives_in_a_subsystem_package() -> None:
    loose = [p.name for p in (ROOT / "dispatcher").glob("*.py") if p.name != "__init__.py"]

    assert loose == []
    assert {p.name for p in (ROOT / "dispatcher").iterdir() if (p / "__init__.py").exists()} == set(SUBSYSTEMS)


def test_the_graph_reader_sees_relative_and_lazy_imports() -> None:
    sample = ROOT / "dispatcher" / "jobs" / "runtimes.py"

    assert "dispatcher.jobs.kubernetes" in imported_modules(sample)  # imported inside a function
