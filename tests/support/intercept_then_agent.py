"""A Job command for tests: an attacker unwraps the Job's token first, then the real agent runs.

``python intercept_then_agent.py AGENTJOBS_EXECUTABLE`` reads the wrapping token
from the Job's input (as anything with access to the Secret could), unwraps it,
then replaces itself with ``agentjobs agent``, which must find the token already
used and fail closed.
"""

from __future__ import annotations

import os
import sys

import hvac

from agent import config

env = config.load(os.environ)
stolen = env.wrapped_token_file.read_text().strip()
hvac.Client(url=env.vault_addr, token=stolen).sys.unwrap()  # the interception
os.execv(sys.argv[1], [sys.argv[1], "agent"])
