"""The application's own pages: ``/docs`` and ``/redoc`` load every asset from this server (a mail host often has
no outbound web access, and a page whose scripts come from a CDN is blank there)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.settings import Settings

pytestmark = pytest.mark.unit

_URL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""")
_REF = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    # no lifespan (no ``with``): the pages need no model, no Kafka
    return TestClient(create_app(Settings(state_dir=tmp_path_factory.mktemp("docs"))))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_reference_no_external_url(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert _URL.findall(r.text) == [], r.text
    refs = [a or b for a, b in _REF.findall(r.text)]
    assert any(ref.endswith(".js") for ref in refs) and "/openapi.json" in refs, refs
    for ref in refs:  # every script, stylesheet, icon and the schema answer from this app
        assert ref.startswith("/"), ref
        got = client.get(ref)
        assert got.status_code == 200 and len(got.content) > 100, (ref, got.status_code)


def test_the_swagger_ui_script_is_the_real_bundle(client: TestClient) -> None:
    text = client.get("/docs").text
    script = next(ref for ref in re.findall(r'src="([^"]+)"', text) if ref.endswith(".js"))
    body = client.get(script)
    assert body.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert b"SwaggerUIBundle" in body.content and len(body.content) > 500_000
