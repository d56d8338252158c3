"""``python -m services.api``: serve with settings from the environment (FLYWHEEL_*)."""

from __future__ import annotations

from services.api.app import serve
from services.logging import configure
from services.settings import Settings

if __name__ == "__main__":
    import sys

    from pydantic import ValidationError

    from services.api.safety import UnsafeSettings
    from services.settings import SettingsError

    try:
        settings = Settings()
        configure(settings.log_level, settings.log_json)
        serve(settings)
    except (UnsafeSettings, SettingsError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
