"""App factory, lifespan and ``serve()`` (the ``flywheel serve`` entry point). Wiring only.

Process model: uvicorn with ``settings.workers`` processes sharing the HTTP socket. Each worker loads the
champion, follows model/rule events on its own, and runs its own spamd listener on the shared spamd port
(SO_REUSEPORT, the kernel spreads connections): spamd then scales with the workers and serves exactly the
model and rules the same process serves over HTTP, with no second copy of the hot-reload machinery.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request
from starlette.responses import Response

from services.api import metrics
from services.api.deps import ORJSONResponse
from services.api.middleware import GuardedHttpToolsProtocol, GuardMiddleware
from services.api.safety import check_serving_settings
from services.settings import Settings

log = structlog.get_logger(__name__)

_BODY_SCHEMAS = ("ClassifyJSON", "BatchJSON", "FeedbackIn", "PromoteIn", "RuleIn", "ListsIn")

DESCRIPTION = """
Every answer shows both deciders: the rule baseline and the learned model.

**Keys.** Feedback, model and rule calls need an API key (`X-API-Key`, or `Authorization: Bearer`), from the
setting `api_keys` (`FLYWHEEL_API_KEYS`, JSON) or `api_keys_file` (`FLYWHEEL_API_KEYS_FILE`, a JSON file such as
a mounted secret). The identity tied to the key is the reporter of its flags. The server refuses to start on a
non-loopback address while the development keys are configured.

**Roles.** Any key may flag (and classify, which needs no key unless `classify_requires_key`); operator
identities (`operator_identities`) and administrators (`admin_identities`) may also read `/models`, `/rules` and
`/operator/data`; only administrators promote, roll back and change rules. Other keys get 403 there.

**Relay identities.** A key whose identity is listed in `relay_identities` (`FLYWHEEL_RELAY_IDENTITIES`) belongs
to a relay that reports for its own users, such as an IMAP server's Junk-folder hook. On `POST /feedback` and
`DELETE /feedback/{event_id}` it may send `X-Flywheel-User: <name>` (1..128 characters of `A-Z a-z 0-9 . _ @ + -`);
the reporter is then `<relay>:<name>`, and only the same relay naming the same user (or an administrator) may
retract that flag. Without the header the reporter is the relay itself. Any other identity sending the header
gets 403.

**Limits.** Flags are rate-limited per reporter and per key (429 with `Retry-After`), and a key may introduce
only `feedback_new_reporters` new reporters per window. Classification runs on a bounded pool; when it is full
the answer is 503 with `Retry-After`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application (uvicorn calls this as a factory in every worker)."""
    from starlette.concurrency import run_in_threadpool

    from services.api.operator import router as operator_router
    from services.api.routes import router
    from services.api.state import ServingState
    from services.api.userlists import router as user_lists_router
    from services.spamd import start_spamd

    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServingState(settings)
        await run_in_threadpool(state.start)
        app.state.serving = state
        spamd = await start_spamd(state, settings.api_host, settings.spamd_port, timeout_s=settings.client_timeout_s)
        log.info("api worker ready", pid=os.getpid(), model=state.current().version,
                 spamd_port=settings.spamd_port)
        try:
            yield
        finally:
            spamd.close()
            await spamd.wait_closed()
            await run_in_threadpool(state.stop)

    app = FastAPI(
        title="Flywheel",
        version="1.0",
        summary="Spam filter: a rule baseline and a learned model side by side, improved by users' flags.",
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        docs_url=None,  # served below with their assets from the installed package, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    _offline_docs(app)
    app.include_router(router)
    app.include_router(operator_router)
    app.include_router(user_lists_router)
    app.add_middleware(GuardMiddleware, max_body=settings.max_message_bytes, timeout_s=settings.client_timeout_s)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return ORJSONResponse({"detail": errors}, status_code=422)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        from services.api import schemas as s

        for name in _BODY_SCHEMAS:
            model = getattr(s, name)
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[name] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    return app


DOCS_ASSETS = "/docs-assets"
"""Where the Swagger UI and ReDoc scripts are served from (the files of the ``fastapi-offline`` package)."""


def _offline_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with every script, stylesheet and icon served by this server: mail
    servers often have no outbound web access, and FastAPI's default pages load them from a CDN (blank offline)."""
    from pathlib import Path

    import fastapi_offline
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from starlette.responses import HTMLResponse
    from starlette.staticfiles import StaticFiles

    static = Path(fastapi_offline.__file__).resolve().parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=static), name="docs-assets")
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=title,
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
                                   # no validator badge: it is an image from validator.swagger.io
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=title,
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


SWITCH_INTERVAL_S = 0.001
"""How often a thread holding the interpreter lock offers it to the others (Python's default is 5 ms). Scoring
runs on pool threads; the event loop that answers /healthz, /metrics and spamd must get the lock back quickly,
and a request needs it several times, so the default would add tens of milliseconds behind a large message."""


def create_worker_app() -> FastAPI:
    """Entry point of each uvicorn worker process: configure logging, then build the app from the env."""
    import sys

    from services.logging import configure_inherited

    settings = Settings()
    configure_inherited(settings.log_level, settings.log_json)
    if settings.classify_threads > 0:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    return create_app(settings)


def prepare_metrics_dir(settings: Settings) -> None:
    """A clean multiprocess directory for prometheus-client, set before any worker imports it."""
    if settings.workers <= 1:
        os.environ.pop(metrics.MULTIPROC_ENV, None)
        return
    d = settings.state_dir / "api" / f"prometheus-{settings.api_port}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    os.environ[metrics.MULTIPROC_ENV] = str(d)


def serve(settings: Settings) -> None:
    """Run the API (and spamd) until interrupted: ``flywheel serve``."""
    import uvicorn

    from services.api.state import require_champion
    from streams.topics import topic_specs

    check_serving_settings(settings)  # before anything binds, trains or touches Kafka
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    if settings.model_source == "kafka":  # fill this replica's registry once, before its workers start
        from models.registry import Registry
        from services.api.follow import ModelFollower

        ModelFollower(settings, Registry(settings.registry)).catch_up(settings.model_bootstrap_timeout_s)
    version = require_champion(settings)  # before binding: serving never trains (`flywheel setup` does)
    log.info("serving", champion=version, host=settings.api_host, port=settings.api_port,
             spamd_port=settings.spamd_port, workers=settings.workers)
    print(f"==> serving http://{settings.api_host}:{settings.api_port} and spamd on port {settings.spamd_port} "
          f"(champion {version}); logs in {settings.logs / 'api.jsonl'}", file=sys.stderr, flush=True)
    _ensure_topics(settings, topic_specs(settings.streams()))
    os.environ.update(settings.child_env())
    prepare_metrics_dir(settings)
    uvicorn.run(
        "services.api.app:create_worker_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=max(1, settings.workers),
        loop="uvloop",
        http=GuardedHttpToolsProtocol,
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
        # A worker loading onnxruntime and the champion on a busy machine can miss the supervisor's default 5 s
        # health ping and be killed mid-start, again and again.
        timeout_worker_healthcheck=30,
        limit_concurrency=2048,
        backlog=2048,
        h11_max_incomplete_event_size=64 * 1024,
        server_header=False,
    )


def _ensure_topics(settings: Settings, specs: list[tuple[str, int]]) -> None:
    """Create the topics when the broker is up (best effort: the API also starts while Kafka is down)."""
    from services.local.daemon import port_open
    from streams.admin import ensure_topics

    first = settings.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if port.isdigit() and not port_open(int(port), host.strip("[]") or "127.0.0.1"):
        # nothing listens: say so once instead of the Kafka client's retries for ten seconds
        log.warning("kafka unreachable: topics not created; /feedback answers 503 until it is up",
                    bootstrap=settings.bootstrap_servers)
        return
    try:
        ensure_topics(settings.streams(), specs, timeout_s=10.0)
    except Exception as exc:  # noqa: BLE001 - Kafka down at start is allowed; /readyz reports it
        log.warning("topics not created (Kafka unreachable?)", error=str(exc))
