"""Campaign memory end to end through a real broker: the worker publishes trusted labels' fingerprints on the
campaign topic, the API follows it, a near-duplicate of a trusted spam flag is spam within seconds, and an unproven
reporter's flag on a newsletter publishes nothing."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.bench.harness import LocalStack
from services.local.daemon import wait_until
from services.settings import Settings
from streams.topics import Topics

pytestmark = pytest.mark.integration

KEYS = {"k-trusted": "trusted", "k-stranger": "stranger", "dev-admin-key": "admin"}
CAMPAIGN = (
    "Hello {name}, following up on our conversation about the shared calendar for the planning group. I moved the "
    "weekly review to the afternoon slot so the people in the other office can join without staying late, and I "
    "attached the notes from the last session with the open questions about the budget for the spring workshop. "
    "Could you look at the section on travel and tell me whether the numbers still match what finance approved? "
    "If anything changed on your side just reply here and I will update the document before the review. Thanks "
    "again for taking care of the room booking, it made the whole thing much easier for everybody involved. "
    "See the updated agenda at {link} and call me at {phone} if something is unclear. Best regards, {sender}"
)
NEWSLETTER = (
    "This week in the community garden: the tomato seedlings are ready to be picked up at the shed on Saturday "
    "morning, the compost workshop moves to the library hall because of the rain forecast, and we are still "
    "looking for volunteers to water the herb beds during the holidays. Remember that the tool library is open "
    "every evening after six and that borrowed tools come back clean. Photos from the harvest festival are on the "
    "website at {link} and the next members meeting is on the first Thursday of the month. Issue {issue}, sent "
    "to {name} because you subscribed to the garden newsletter; write to the committee to unsubscribe."
)


def _mail(body: str, subject: str, sender: str, to: str, n: int) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Mon, 7 Dec 2026 09:{n % 60:02d}:00 +0000\r\n"
            f"Message-ID: <{n}.{sender.split('@')[0]}@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}\r\n").encode()


def campaign_copy(n: int) -> bytes:
    body = CAMPAIGN.format(name=f"user{n}", link=f"http://calendar{n}.example.net/r/{n * 7919}",
                           phone=f"555-{n:04d}", sender="Dana")
    return _mail(body, "Re: planning group calendar", "dana@calendar-mail.example.net", f"user{n}@example.org", n)


def newsletter_copy(n: int) -> bytes:
    body = NEWSLETTER.format(link=f"https://garden.example.org/photos/{n}", issue=100 + n, name=f"member{n}")
    return _mail(body, f"Garden news, issue {100 + n}", "news@garden.example.org", f"member{n}@example.org", 50 + n)


@pytest.fixture(scope="module")
def stack(kafka: Settings, p1_split: tuple[list, list], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack (the model held still: no refits, no neural retrains) whose reporter "trusted" has earned trust the
    way any user does: flags the models agree with, on earlier mail they are sure of."""
    root: Path = tmp_path_factory.mktemp("campaign")
    train, _ = p1_split
    with LocalStack(kafka, root / "stack", api_keys=KEYS, linear_refit_s=86400.0, neural_retrain=False) as s:
        # 100 flags: a record near its ceiling (reliability about 0.95), so the few flags below that contradict what
        # the base model is sure of (a campaign it calls ham) leave the reporter proven.
        for m in random.Random(3).sample(train, 100):
            mid = s.classify(m.raw)["message_id"]
            r = s.flag("spam" if m.is_spam else "ham", "k-trusted", message_id=mid)
            assert r.status_code == 202, r.text
        wait_until(lambda: _reliability(s, "trusted") >= 0.9, 120, "the reporter's reliability to reach 0.9", 0.3)
        yield s


def _reliability(stack: LocalStack, reporter: str) -> float:
    from models.consensus import reliability

    with stack.db() as db:
        row = db.execute("SELECT agree, disagree FROM reporters WHERE reporter=?", (reporter,)).fetchone()
    return reliability(row[0], row[1]) if row else 0.0


def _on_topic(stack: LocalStack) -> dict[str, str]:
    """The campaign topic as a table: message id -> label of its latest record (a tombstone removes the id)."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.campaign import decode_campaign

    topic = Topics.from_config(stack.settings.streams()).campaigns
    consumer = KafkaConsumer(bootstrap_servers=stack.settings.bootstrap_servers, group_id=None,
                             enable_auto_commit=False)
    table: dict[str, str] = {}
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(consumer.position(p) < end[p] for p in parts):
            for records in consumer.poll(timeout_ms=300).values():
                for rec in records:
                    mid = rec.key.decode()
                    if rec.value is None:
                        table.pop(mid, None)
                    else:
                        table[mid] = decode_campaign(rec.value).label
    finally:
        consumer.close()
    return table


def _has_vote(stack: LocalStack, reporter: str, message_id: str) -> bool:
    with stack.db() as db:
        return db.execute("SELECT 1 FROM votes WHERE reporter=? AND message_id=?", (reporter, message_id)).fetchone() \
            is not None


def test_a_trusted_flag_stops_the_campaign_and_a_strangers_flag_blocks_no_newsletter(stack: LocalStack) -> None:
    later, letter = campaign_copy(2), newsletter_copy(2)
    before: dict[str, Any] = stack.classify(later)
    assert not before["is_spam"] and before["campaign"] is None  # the model alone lets the campaign through

    # An unproven reporter calls the newsletter spam; the worker records the vote (it is a label) ...
    r = stack.flag("spam", "k-stranger", raw=newsletter_copy(1))
    assert r.status_code == 202, r.text
    stranger_mid = r.json()["message_id"]
    wait_until(lambda: _has_vote(stack, "stranger", stranger_mid), 60, "the stranger's vote in the store", 0.2)

    # ... then the trusted reporter flags one copy of the campaign.
    r = stack.flag("spam", "k-trusted", raw=campaign_copy(1))
    assert r.status_code == 202, r.text
    flagged_at = time.monotonic()
    trusted_mid = r.json()["message_id"]
    caught: dict[str, Any] = {}

    def is_caught() -> bool:
        caught.update(stack.classify(later))
        return bool(caught["is_spam"])

    wait_until(is_caught, 15, "a near-duplicate of the trusted flag to be classified spam", 0.1)
    took = time.monotonic() - flagged_at
    assert took < 15
    assert caught["decided_by"] == "campaign"
    assert caught["campaign"]["flagged"] == "spam" and caught["campaign"]["message_id"] == trusted_mid
    assert caught["campaign"]["match"] >= 0.6
    assert not caught["model"]["is_spam"]  # the model still says ham: campaign memory decided

    # The pass that published the trusted fingerprint saw the stranger's label and left it out.
    answer = stack.classify(letter)
    assert not answer["is_spam"] and answer["campaign"] is None
    on_topic = _on_topic(stack)
    assert on_topic.get(trusted_mid) == "spam"
    assert stranger_mid not in on_topic

    metrics = stack.http.get("/metrics").text
    assert 'flywheel_campaign_hits_total{decided="true",flagged="spam"}' in metrics


def test_not_spam_from_a_trusted_reporter_protects_list_mail_and_counts_the_false_positive(stack: LocalStack) -> None:
    """A trusted spam flag on one issue of a newsletter blocks the next issue (a false positive of campaign memory);
    "not spam" on it from a trusted reporter is counted as such, and its ham fingerprint then wins over the spam one:
    the issue after is not blocked."""
    r = stack.flag("spam", "k-trusted", message_id=stack.classify(newsletter_copy(10))["message_id"])
    assert r.status_code == 202, r.text
    blocked: dict[str, Any] = {}

    def is_blocked() -> bool:
        blocked.update(stack.classify(newsletter_copy(11)))
        return blocked["decided_by"] == "campaign"

    wait_until(is_blocked, 15, "the next issue to be blocked by campaign memory", 0.1)
    # A fresh identity's "not spam" protects nothing: once its vote is stored, a pass that publishes a later trusted
    # flag has seen it, and the campaign is still blocked.
    r = stack.flag("ham", "k-stranger", message_id=blocked["message_id"])
    assert r.status_code == 202, r.text
    wait_until(lambda: _has_vote(stack, "stranger", blocked["message_id"]), 60, "the stranger's vote in the store", 0.2)
    issue13 = stack.classify(newsletter_copy(13))["message_id"]
    r = stack.flag("spam", "k-trusted", message_id=issue13)
    assert r.status_code == 202, r.text
    on_topic: dict[str, str] = {}

    def published() -> bool:
        on_topic.clear()
        on_topic.update(_on_topic(stack))
        return issue13 in on_topic

    wait_until(published, 15, "the trusted flag's fingerprint on the campaign topic", 0.2)
    assert blocked["message_id"] not in on_topic
    after_stranger = stack.classify(newsletter_copy(14))
    assert after_stranger["decided_by"] == "campaign" and after_stranger["campaign"]["flagged"] == "spam"
    r = stack.flag("ham", "k-trusted", message_id=blocked["message_id"])
    assert r.status_code == 202, r.text
    answer: dict[str, Any] = {}

    def is_protected() -> bool:
        answer.update(stack.classify(newsletter_copy(12)))
        return (answer["campaign"] or {}).get("flagged") == "ham"

    wait_until(is_protected, 15, "a ham fingerprint to protect the newsletter", 0.1)
    assert not answer["is_spam"] and answer["decided_by"] != "campaign"
    wait_until(lambda: (stack.worker_metric("flywheel_campaign_false_positives_total") or 0) >= 1, 15,
               "the worker to count the false positive", 0.2)
