"""``python -m services.cli``: the ``flywheel`` command."""

from services.cli import main

main()
