"""``agentjobs tickets``: one ticket per investigation in a real ticketing system, and back.

* ``plan`` (pure): a result message → the ticket operations it implies;
* ``render`` (pure): what a ticket shows (the alerts, the ranked hypotheses with evidence,
  actions, cost, lifecycle) and the connector's private record of a finding;
* ``backend``: the small interface every ticketing system implements; ``redmine`` and
  ``webhook`` are the two backends;
* ``verdicts`` (pure): a ticket an operator closed → ``OperatorFeedback``;
* ``service``: the consumer of ``agentjobs.tickets`` and the poller of closed tickets.
"""
