"""An agent telling the dispatcher which Vault token it logged in with (kubernetes auth mode).

In per-investigation mode the dispatcher minted the token and knows its
accessor. In kubernetes mode the agent logs in itself, so it publishes its
token's accessor (an identifier, not a secret) at once; the dispatcher records
it on the Job and revokes it when the Job ends, like a minted one.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .base import Id, Timestamp, Wire


class CredentialsIssued(Wire, tag="credentials_issued", kw_only=True):
    investigation_id: Id
    job_name: Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
    token_accessor: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    at: Timestamp
