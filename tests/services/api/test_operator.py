"""The operator page against a real API (two worker processes, the session's Kafka) and a real browser (Debian's
chromium, headless): who may read its data, its bounds, rule hits summed over the workers, a page that loads
without console errors, charts whose pixels are drawn in the curves' colours, a new champion shown without a
reload, text that is never run as markup, and the replay's screenshot.

Without chromium the browser tests fail (they do not skip): install it with deploy/system-deps.sh.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from services.bench.api_process import ApiProcess
from services.local.daemon import free_port, wait_until
from services.settings import Settings

KEYS = {"op-admin-key": "admin", "op-viewer-key": "viewer", "op-user-key": "alice"}
ADMIN = {"X-API-Key": "op-admin-key"}
VIEWER = {"Authorization": "Bearer op-viewer-key"}
EVIL = 'mx:<img src=x onerror="document.title=\'owned\'">'
RULES_RGB = (0xE8, 0x59, 0x0C)  # operator.js COLORS
MODEL_RGB = (0x19, 0x71, 0xC2)


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def op_settings(kafka: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return kafka.model_copy(update={
        "state_dir": tmp_path_factory.mktemp("operator-state"),
        "downloads_dir": kafka.downloads,
        "api_keys": KEYS,
        "admin_identities": ["admin"],
        "operator_identities": ["viewer"],
        "api_port": free_port(),
        "spamd_port": free_port(),
        "workers": 2,
        "model_poll_s": 1.0,
    })


@pytest.fixture(scope="module")
def populated(op_settings: Settings, corpus: list) -> dict[str, Any]:
    """Two real versions (the first the champion), both curves as the worker records them, gate decisions and a
    worker summary whose most trusted reporter has a name made of markup."""
    from models.registry import Registry
    from services.bench.api import train_quick_version

    shuffled = random.Random(11).sample(corpus, len(corpus))
    a, b = shuffled[:300], shuffled[300:600]
    v1 = train_quick_version(op_settings.registry, [m.raw for m in a], [m.is_spam for m in a], seed=1, promote=True)
    v2 = train_quick_version(op_settings.registry, [m.raw for m in b], [m.is_spam for m in b], seed=2)
    reg = Registry(op_settings.registry)
    quality = {"spam": 199, "ham": 403}
    rules_x = list(range(0, 121, 10))
    model_x = [0, 40, 80, 160, 320, 640]
    for i in range(max(len(rules_x), len(model_x))):  # interleaved in time, as rule changes and promotions come
        if i < len(rules_x):
            x = rules_x[i]
            r1 = min(1.0, 0.25 + 0.004 * x + (0.02 if i % 2 else -0.02))
            reg.record_curve_point({"side": "rules", "x": x, "cause": "rules", "recall_at_fpr_1pct": r1,
                                    "recall_at_fpr_0_1pct": r1 * 0.7, "one_minus_auc": 0.3 - 0.002 * x,
                                    "quality_set": quality})
        if i < len(model_x):
            x = model_x[i]
            r1 = 0.0 if x == 0 else min(1.0, 0.1 + 0.13 * np.log(x))
            reg.record_curve_point({"side": "model", "x": x, "cause": "promotion", "version": v1, "kind": "linear",
                                    "recall_at_fpr_1pct": r1, "recall_at_fpr_0_1pct": r1 * 0.8,
                                    "one_minus_auc": 0.5 - 0.05 * np.log1p(x), "served": {"recall_at_fpr_1pct": r1},
                                    "quality_set": quality})
    reg.record_decision(challenger=v1, decision="promoted", reason="better: AUC 0.90 -> 0.97", champion=None,
                        challenger_metrics={"one_minus_auc": 0.03, "recall_at_fpr_1pct": 0.8, "n_spam": 60,
                                            "n_ham": 140}, champion_metrics=None,
                        extra={"kind": "linear", "test": "better", "evaluation_set": {"flags": {"spam": 60, "ham": 140}},
                               "statistics": {"auc": {"diff": 0.07, "se": 0.01}}})
    reg.record_decision(challenger=v2, decision="rejected", reason="not shown not worse: AUC 0.970 -> 0.968",
                        champion=v1, challenger_metrics={"one_minus_auc": 0.032, "recall_at_fpr_1pct": 0.78},
                        champion_metrics={"one_minus_auc": 0.03, "recall_at_fpr_1pct": 0.8},
                        extra={"kind": "linear", "test": "none", "evaluation_set": {"flags": {"spam": 61, "ham": 141}}})
    reg.write_worker_status({
        "counters": {"events": 640, "flags": 640, "votes": 640, "data_version": 500},
        "labels": {"spam": 250, "ham": 390},
        "reporters": {"total": 3, "distrusted": 1,
                      "highest": [{"reporter": EVIL, "weight": 1.9, "flags": 300},
                                  {"reporter": "user1", "weight": 1.5, "flags": 200}],
                      "lowest": [{"reporter": "mallory", "weight": 0.1, "flags": 140}]},
        "live_verdicts": {v1: {"tp": 90, "fp": 2, "tn": 200, "fn": 8}},
    })
    return {"v1": v1, "v2": v2}


@pytest.fixture(scope="module")
def api(op_settings: Settings, populated: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[ApiProcess]:
    proc = ApiProcess(op_settings, tmp_path_factory.mktemp("operator-logs") / "api.log")
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def chromium() -> str:
    from services.bench.browser import BrowserMissing, chromium_path

    try:
        return chromium_path()
    except BrowserMissing as exc:
        pytest.fail(f"the browser tests need Debian's chromium: {exc}", pytrace=False)


def get_data(api: ApiProcess, headers: dict[str, str]) -> httpx.Response:
    """One request on its own connection (so that several requests reach both worker processes)."""
    return httpx.get(api.base_url + "/operator/data", headers=headers, timeout=30.0)


# --------------------------------------------------------------------------------------------- pure logic
@pytest.mark.unit
def test_jsonl_tail_reads_only_appended_complete_lines(tmp_path: Path) -> None:
    from services.api.operator import JsonlTail

    path = tmp_path / "x.jsonl"
    tail = JsonlTail(path, keep=3)
    assert tail.read() == []
    path.write_text('{"i": 1}\n{"i": 2}\n{"i": 3')  # the last line is still being written
    assert [r["i"] for r in tail.read()] == [1, 2]
    with path.open("a") as f:
        f.write('}\nnot json\n{"i": 4}\n{"i": 5}\n')
    assert [r["i"] for r in tail.read()] == [3, 4, 5]  # bounded to the last 3, the bad line skipped
    path.unlink()
    path.write_text('{"i": 9}\n')  # replaced: read from the start again
    assert [r["i"] for r in tail.read()] == [9]
    big = tmp_path / "big.jsonl"
    big.write_text("".join(f'{{"i": {i}}}\n' for i in range(100_000)))
    far = JsonlTail(big, keep=5, first_read_bytes=4096)  # a long file: only its end is read
    assert [r["i"] for r in far.read()] == [99_995, 99_996, 99_997, 99_998, 99_999]


@pytest.mark.unit
def test_curve_tail_keeps_each_side_in_file_order(tmp_path: Path) -> None:
    """Frequent promotions never push the (rare) rules points out of the kept curves."""
    from services.api.operator import CurveTail

    path = tmp_path / "curves.jsonl"
    lines = ['{"side": "rules", "x": 3, "recall_at_fpr_1pct": 0.5}']
    lines += [f'{{"side": "model", "x": {i}, "recall_at_fpr_1pct": 0.6}}' for i in range(50)]
    lines += ['{"side": "rules", "x": 4, "recall_at_fpr_1pct": 0.55}', '{"side": "model", "x": 50}']
    path.write_text("\n".join(lines) + "\n")
    got = [(p[1], p[2]) for p in CurveTail(path, keep=5).read()]
    assert got == [("rules", 3), ("model", 46), ("model", 47), ("model", 48), ("model", 49), ("rules", 4),
                   ("model", 50)]


@pytest.mark.unit
def test_curves_fits_and_crossing_agree_with_the_replay(tmp_path: Path) -> None:
    """The page's fits and crossing are the replay report's (same definition), from the compact points."""
    from models.evaluate import fit_line, fit_log
    from models.registry import Registry
    from services.api.operator import _curve_point, curves_payload
    from services.bench.replay import crossing

    reg = Registry(tmp_path / "reg")
    for i, (side, x, r) in enumerate([("rules", 0, 0.0), ("model", 0, 0.0), ("rules", 10, 0.4), ("model", 50, 0.3),
                                      ("rules", 20, 0.5), ("model", 100, 0.55), ("model", 200, 0.7)]):
        reg.record_curve_point({"side": side, "x": x, "recall_at_fpr_1pct": r, "recall_at_fpr_0_1pct": r / 2,
                                "one_minus_auc": 0.1, "version": f"v{i}"})
    points = reg.curve_points()
    out = curves_payload([p for p in map(_curve_point, points) if p is not None])
    assert out["crossing"]["flags"] == crossing(points) == 100
    assert out["crossing"]["rules"] == 20
    want_line = fit_line([0, 10, 20], [0.0, 0.4, 0.5])
    want_log = fit_log([50, 100, 200], [0.3, 0.55, 0.7])
    assert out["fits"]["rules"]["b"] == pytest.approx(want_line.b) and out["fits"]["rules"]["r2"] == pytest.approx(want_line.r2)
    assert out["fits"]["model"]["b"] == pytest.approx(want_log.b) and out["fits"]["model"]["a"] == pytest.approx(want_log.a)
    assert out["points"] == {"rules": 3, "model": 4}


@pytest.mark.unit
def test_answer_is_bounded_whatever_the_registry_holds() -> None:
    from services.api.operator import MAX_DATA_BYTES, _clip, encode_bounded

    huge = {"decisions": [{"statistics": {"s": "x" * 100_000}, "reason": "r"} for _ in range(12)],
            "champion": {"hyperparameters": {"h": "y" * 200_000}},
            "rules": {"rows": [{"name": f"R{i}", "description": "z" * 2000} for i in range(500)]},
            "curves": {"rules": [[i, i, 0.1, 0.2, 0.3] for i in range(400)], "model": []}}
    body = encode_bounded(huge)
    assert len(body) <= MAX_DATA_BYTES
    clipped = _clip({"a": ["s" * 1000] * 100, "b": {"c": {"d": {"e": {"f": 1}}}}})
    assert len(clipped["a"]) == 41 and len(clipped["a"][0]) == 401 and clipped["b"]["c"]["d"]["e"] == "…"


# --------------------------------------------------------------------------------------------- the API
@pytest.mark.integration
def test_data_needs_an_operator_key_and_is_bounded(api: ApiProcess, populated: dict[str, Any]) -> None:
    from models.evaluate import fit_line, fit_log
    from models.registry import Registry
    from services.api.operator import MAX_DATA_BYTES
    from services.bench.replay import crossing

    assert get_data(api, {}).status_code == 401
    r = httpx.get(api.base_url + "/operator/data?key=op-admin-key", timeout=30.0)
    assert r.status_code == 401, "a key in the query string (logs, history, Referer) must not be accepted"
    denied = get_data(api, {"X-API-Key": "op-user-key"})
    assert denied.status_code == 403 and "alice" in denied.json()["detail"]
    assert get_data(api, {"X-API-Key": "wrong"}).status_code == 401
    for headers in (VIEWER, ADMIN):
        r = get_data(api, headers)
        assert r.status_code == 200, r.text
        assert len(r.content) <= MAX_DATA_BYTES
        assert r.headers["cache-control"] == "no-store"
    d = r.json()
    assert d["champion"]["version"] == populated["v1"]
    assert d["ancestry"][0]["version"] == populated["v1"]
    assert [x["decision"] for x in d["decisions"]] == ["rejected", "promoted"]  # newest first
    assert d["decisions"][0]["champion_metrics"]["recall_at_fpr_1pct"] == 0.8
    assert d["worker"]["reporters"]["highest"][0]["reporter"] == EVIL
    points = Registry(api.settings.registry).curve_points()
    rules = [(p["x"], p["recall_at_fpr_1pct"]) for p in points if p["side"] == "rules"]
    model = [(p["x"], p["recall_at_fpr_1pct"]) for p in points if p["side"] == "model" and p["x"] > 0]
    assert d["curves"]["fits"]["rules"]["b"] == pytest.approx(fit_line(*zip(*rules, strict=True)).b)
    assert d["curves"]["fits"]["model"]["b"] == pytest.approx(fit_log(*zip(*model, strict=True)).b)
    assert d["curves"]["crossing"]["flags"] == crossing(points)
    assert len(d["curves"]["rules"]) == len(rules) and len(d["curves"]["model"]) == len(model) + 1
    assert d["rules"]["active"] > 0 and len(d["rules"]["rows"]) == d["rules"]["total"]


@pytest.mark.integration
def test_page_is_static_same_origin_and_locked_down(api: ApiProcess, populated: dict[str, Any]) -> None:
    r = httpx.get(api.base_url + "/operator", timeout=30.0)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY"
    assert populated["v1"] not in r.text, "the page itself carries no data"
    refs = re.findall(r'(?:src|href)="([^"]*)"', r.text)
    assert refs and all(u.startswith(("/operator/static/", "data:")) for u in refs), refs
    for name in ("operator.js", "operator.css"):
        assert httpx.get(f"{api.base_url}/operator/static/{name}", timeout=30.0).status_code == 200
    for bad in ("operator.html", "..%2Fapp.py", "nope.js"):
        assert httpx.get(f"{api.base_url}/operator/static/{bad}", timeout=30.0).status_code == 404


@pytest.mark.integration
def test_rule_hits_are_summed_over_the_workers(api: ApiProcess, corpus: list) -> None:
    """Every worker process answers with the hits of all of them: classify on separate connections (spread over
    both workers), then each worker's answer must show exactly the hits the /classify answers reported."""
    def hits() -> dict[str, int]:
        return {r["name"]: r["hits"] for r in get_data(api, ADMIN).json()["rules"]["rows"]}

    before = hits()
    msgs = [m.raw for m in random.Random(5).sample(corpus, 40)]
    expected: Counter[str] = Counter()
    for raw in msgs:
        r = httpx.post(api.base_url + "/classify", content=raw, headers={"content-type": "message/rfc822"},
                       timeout=30.0)
        assert r.status_code == 200, r.text
        expected.update(h["name"] for h in r.json()["rules"]["hits"])
    assert sum(expected.values()) > 20, "the sample should hit rules"
    want = {name: before.get(name, 0) + n for name, n in expected.items()}
    seen_pids: set[int] = set()

    def all_workers_agree() -> bool:
        r = get_data(api, ADMIN).json()
        got = {row["name"]: row["hits"] for row in r["rules"]["rows"]}
        if all(got.get(k) == v for k, v in want.items()):
            seen_pids.add(r["served_here"]["pid"])
        return len(seen_pids) >= 2

    wait_until(all_workers_agree, 60, "both API workers to report every hit of both", 0.2)


# --------------------------------------------------------------------------------------------- the browser
def colour_pixels(png: Path, box: dict[str, float] | None, rgb: tuple[int, int, int], tol: float = 60.0) -> int:
    """Pixels of ``png`` inside ``box`` within ``tol`` (RGB distance) of ``rgb``."""
    from PIL import Image

    assert box is not None, "element not on the page"
    with Image.open(png) as im:
        crop = im.convert("RGB").crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                                       int(box["y"] + box["height"])))
        arr = np.asarray(crop, dtype=np.int32)
    return int((np.sqrt(((arr - np.array(rgb)) ** 2).sum(axis=-1)) < tol).sum())


@pytest.mark.integration
def test_page_in_a_real_browser(api: ApiProcess, populated: dict[str, Any], chromium: str, tmp_path: Path) -> None:
    """No key: the page asks for one. With a key: drawn, no console errors, charts in the curves' colours,
    markup in data shown as text. Then a promotion: the new champion appears without a reload."""
    from models.registry import Registry
    from services.bench.browser import OPERATOR_READY, open_page, operator_url

    v1, v2 = populated["v1"], populated["v2"]
    timings: dict[str, float] = {}
    with open_page((1400, 1000), executable=chromium) as w:
        page = w.page
        t0 = time.monotonic()
        page.goto(operator_url(api.settings), wait_until="load")
        page.wait_for_selector("body[data-state=key]", state="attached")
        assert page.is_visible("#key-form") and not page.is_visible("#main")
        page.fill("#key-input", "op-viewer-key")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector(OPERATOR_READY, state="attached")
        timings["first_draw_s"] = time.monotonic() - t0
        assert page.text_content("#champion-version") == v1
        assert page.get_attribute("body", "data-champion") == v1
        for chart in ("#chart-headline", "#chart-rules", "#chart-model"):
            assert int(page.get_attribute(chart, "data-points") or 0) > 0, chart

        # Markup in the data is text: no element made of it, nothing run.
        assert EVIL in (page.text_content("#reporters-high") or "")
        assert page.query_selector("#main img") is None
        assert page.title() == "Flywheel · operator"

        w.settle()
        shot = tmp_path / "operator.png"
        page.screenshot(path=str(shot), full_page=True)
        head, rules_box, model_box = w.box("#chart-headline"), w.box("#chart-rules"), w.box("#chart-model")
        drawn = {
            "headline_rules": colour_pixels(shot, head, RULES_RGB), "headline_model": colour_pixels(shot, head, MODEL_RGB),
            "rules": colour_pixels(shot, rules_box, RULES_RGB), "model": colour_pixels(shot, model_box, MODEL_RGB),
        }
        control = colour_pixels(shot, w.box("header"), RULES_RGB) + colour_pixels(shot, w.box("header"), MODEL_RGB)
        assert control == 0, "the control area has no curve colour"
        assert all(n >= 400 for n in drawn.values()), drawn
        assert colour_pixels(shot, rules_box, MODEL_RGB) == 0 and colour_pixels(shot, model_box, RULES_RGB) == 0

        # A new champion, as the gate (or an administrator) promotes it; the worker adds its curve point.
        page.evaluate("() => { window.__sameDocument = true; }")
        renders = int(page.get_attribute("body", "data-renders") or 0)
        points = int(page.get_attribute("#chart-model", "data-points") or 0)
        t1 = time.monotonic()
        r = httpx.post(f"{api.base_url}/models/{v2}/promote", headers=ADMIN, json={"reason": "operator page test"},
                       timeout=60.0)
        assert r.status_code == 200, r.text
        Registry(api.settings.registry).record_curve_point(
            {"side": "model", "x": 1280, "cause": "promotion", "version": v2, "kind": "linear",
             "recall_at_fpr_1pct": 0.97, "recall_at_fpr_0_1pct": 0.9, "one_minus_auc": 0.01})
        timings["promote_call_s"] = time.monotonic() - t1
        page.wait_for_selector(f'body[data-champion="{v2}"]', state="attached", timeout=30_000)
        timings["promotion_to_page_s"] = time.monotonic() - t1
        assert page.evaluate("() => window.__sameDocument === true"), "the page was reloaded"
        assert page.text_content("#champion-version") == v2
        assert int(page.get_attribute("body", "data-renders") or 0) > renders
        wait_until(lambda: int(page.get_attribute("#chart-model", "data-points") or 0) > points, 15,
                   "the model curve to gain the new champion's point", 0.2)
        assert v2.split("Z-")[1] in (page.text_content("#history") or "")
        assert "#key" not in page.url
        assert w.problems == [], w.problems
    print(f"\noperator page timings: {timings}; drawn pixels {drawn}")


@pytest.mark.integration
def test_screenshot_of_the_operator_page(api: ApiProcess, chromium: str, tmp_path: Path) -> None:
    """What the replay calls: the page with a key from the settings, drawn, as a PNG."""
    from services.bench.browser import (
        OPERATOR_READY,
        operator_url,
        screenshot_operator_page,
        screenshot_page,
    )

    t0 = time.monotonic()
    path = screenshot_operator_page(api.settings, tmp_path / "shot.png")
    took = time.monotonic() - t0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = screenshot_page(operator_url(api.settings, with_key=True), tmp_path / "again.png", ready=OPERATOR_READY,
                             boxes=("#chart-headline",))
    assert "key" not in result["url"]
    assert result["console_errors"] == [] and result["page_errors"] == [] and result["failed_requests"] == []
    assert colour_pixels(Path(result["path"]), result["boxes"]["#chart-headline"], MODEL_RGB) >= 400
    print(f"\nscreenshot_operator_page: {took:.1f} s")
