"""services/api/schemas.py: what each request body accepts and refuses (the limits clients are promised), and the
OpenAPI document the app builds from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from services.api.schemas import (
    BatchJSON,
    ClassifyJSON,
    ClassifyResponse,
    FeedbackIn,
    PromoteIn,
    Ready,
    RetractIn,
    RuleIn,
)

pytestmark = pytest.mark.unit


def refused(model: type[BaseModel], data: Any) -> list[str]:
    """The error types pydantic gives for ``data`` (fails when it is accepted)."""
    with pytest.raises(ValidationError) as exc:
        model.model_validate(data)
    return [e["type"] for e in exc.value.errors()]


# --------------------------------------------------------------------------------------------- classify
def test_classify_json_takes_raw_or_fields_not_both_nor_neither() -> None:
    assert ClassifyJSON.model_validate({"raw": "Subject: x\r\n\r\n"}).raw
    c = ClassifyJSON.model_validate({"from": "a@b", "to": "c@d", "subject": "s", "text": "t"})
    assert c.from_ == "a@b" and c.to == "c@d"
    assert ClassifyJSON.model_validate({"to": ["a@b", "c@d"]}).to == ["a@b", "c@d"]
    assert ClassifyJSON(from_="x@y").from_ == "x@y"  # by field name too
    assert refused(ClassifyJSON, {}) == ["value_error"]
    assert refused(ClassifyJSON, {"raw": "x", "text": "y"}) == ["value_error"]
    assert refused(ClassifyJSON, {"subject": "s", "cc": "not a field"}) == ["extra_forbidden"]
    assert refused(ClassifyJSON, {"subject": "s" * 10_001}) == ["string_too_long"]
    assert refused(ClassifyJSON, {"headers": {"X-A": 1}}) == ["string_type"]


def test_batch_holds_one_to_a_thousand_messages() -> None:
    one = {"subject": "s"}
    assert len(BatchJSON.model_validate({"messages": [one] * 1000}).messages) == 1000
    assert refused(BatchJSON, {"messages": []}) == ["too_short"]
    assert refused(BatchJSON, {"messages": [one] * 1001}) == ["too_long"]
    assert "value_error" in refused(BatchJSON, {"messages": [one, {}]})


# --------------------------------------------------------------------------------------------- feedback
@pytest.mark.parametrize("data", [
    {"label": "spam", "message_id": "0123456789abcdef"},
    {"label": "ham", "raw": "Subject: x\r\n\r\n"},
])
def test_feedback_accepts(data: dict[str, Any]) -> None:
    assert FeedbackIn.model_validate(data).label == data["label"]


@pytest.mark.parametrize(("data", "types"), [
    ({"label": "spam"}, ["value_error"]),
    ({"label": "spam", "message_id": "ab", "raw": "x"}, ["value_error"]),
    ({"label": "junk", "message_id": "ab"}, ["literal_error"]),
    ({"label": "spam", "message_id": "ABCDEF"}, ["value_error"]),
    ({"label": "spam", "message_id": "<from /classify>"}, ["value_error"]),
    ({"label": "spam", "message_id": "a" * 129}, ["string_too_long"]),
    ({"label": "spam", "raw": ""}, ["string_too_short"]),
    ({"label": "spam", "raw": "x", "reporter": "someone else"}, ["extra_forbidden"]),
])
def test_feedback_refuses(data: dict[str, Any], types: list[str]) -> None:
    assert refused(FeedbackIn, data) == types


def test_retract_and_promote_bodies() -> None:
    assert refused(RetractIn, {"event_id": ""}) == ["string_too_short"]
    assert refused(RetractIn, {"event_id": "x" * 65}) == ["string_too_long"]
    assert PromoteIn.model_validate({}).reason == "promoted through the API"
    assert refused(PromoteIn, {"reason": "r" * 1001}) == ["string_too_long"]
    assert refused(PromoteIn, {"reason": "ok", "force": True}) == ["extra_forbidden"]


# --------------------------------------------------------------------------------------------- rules
def test_rule_in_bounds_every_field() -> None:
    ok = {"name": "GOOD_NAME_1", "kind": "header", "header": "Subject", "pattern": "/x/", "weight": -100.0}
    assert RuleIn.model_validate(ok).enabled is True
    assert refused(RuleIn, {**ok, "name": "1starts_with_digit"}) == ["string_pattern_mismatch"]
    assert refused(RuleIn, {**ok, "name": "has-dash"}) == ["string_pattern_mismatch"]
    assert refused(RuleIn, {**ok, "name": "N" * 101}) == ["string_too_long"]
    assert refused(RuleIn, {**ok, "kind": "eval"}) == ["literal_error"]
    assert refused(RuleIn, {**ok, "weight": 100.01}) == ["less_than_equal"]
    assert refused(RuleIn, {**ok, "pattern": ""}) == ["string_too_short"]
    assert refused(RuleIn, {**ok, "pattern": "x" * 5001}) == ["string_too_long"]
    assert refused(RuleIn, {**ok, "source": "api"}) == ["extra_forbidden"]


# --------------------------------------------------------------------------------------------- answers
def test_answers_bound_their_probabilities() -> None:
    side = {"score": 1.0, "threshold": 5.0, "is_spam": False, "verdict": "ham", "probability": 0.1, "hits": []}
    model = {"probability": 0.2, "is_spam": False, "verdict": "ham", "threshold": 0.5, "version": "v", "kind": "linear",
             "provider": "CPUExecutionProvider"}
    answer = {"message_id": "ab", "verdict": "ham", "is_spam": False, "probability": 0.2, "score": -1.4,
              "threshold": 0.5, "decided_by": "combined", "policy": "combined", "rules": side, "model": model}
    ClassifyResponse.model_validate(answer)
    assert refused(ClassifyResponse, {**answer, "probability": 1.5}) == ["less_than_equal"]
    assert refused(ClassifyResponse, {**answer, "verdict": "maybe"}) == ["literal_error"]
    assert Ready.model_validate({"ready": False, "model": None, "kafka": False}).model is None


# --------------------------------------------------------------------------------------------- OpenAPI
def test_the_openapi_components_are_the_body_models(tmp_path: Path) -> None:
    """The app documents each body with the same JSON schema the model validates with, so a client generated
    from /openapi.json sends what the server accepts."""
    from services.api import schemas
    from services.api.app import _BODY_SCHEMAS, create_app
    from services.settings import Settings

    doc = create_app(Settings(state_dir=tmp_path)).openapi()
    components = doc["components"]["schemas"]
    for name in _BODY_SCHEMAS:
        js = getattr(schemas, name).model_json_schema(ref_template="#/components/schemas/{model}")
        js.pop("$defs", None)
        assert components[name] == js, name
    assert components["ClassifyJSON"]["additionalProperties"] is False
    assert components["FeedbackIn"]["properties"]["message_id"]["anyOf"][0]["pattern"] == "^[0-9a-f]+$"
    assert doc["info"]["title"] == "Flywheel" and "X-Flywheel-User" in doc["info"]["description"]
