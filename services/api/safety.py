"""Checks that refuse to serve with settings that are only safe on a developer's own machine.

The defaults carry working keys (``dev-admin-key`` administers) so that ``make run`` works out of the box on
loopback. The same defaults on an address other machines reach would hand the admin API and the feedback
loop to anyone on the network, so ``flywheel serve`` refuses to start then and names the settings to change.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.settings import Settings

DEV_KEYS = frozenset({"dev-admin-key", "dev-user-key"})
"""The keys of the default settings (README's examples): public knowledge, never valid off loopback."""

RELAY_USER = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
"""What a relay's ``X-Flywheel-User`` and a spamd ``User:`` may be (no ':' : it separates namespaces)."""

SPAMD_NAMESPACE = "spamd"
"""Reporter namespace of spamd TELL: ``User: carol`` reports as ``spamd:carol``."""


class UnsafeSettings(RuntimeError):
    """The settings would expose the service; the message says which setting to change."""

    user_facing = True


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (``localhost``, 127.0.0.0/8, ::1); anything else,
    including ``0.0.0.0``, ``""`` and host names, counts as reachable from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_serving_settings(settings: Settings) -> None:
    """Raise ``UnsafeSettings`` for settings the API must not start with (called before anything binds)."""
    dev = sorted(DEV_KEYS.intersection(settings.api_keys))
    if dev and not is_loopback(settings.api_host):
        raise UnsafeSettings(
            f"refusing to serve on {settings.api_host or '(all addresses)'} with the development API key(s) "
            f"{', '.join(dev)}: set FLYWHEEL_API_KEYS (JSON) or FLYWHEEL_API_KEYS_FILE to your own keys, "
            "or bind FLYWHEEL_API_HOST to a loopback address (127.0.0.1)"
        )
    identities = set(settings.api_keys.values())
    for ident in sorted(identities):
        if ":" in ident or ident == SPAMD_NAMESPACE:
            raise UnsafeSettings(
                f"FLYWHEEL_API_KEYS: identity {ident!r} is reserved ('{SPAMD_NAMESPACE}' and names with ':' are "
                "the reporter namespaces of spamd and of relays)"
            )
    for relay in settings.relay_identities:
        if len(relay) > 120:
            raise UnsafeSettings(f"FLYWHEEL_RELAY_IDENTITIES: {relay[:40]!r}... is longer than 120 characters "
                                 "(a reporter '<relay>:<user>' must fit in 256)")
    missing = sorted(set(settings.relay_identities) - identities)
    if missing:
        raise UnsafeSettings(
            f"FLYWHEEL_RELAY_IDENTITIES: {', '.join(missing)} is not an identity of FLYWHEEL_API_KEYS"
        )
    for entry in settings.spamd_tell_clients:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise UnsafeSettings(
                f"FLYWHEEL_SPAMD_TELL_CLIENTS: {entry!r} is not an address or network (CIDR)"
            ) from None
    secret = settings.spamd_tell_secret
    if secret is not None and len(secret.get_secret_value()) < 16:
        raise UnsafeSettings("FLYWHEEL_SPAMD_TELL_SECRET must be at least 16 characters")
