"""The emulator's own tests; its fixtures come from tests/conftest.py (pytest_plugins)."""
