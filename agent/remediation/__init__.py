"""Carrying out the actions the phase gate allows: one protocol for every executor.

``protocol``: the executor interface (precondition, act once, verify, undo), the
``execute`` protocol with its outcomes, and the idempotency ledger (in memory, or a
file in the Job's working directory). ``postgres``: executors for the PostgreSQL
actions (imported only by a Job that has the postgres tool). Imports ``schemas``
only (``agent.reasoning.actions`` imports this package, not the other way round).
"""

from .protocol import (
    Entry,
    Execution,
    FileLedger,
    Ledger,
    MemoryLedger,
    Outcome,
    RemediationExecutor,
    Result,
    execute,
    follows_protocol,
    idempotency_key,
    no_undo,
)

__all__ = [
    "Entry",
    "Execution",
    "FileLedger",
    "Ledger",
    "MemoryLedger",
    "Outcome",
    "RemediationExecutor",
    "Result",
    "execute",
    "follows_protocol",
    "idempotency_key",
    "no_undo",
]
