"""Intake: from an incident message to exactly one Job, and from the Job's ending to the ticket.

The consumer edge with the one ack site (``consumer``), incident handling (``incidents``),
admission, the tracker of active investigations, control commands, dead letters, lifecycle
reporting, cost metrics, the dispatcher's phase source (``phases``), the Job watcher and the
dispatcher service that wires them (``service``).

Imports ``credentials``, ``jobs``, ``plumbing`` and ``schemas``.
"""
