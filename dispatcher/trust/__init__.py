"""Trust: the consumer that tallies operators' verdicts and moves scopes through the autonomy
phases — the service (``service``), the pure policy core (``policy``), the record of real
investigations and the feedback-log entries (``records``), ledger snapshots and the
classification of a ticket's final fields into a verdict (``feedback_classify``).

Imports ``intake`` (the consumer edge, dead letters, sender checks), ``plumbing`` and ``schemas``.
"""
