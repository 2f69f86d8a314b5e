"""The ``agentjobs`` console script: the click group (``main``), operator commands (``ops``),
``agentjobs up`` with its preflight, live board and demo.

The top of the house: may import every other package; nothing imports it.
"""
