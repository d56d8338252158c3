"""Authentication-Results and Received-SPF as evidence: read only from the operator's own hosts (their
authserv-id), comments and quoted strings cannot inject results, the work is bounded, and the outcomes reach the
rules (pseudo-header X-Flywheel-Auth) and the features (``auth:`` tokens)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from models.features import FeatureConfig, message_tokens
from models.message import authentication_results, configure_trusted_authserv_ids, parse
from models.rules import RuleEngine

pytestmark = pytest.mark.unit

OURS = frozenset({"mx.example.net"})


@pytest.fixture
def trusted() -> Iterator[None]:
    configure_trusted_authserv_ids(["MX.example.net"])
    yield
    configure_trusted_authserv_ids([])


def _mail(*headers: str) -> bytes:
    head = "".join(h + "\r\n" for h in headers)
    return (head + "From: Billing <billing@bank.example>\r\nTo: u@example.net\r\nSubject: Your invoice\r\n"
            "Message-ID: <1@bank.example>\r\nDate: Mon, 7 Dec 2026 09:00:00 +0000\r\n\r\nPlease see attached.\r\n"
            ).encode()


def test_only_the_operators_authserv_id_counts() -> None:
    headers = [
        ("authentication-results", "evil.example; spf=pass; dkim=pass; dmarc=pass"),
        ("authentication-results", "mx.example.net; spf=fail smtp.mailfrom=a@bank.example; dkim=none; "
                                   "dmarc=fail header.from=bank.example"),
    ]
    assert authentication_results(headers, OURS) == ["dkim=none", "dmarc=fail", "spf=fail"]
    assert authentication_results(headers, frozenset()) == []
    assert authentication_results(headers[:1], OURS) == []


def test_the_topmost_trusted_header_wins_and_any_passing_dkim_signature_passes() -> None:
    headers = [
        ("authentication-results", "mx.example.net 1; spf=softfail; dkim=fail header.d=a; dkim=pass header.d=b"),
        ("authentication-results", "mx.example.net; spf=pass; dkim=fail"),  # older: a relay before us
    ]
    assert authentication_results(headers, OURS) == ["dkim=pass", "spf=softfail"]


def test_comments_and_quoted_strings_cannot_inject_results() -> None:
    value = ('mx.example.net; spf=fail (sender x; dkim=pass (nested; dmarc=pass)) smtp.mailfrom="a;dmarc=pass"@x; '
             "dkim/1=fail")
    assert authentication_results([("authentication-results", value)], OURS) == ["dkim=fail", "spf=fail"]


def test_received_spf_counts_when_its_receiver_is_ours_and_a_r_gave_no_spf() -> None:
    ours = ("received-spf", "Fail (mx.example.net: domain of a@bank.example does not designate 192.0.2.1) "
                            "receiver=mx.example.net; client-ip=192.0.2.1; envelope-from=a@bank.example")
    theirs = ("received-spf", "pass (relay.example: permitted) receiver=relay.example; client-ip=192.0.2.1")
    assert authentication_results([ours], OURS) == ["spf=fail"]
    assert authentication_results([theirs], OURS) == []
    assert authentication_results([("authentication-results", "mx.example.net; spf=pass"), ours], OURS) == [
        "spf=pass"]


def test_unknown_methods_and_results_are_ignored() -> None:
    value = "mx.example.net; iprev=fail; spf=maybe; dmarc=bestguesspass; auth=pass"
    assert authentication_results([("authentication-results", value)], OURS) == []


def test_work_is_bounded_whatever_the_headers() -> None:
    """Past the caps a header is left out with a defect; the worst case stays far below a millisecond-scale
    budget per message (each header is scanned once, only its special characters stepped over in Python)."""
    hostile = [("authentication-results", "mx.example.net; " + "(" * 30_000)] * 500
    defects: list[str] = []
    t0 = time.perf_counter()
    assert authentication_results(hostile, OURS, defects) == []
    elapsed = time.perf_counter() - t0
    assert defects == ["auth_capped"]
    assert elapsed < 0.05, elapsed
    many = [("authentication-results", "mx.example.net; spf=none")] * 9 + [
        ("authentication-results", "mx.example.net; dmarc=fail")]
    defects = []
    assert authentication_results(many, OURS, defects) == ["spf=none"]  # the 10th header is never read
    assert defects == ["auth_capped"]


def test_parse_rules_and_features_see_trusted_results(trusted: None) -> None:
    raw = _mail("Authentication-Results: mx.example.net; spf=fail smtp.mailfrom=bank.example; dkim=fail; "
                "dmarc=fail (p=reject) header.from=bank.example")
    pm = parse(raw)
    assert pm.auth == ["dkim=fail", "dmarc=fail", "spf=fail"]
    hits = {h.name for h in RuleEngine.default().evaluate(pm).hits}
    assert {"SPF_FAIL", "DKIM_INVALID", "DMARC_FAIL"} <= hits
    toks = message_tokens(pm, None, FeatureConfig())
    assert {"auth:spf=fail", "auth:dkim=fail", "auth:dmarc=fail"} <= set(toks)


def test_forged_results_from_another_host_change_nothing(trusted: None) -> None:
    plain = parse(_mail())
    forged = parse(_mail("Authentication-Results: spoofed.example; spf=pass; dkim=pass; dmarc=pass"))
    assert forged.auth == [] and plain.auth == []
    engine = RuleEngine.default()
    assert {h.name for h in engine.evaluate(forged).hits} == {h.name for h in engine.evaluate(plain).hits}
    assert not [t for t in message_tokens(forged, None, FeatureConfig()) if t.startswith("auth:")]


def test_nothing_is_trusted_by_default() -> None:
    pm = parse(_mail("Authentication-Results: mx.example.net; spf=fail; dmarc=fail"))
    assert pm.auth == []
    assert not {"SPF_FAIL", "DMARC_FAIL"} & {h.name for h in RuleEngine.default().evaluate(pm).hits}
