"""The worker's side of the journal (``streams.journal``): its two write paths journaled, and the rebuild.

Both transactions that change the store, a batch of feedback records (:func:`apply_journaled`) and the models'
evidence on pending votes (:func:`count_evidence`), write their journal entry first and commit with its offset,
under one lock, so the journal's order is the store's. A worker on an empty disk replays the journal
(:func:`rebuild_store`): labels and reputations follow from the feedback records *in the order one worker applied
them* and from the evidence its learner gave each vote, and replaying both through the store's own write paths
gives the store the writer had, whatever models this worker holds. It then consumes on from the group's committed
offsets: every committed record was journaled first, so none is missed, and the store skips those it already has.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from streams.journal import BatchEntry, FeedbackReader, batch_entry, committed_entries, evidence_entry
from streams.topics import Topics

if TYPE_CHECKING:
    from collections.abc import Sequence

    from services.settings import Settings
    from services.worker.store import BatchResult, LabelStore
    from streams.journal import JournalWriter
    from streams.records import Record

log = structlog.get_logger(__name__)

__all__ = ["RebuildFailed", "apply_journaled", "count_evidence", "rebuild_store"]

PROGRESS_EVERY_S = 5.0


def apply_journaled(store: LabelStore, journal: JournalWriter, records: Sequence[Record]) -> BatchResult:
    """Apply a batch of feedback records, journaled first (``BrokerUnavailable``: nothing was committed)."""
    with journal.lock:
        at = journal.write(batch_entry(records, store.journal_prev()))
        return store.apply(records, journal_at=at)


def count_evidence(store: LabelStore, journal: JournalWriter | None, seqs: Sequence[int],
                   evidence: Sequence[tuple[str, int]]) -> dict[tuple[str, str], float]:
    """Count the models' evidence on the pending votes ``seqs`` (the store's vote sequence, in order), journaled
    first where there is a journal: a worker rebuilt from the log cannot judge them again with the same models.
    Returns the live tallies they add (:meth:`LabelStore.apply_model_evidence`)."""
    if journal is None:
        return store.apply_model_evidence(seqs[-1], evidence)
    votes = [(seq, rep, e) for seq, (rep, e) in zip(seqs, evidence, strict=True)]
    with journal.lock:
        at = journal.write(evidence_entry(seqs[-1], votes, store.journal_prev()))
        return store.apply_model_evidence(seqs[-1], evidence, journal_at=at)


class RebuildFailed(RuntimeError):
    """The journal names a feedback record the topic no longer holds (retention), or an entry is not the worker's."""


def rebuild_store(settings: Settings, store: LabelStore) -> dict[str, int]:
    """Replay the journal into ``store`` (empty); returns what was applied. ``RebuildFailed`` when it cannot be
    exact: a worker that consumed on from there would hold a different history without saying so."""
    from streams.events import EventInvalid

    config = settings.streams()
    topics = Topics.from_config(config)
    reader = FeedbackReader(config)
    done = {"batches": 0, "records": 0, "evidence": 0, "votes_judged": 0}
    started = shown = time.monotonic()
    log.info("rebuilding the worker's store from the journal", journal=topics.journal, feedback=topics.feedback)
    try:
        for offset, entry in committed_entries(config, topics.journal):
            if isinstance(entry, BatchEntry):
                records = reader.fetch(entry.runs)
                store.apply(records, journal_at=offset)
                done["batches"] += 1
                done["records"] += len(records)
            else:
                judged = store.counter("evidence_seq")
                votes = [(reporter, e) for seq, reporter, e in entry.votes if seq > judged]
                if votes and entry.upto_seq > judged:
                    store.apply_model_evidence(entry.upto_seq, votes, journal_at=offset)
                    done["votes_judged"] += len(votes)
                done["evidence"] += 1
            if time.monotonic() - shown >= PROGRESS_EVERY_S:
                shown = time.monotonic()
                log.info("rebuilding", seconds=round(shown - started, 1), **done)
    except (LookupError, EventInvalid) as exc:
        raise RebuildFailed(f"the worker's store cannot be rebuilt exactly: {exc}") from exc
    finally:
        reader.close()
    log.info("worker store rebuilt from the journal", seconds=round(time.monotonic() - started, 1),
             labels=store.label_counts(), **done)
    return done
