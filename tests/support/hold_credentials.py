"""A stand-in agent for tests: takes its credentials like the real one, then holds them.

Run as a Job's command (``python hold_credentials.py MARKER_DIR MODE``): it
unwraps its token and obtains a PostgreSQL and a RabbitMQ user through the
agent's own code, writes ``MARKER_DIR/<investigation id>.json`` with its pid and
user names, then, by MODE, sleeps until killed (``hold``) or allocates memory
until the limit ends it (``oom``). Tests then end the Job in some way and check
that nothing it held survives.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from agent import config, credentials


async def main(marker_dir: Path, mode: str) -> None:
    env = config.load(os.environ)
    session = await credentials.start(env)
    database = await session.database()
    rabbit = await session.rabbitmq()
    marker = {
        "pid": os.getpid(),
        "database_user": getattr(database, "username", None),
        "rabbitmq_user": rabbit.username,
    }
    tmp = marker_dir / f".{env.investigation_id}.tmp"
    tmp.write_text(json.dumps(marker))
    tmp.rename(marker_dir / f"{env.investigation_id}.json")
    if mode == "oom":
        hog = []
        while True:
            hog.append(bytearray(16 * 1024 * 1024))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
