"""What the database scenarios need on the machine: a PostgreSQL server binary, Prometheus, the
postgres exporter and Alertmanager (Debian packages; ``.ci/run`` installs them)."""

from __future__ import annotations

import pytest

from tests.support.alertmanager import ALERTMANAGER
from tests.support.alertmanager import MISSING as ALERTMANAGER_MISSING
from tests.support.observability import (
    EXPORTER_MISSING,
    POSTGRES_EXPORTER,
    PROMETHEUS,
    PROMETHEUS_MISSING,
)
from tests.support.two_am import POSTGRES_BIN, POSTGRES_MISSING

NEEDS_OBSERVABILITY_STACK = [
    pytest.mark.skipif(POSTGRES_BIN is None, reason=POSTGRES_MISSING),
    pytest.mark.skipif(PROMETHEUS is None, reason=PROMETHEUS_MISSING),
    pytest.mark.skipif(POSTGRES_EXPORTER is None, reason=EXPORTER_MISSING),
    pytest.mark.skipif(ALERTMANAGER is None, reason=ALERTMANAGER_MISSING),
]
