"""``python -m dispatcher.cli``: the console script without its wrapper."""

from dispatcher.cli.main import main

main()
