"""The emulator's own tests use its fixtures (and helpers shared below)."""

from tests.support.k8s.fixtures import k8s_emulator, k8s_emulator_factory  # noqa: F401
