"""Rendered manifests, built once per test session (Python renderer; see render.py)."""

from __future__ import annotations

import pytest

from tests.manifests import render

OVERLAY_NAMES = sorted(render.OVERLAYS)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[render.Obj]]:
    """Objects of each overlay, by overlay name."""
    return {name: render.render(path) for name, path in render.OVERLAYS.items()}


@pytest.fixture(params=OVERLAY_NAMES)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[render.Obj]]) -> list[render.Obj]:
    """The objects of one overlay (the test runs once per overlay)."""
    return rendered[request.param]


@pytest.fixture
def deployed(overlay: list[render.Obj], tmp_path):
    """The dispatcher's effective settings in that overlay (ConfigMap TOML + its env)."""
    return render.deployed_settings(overlay, tmp_path)
