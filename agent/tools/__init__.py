"""The agent's data sources: each a ``Tool`` with named, bounded operations (see ``base``)."""
