"""The agentjobs control plane, one sub-package per subsystem.

``plumbing`` (shared, imports no subsystem) ← ``jobs`` ← ``credentials`` ← ``intake`` ← ``trust``,
``bridge`` ← ``cli`` (the console script, composes everything). The wire contract both the
control plane and the agent use lives in ``schemas``; ``agent`` never imports ``dispatcher``.
"""
