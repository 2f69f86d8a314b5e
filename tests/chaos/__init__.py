"""Chaos tests (issue 10): the pipeline under faults, with bounded loops that stop by themselves, loopback only."""
