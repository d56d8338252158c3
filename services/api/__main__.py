"""``python -m services.api``: serve with settings from the environment (FLYWHEEL_*)."""

from __future__ import annotations

from services.api.app import serve
from services.logging import configure
from services.settings import Settings

if __name__ == "__main__":
    settings = Settings()
    configure(settings.log_level, settings.log_json)
    serve(settings)
