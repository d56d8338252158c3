"""Who to believe: reporter reputation, weighted consensus, held-out membership and the trust filter.

Users' flags are noisy and sometimes hostile, so a flag is a *vote* and a label needs weighted agreement. The
functions here are pure (numbers in, numbers out); the worker's store keeps the counts they read.

Reputation. A reporter's weight is ``2 * (agree + 2) / (agree + disagree + 4)``: a newcomer weighs 1, a reliable
reporter tends to 2, a reporter who keeps being contradicted tends to 0. Evidence is agreement with what the models
are *very* sure of (p >= 0.99 or <= 0.01), and with the consensus of the other reporters on the same message when
those are proven (reliability >= ``RELIABLE``): agreeing with unproven identities earns nothing, or a few
colluding identities would vouch for each other. Evidence counts once per reporter and message and only while
the flag stands (:func:`remove_from_record` takes a retracted flag's back), and a message only its reporter has
seen (its bytes came in their own flag) earns them nothing until another source (:func:`source_of`) has seen it:
reliability cannot be bought by repetition or with self-written mail.

Reliability and trust. A reporter's reliability is the share of their flags expected to be right (their record
of agreement, smoothed by a prior of 8 right in 10). The record is recency-weighted (``RECORD_DECAY``): it
describes how a reporter flags now, so trust earned long ago cannot carry a change of behaviour. A label that
contradicts a very sure model is exactly what learning from drift needs when it comes from a reliable reporter,
and exactly what random or hostile label noise looks like otherwise. The same holds for a label on mail the
model is *unsure* of: that is the hard mail, where a model learns the most from a right label and loses the
most from a wrong one. So the base model vouches for a label only where it is very sure of the same class; any
other label is learned only when its reporters' reliability reaches ``RELIABLE`` (with no base model at all, as
on a replay that starts from nothing, every label is learned). Learned labels are weighted by their
:func:`confidence`.

Measured on the labels of a flywheel benchmark run with 30% random noise (reporters' reliability near 0.73),
retrained offline: the base model is sure of about 85% of the flagged mail, so the contradicting noise is
dropped, but the wrong third of the labels on the unsure 15% (about 70 of 1,000 kept labels, weighted 0.46 each)
took the model's ranking error on the unflagged mail from 0.385% to 0.49%; without them it fell to 0.305%. An
honest reporter is proven after a dozen flags on mail the model is sure of (reliability 0.9), and from then on
all their labels, past ones included, are learned at full weight.

Held-out membership is a hash of the message id: the same corpus message is held out in every run and every
process and is never part of a base training set, so the clean reference set stays out of sample for good.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

__all__ = [
    "HOLDOUT_MODULO",
    "RECORD_DECAY",
    "RELIABLE",
    "REPUTATION_PRIOR",
    "SURE_HIGH",
    "SURE_LOW",
    "add_to_record",
    "confidence",
    "consensus",
    "is_holdout",
    "live_weight",
    "message_id_for",
    "model_evidence",
    "reliability",
    "remove_from_record",
    "reporter_weight",
    "source_of",
    "trusted",
]

SURE_HIGH = 0.99
SURE_LOW = 0.01
HOLDOUT_MODULO = 10
"""One corpus message in ten (by message-id hash) is held out: never trained on, the clean reference set."""
REPUTATION_PRIOR = 2.0
"""Pseudo-counts of agreement and of disagreement a newcomer starts with."""
RELIABLE = 0.9
"""Reliability a label's reporters need before a label against a very sure model is learned (and before agreeing
with them counts as evidence for someone else)."""
RELIABILITY_PRIOR = (8.0, 10.0)
"""Pseudo-counts (right, judged) a reporter's reliability starts from."""
RECORD_DECAY = 0.98
"""Each judged flag multiplies a reporter's earlier agree and disagree counts by this before it is added: the
record is a window of about the last 50 judged flags (half of its weight in the last 35). A reporter who turns
careless or hostile after a long honest record loses trust within a few dozen flags, not after hundreds: with
30% wrong flags from then on, a record of 0.98 falls below ``RELIABLE`` after about 20 judged flags (measured
on the noisy poisoning test: without the decay, one reporter kept 0.92 after 75 noisy flags and their wrong
labels on hard mail kept being learned). A perfect record still tends to ``(50 + 8) / (50 + 10) = 0.97``."""


def add_to_record(agree: float, disagree: float, new_agree: float, new_disagree: float) -> tuple[float, float]:
    """A reporter's (agree, disagree) record after one judged flag: the old counts decay by ``RECORD_DECAY``
    when the flag brings evidence (a flag without evidence leaves the record as it was). The store runs the same
    arithmetic in SQL; this is its reference."""
    if new_agree + new_disagree <= 0:
        return agree, disagree
    return RECORD_DECAY * agree + new_agree, RECORD_DECAY * disagree + new_disagree


def remove_from_record(agree: float, disagree: float, old_agree: float, old_disagree: float,
                       steps_since: int) -> tuple[float, float]:
    """A reporter's record without the evidence of one flag, added ``steps_since`` judged flags ago (it has
    decayed by ``RECORD_DECAY`` at each): what a retracted (or replaced) flag leaves. Evidence counts once per
    reporter and message and only while the flag stands, or flagging and retracting one obvious spam over and
    over would buy reliability (15 rounds took a newcomer to 0.913, over ``RELIABLE``). The store runs the
    same arithmetic in SQL; this is its reference."""
    f = RECORD_DECAY ** max(0, steps_since)
    return max(0.0, agree - f * old_agree), max(0.0, disagree - f * old_disagree)


def source_of(reporter: str) -> str:
    """Who vouches for a reporter's identity: a relay or spamd for ``relay:user`` reporters, else the key's own
    identity. Quotas are kept per source as well as per reporter, and a message a reporter supplied counts as
    seen by someone else only when another source saw it."""
    return reporter.split(":", 1)[0]


def live_weight(agree: float, disagree: float) -> float:
    """What one flag's judgement of a served verdict adds to the live tallies (``flywheel_live_verdicts_total``,
    the rollback alert's input): weighted like a label, ``confidence`` of the reporter's reliability, and nothing
    below ``RELIABLE``, where a label against the model is not learned either. Otherwise one new key's ~50 "ham"
    flags on mail the champion blocked would fire the rollback alert."""
    q = reliability(agree, disagree)
    return confidence(q) if q >= RELIABLE else 0.0


def reporter_weight(agree: float, disagree: float) -> float:
    """Reputation from an agreement record, in (0, 2): newcomer 1, one early mistake costs 0.2, ten cost 0.67."""
    k = REPUTATION_PRIOR
    return 2.0 * (agree + k) / (agree + disagree + 2.0 * k)


def reliability(agree: float, disagree: float) -> float:
    """The share of a reporter's flags expected to be right: the agreement record smoothed by a prior of 8 right
    out of 10. A newcomer is presumed mostly right (0.8: most users flag honestly, and a model that starts from
    nothing must learn from someone); a few dozen judged flags and the record speaks for itself."""
    return (agree + RELIABILITY_PRIOR[0]) / (agree + disagree + RELIABILITY_PRIOR[1])


def confidence(reliability_: float) -> float:
    """What a label is worth in training, from its reporters' reliability ``q``: ``2q - 1`` (the expected signal
    of a label that is right with probability ``q``; nothing at a coin flip, all of it when always right)."""
    return max(0.0, 2.0 * reliability_ - 1.0)


def consensus(votes: Iterable[tuple[str, float]], min_weight: float) -> tuple[str | None, float]:
    """(label or None, margin) of weighted votes ``(label, weight)``; margin = spam weight - ham weight."""
    margin = 0.0
    for label, w in votes:
        margin += w if label == "spam" else -w
    if margin >= min_weight:
        return "spam", margin
    if margin <= -min_weight:
        return "ham", margin
    return None, margin


def message_id_for(raw: bytes) -> str:
    """A message's id: hex SHA-256 of its bytes, 32 characters (the same id the API answers and events carry)."""
    return hashlib.sha256(raw).hexdigest()[:32]


def is_holdout(message_id: str, modulo: int = HOLDOUT_MODULO) -> bool:
    """Deterministic, order-independent held-out membership: the same message is held out in every run."""
    return int(hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:8], 16) % modulo == 0


def model_evidence(label: str, probability: float | None) -> int:
    """+1 when the vote agrees with a very sure model, -1 when it contradicts one, 0 otherwise."""
    if probability is None or math.isnan(probability):
        return 0
    if probability >= SURE_HIGH:
        return 1 if label == "spam" else -1
    if probability <= SURE_LOW:
        return 1 if label == "ham" else -1
    return 0


def trusted(label: str, base_probability: float | None, reporters_reliability: float) -> bool:
    """Whether a consensus label is learned: when the base model is very sure of the
    same class, or its reporters are reliable, or there is no base model to ask (see the module docstring).

    ``reporters_reliability`` is the best reliability among the label's live votes for that label.
    """
    if base_probability is None or math.isnan(base_probability) or model_evidence(label, base_probability) > 0:
        return True
    return reporters_reliability >= RELIABLE
