"""``python -m services.worker [--ingest-only]``: the worker process (what ``flywheel worker`` runs)."""

from services.worker.app import main

main()
