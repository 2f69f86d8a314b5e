"""Shared plumbing: settings, the AMQP connection and topology, retries, metrics, health, tasks,
stream logs and signal handling.

May import ``schemas`` only — never a subsystem package — so every subsystem can use it.
"""
