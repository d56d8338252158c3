"""A real browser for the operator page: Debian's ``chromium``, headless, driven by playwright.

``screenshot_page`` loads a URL, waits until the page says it has drawn (a JavaScript condition), and returns what
a person at the screen would have seen go wrong: console errors, uncaught exceptions, failed requests and HTTP
error answers, with the screenshot's path. Playwright never downloads a browser here: it launches the system's
chromium (``executable_path``) with ``PLAYWRIGHT_BROWSERS_PATH`` pointed at an empty directory, and with
Chromium's own background traffic (updates, sync, field trials) switched off, so nothing leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from services.settings import Settings

log = structlog.get_logger(__name__)

__all__ = [
    "OPERATOR_READY",
    "BrowserMissing",
    "PageWatch",
    "chromium_path",
    "open_page",
    "operator_key",
    "operator_url",
    "screenshot_operator_page",
    "screenshot_page",
]

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
)
"""``--no-sandbox``: root (containers, CI) cannot use Chromium's sandbox. The background-networking flags keep
Chromium from calling out (a closed network refuses it, and the page must not depend on the outside)."""

OPERATOR_READY = "body[data-state=ready]"
"""The operator page sets ``data-state="ready"`` on <body> once it has drawn its data."""


class BrowserMissing(RuntimeError):
    """No chromium on this machine."""


def chromium_path() -> str:
    """The system chromium, or :class:`BrowserMissing` saying how to install it."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    raise BrowserMissing("no chromium found: install Debian's package (apt-get install chromium, or "
                         "deploy/system-deps.sh)")


@contextmanager
def _no_browser_downloads() -> Iterator[None]:
    """Playwright's driver inherits the environment: point its browser cache at an empty temporary directory."""
    saved = {k: os.environ.get(k) for k in ("PLAYWRIGHT_BROWSERS_PATH", "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD")}
    with tempfile.TemporaryDirectory(prefix="flywheel-pw-") as empty:
        os.environ["PLAYWRIGHT_BROWSERS_PATH"] = empty
        os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@dataclass(slots=True)
class PageWatch:
    """A page open in the browser and what went wrong on it so far (filled as events arrive)."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return self.console_errors + self.page_errors + self.failed_requests + self.http_errors

    def box(self, selector: str) -> dict[str, float] | None:
        """Bounding box of ``selector`` in page coordinates (those of a full-page screenshot)."""
        handle = self.page.query_selector(selector)
        box = handle.bounding_box() if handle is not None else None
        if box is None:
            return None
        sx, sy = self.page.evaluate("() => [window.scrollX, window.scrollY]")
        return {**box, "x": box["x"] + sx, "y": box["y"] + sy}

    def settle(self) -> None:
        """Two animation frames: what was drawn is painted before a screenshot."""
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


@contextmanager
def open_page(viewport: tuple[int, int] = (1400, 1000), *, executable: str | None = None,
              timeout_s: float = 30.0) -> Iterator[PageWatch]:
    """A fresh headless chromium with one empty page whose console errors, uncaught exceptions, failed requests
    and HTTP error answers are collected; closed on exit. Raises :class:`BrowserMissing` without chromium."""
    from playwright.sync_api import sync_playwright

    exe = executable or chromium_path()
    with _no_browser_downloads(), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=list(CHROMIUM_ARGS),
                                     timeout=timeout_s * 1000)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                          device_scale_factor=1, service_workers="block")
            context.set_default_timeout(timeout_s * 1000)
            page = context.new_page()
            w = PageWatch(page)
            page.on("console", lambda m: w.console_errors.append(f"{m.text} ({m.location.get('url', '')})")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: w.page_errors.append(str(e)))
            page.on("requestfailed", lambda r: w.failed_requests.append(f"{r.method} {r.url}: {r.failure}"))
            page.on("response", lambda r: w.http_errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            yield w
            context.close()
        finally:
            browser.close()


def screenshot_page(
    url: str,
    path: Path,
    *,
    ready: str | None = None,
    timeout_s: float = 30.0,
    viewport: tuple[int, int] = (1400, 1000),
    full_page: bool = True,
    executable: str | None = None,
    boxes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load ``url`` in headless chromium, wait until the CSS selector ``ready`` matches (when given), screenshot.

    A selector rather than a JavaScript condition: playwright polls conditions through ``eval``, which a page
    with a strict Content-Security-Policy (the operator page's) forbids.

    Returns ``path``, ``url`` (without its fragment, which may hold a key), ``title``, ``load_s`` (navigation
    until ready), ``console_errors`` (console messages of type error), ``page_errors`` (uncaught exceptions),
    ``failed_requests`` (network failures), ``http_errors`` (answers >= 400) and ``boxes`` (the page-coordinates
    bounding box of each CSS selector in ``boxes``, for pixel checks on the screenshot).
    Raises :class:`BrowserMissing` without chromium, and TimeoutError when ``ready`` never matches.
    """
    from playwright.sync_api import Error as PlaywrightError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = url.split("#", 1)[0]
    with open_page(viewport, executable=executable, timeout_s=timeout_s) as w:
        t0 = time.monotonic()
        w.page.goto(url, wait_until="load", timeout=timeout_s * 1000)
        if ready:
            try:
                w.page.wait_for_selector(ready, state="attached", timeout=timeout_s * 1000)
            except PlaywrightError as exc:
                w.page.screenshot(path=str(path), full_page=full_page)
                raise TimeoutError(f"{shown}: {ready!r} did not match within {timeout_s:g}s (screenshot {path}); "
                                   f"problems: {w.problems[:10]}") from exc
        load_s = time.monotonic() - t0
        w.settle()
        found = {sel: w.box(sel) for sel in boxes}
        w.page.screenshot(path=str(path), full_page=full_page)
        result = {"path": str(path), "url": shown, "title": w.page.title(), "load_s": round(load_s, 3),
                  "console_errors": list(w.console_errors), "page_errors": list(w.page_errors),
                  "failed_requests": list(w.failed_requests), "http_errors": list(w.http_errors), "boxes": found}
    log.info("page screenshot", url=shown, path=str(path), load_s=result["load_s"],
             console_errors=len(result["console_errors"]), page_errors=len(result["page_errors"]),
             failed_requests=len(result["failed_requests"]))
    return result


def operator_key(settings: Settings) -> str:
    """A configured key whose identity may read the operator page's data (an admin or operator identity)."""
    allowed = set(settings.admin_identities) | set(settings.operator_identities)
    for key, ident in settings.api_keys.items():
        if ident in allowed:
            return key
    raise ValueError("no API key of an admin or operator identity is configured: the operator page needs one")


def operator_url(settings: Settings, *, with_key: bool = False) -> str:
    """The running API's operator page; ``with_key``: with an operator key in the fragment (never sent)."""
    from urllib.parse import quote

    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::", "") else settings.api_host  # noqa: S104 - reads a wildcard bind, binds nothing
    url = f"http://{host}:{settings.api_port}/operator"
    return f"{url}#key={quote(operator_key(settings), safe='')}" if with_key else url


def screenshot_operator_page(settings: Settings, path: Path, *, timeout_s: float = 30.0) -> Path:
    """Screenshot the running API's operator page once it has drawn (the replay's report keeps it).

    The key travels in the URL fragment, which the browser never sends to the server. Console errors and failed
    requests are logged as warnings; a page that never draws raises TimeoutError.
    """
    result = screenshot_page(operator_url(settings, with_key=True), path, ready=OPERATOR_READY, timeout_s=timeout_s)
    problems = result["console_errors"] + result["page_errors"] + result["failed_requests"] + result["http_errors"]
    if problems:
        log.warning("operator page problems", problems=problems[:20])
    return Path(result["path"])
