"""Jobs: the runtime port (``runtime``), the Kubernetes and local runtimes (``kubernetes``,
``local``, with ``process`` containment), what a Job is made of (``jobspec``), Kubernetes error
mapping and the factory that picks a runtime (``runtimes``).

Imports ``plumbing`` and ``schemas``; knows nothing of messages, credentials or trust.
"""
