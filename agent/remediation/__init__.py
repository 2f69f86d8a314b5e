"""Carrying out the actions the phase gate allows: one protocol for every executor.

``protocol``: the executor interface (precondition, act once, verify, undo), the
``execute`` protocol with its outcomes, and the idempotency ledger (in memory, or a
file in the Job's working directory). ``claims``: the claim store shared by every pod
and Job of an investigation (create-only claims in Vault KV), consulted besides that
ledger. ``postgres``: executors for the PostgreSQL actions (imported only by a Job
that has the postgres tool). Imports ``schemas``
only (``agent.reasoning.actions`` imports this package, not the other way round).
"""

from .protocol import (
    ClaimStore,
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
    shared_claims,
)

__all__ = [
    "ClaimStore",
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
    "shared_claims",
]
