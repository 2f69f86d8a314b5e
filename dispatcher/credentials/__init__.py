"""Credentials: minting and revoking each investigation's Vault token (``tokens``), the sweeper
of orphaned agent tokens (``token_sweep``), ``vault bootstrap`` (``bootstrap``) and the
embedded OpenBao of ``agentjobs up`` (``embedded_openbao``). The Vault paths an agent reads
are part of the wire contract: ``schemas.vault_paths``.

Imports ``jobs``, ``plumbing`` and ``schemas``.
"""
