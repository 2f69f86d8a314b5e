"""The Alertmanager webhook bridge: HTTP in, confirmed publishes to ``agentjobs.incidents`` out.

Imports ``plumbing`` and ``schemas`` only (it runs internet-facing, with the least code).
"""
