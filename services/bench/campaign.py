"""``flywheel bench campaign``: does one trusted flag stop the rest of a campaign, and only the campaign?

On a stack driven from outside (``services.bench.harness.LocalStack``: HTTP, flags through ``/feedback``, the worker
and Kafka in between), with P1's later mail in Date order:

1. Grouping (stated in the output): P1's later spam grouped by near-duplicate in time order, the same text a
   fingerprint sees (subject and visible text, lower-cased, links, addresses and tokens with digits removed),
   4-word shingles, exact Jaccard >= 0.6: each message joins the earliest group whose first copy it is that
   near to, else it starts a group. Every later copy is therefore a near-duplicate of its group's first copy.
2. A reporter earns trust as any user does: flags on earlier mail the base model is sure of, until the worker's
   reputation gives them reliability >= 0.9 (``models.consensus.RELIABLE``).
3. Every later copy is classified before any campaign flag: those the served model (and rules) call ham are the
   misses. Then, group by group in time order, the reporter flags the first copy and each missed later copy is
   classified again until it is spam or 5 s have passed since the flag was accepted: ``campaign_recall`` is the
   share caught within 5 s (target >= 0.9), with the seconds it took.
4. The first copies of the remaining groups are flagged too; once every spam fingerprint is in the API's memory,
   all of P1's later ham is classified: ``campaign_fp`` is the share that campaign memory made spam (target 0).
5. ``memory_bytes_per_100k``: a ``CampaignIndex`` of 100,000 fingerprints, measured in-process (the arrays and
   the ids, and what tracemalloc sees allocated), with its query time at that size.

The model is held still (no refits after the first, no neural retrains): what is measured is campaign memory, not
the learner; the served model is the seed.
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from services.bench.harness import LocalStack
from services.local.daemon import wait_until

if TYPE_CHECKING:
    from models.corpus import CorpusMessage
    from services.settings import Settings

log = structlog.get_logger(__name__)

__all__ = ["TARGETS", "group_near_duplicates", "memory_per_100k", "run_campaign_bench"]

THRESHOLD = 0.6
CATCH_WITHIN_S = 5.0
TARGETS = {"campaign_recall": 0.9, "campaign_fp": 0.0}
GROUPING = ("P1's later spam in Date order; subject and visible text, lower-cased, links, addresses and tokens with "
            "digits removed; 4-word shingles; exact Jaccard >= 0.6 with the group's first copy (each message joins "
            "the earliest such group, else starts one)")
TRUSTED_KEY = "k-campaign-trusted"
WARMUP_FLAGS = 40


def _say(msg: str) -> None:
    print(msg, flush=True)


def _shingle_sets(raws: Sequence[bytes], max_bytes: int) -> list[np.ndarray]:
    from models.campaign import MAX_WORDS, normalise, shingles
    from models.message import parse

    out = []
    for raw in raws:
        m = parse(raw, max_bytes=max_bytes)
        out.append(shingles(normalise(f"{m.subject}\n{m.body_text}")[:MAX_WORDS]))
    return out


def group_near_duplicates(sets: Sequence[np.ndarray], threshold: float = THRESHOLD) -> list[list[int]]:
    """Leader grouping in the given (time) order by exact Jaccard of the shingle sets (see the module docstring).

    Exact: the intersections come from one sparse product of the message-by-shingle incidence matrix."""
    from scipy import sparse

    vocab: dict[int, int] = {}
    rows, cols = [], []
    for i, s in enumerate(sets):
        for h in s.tolist():
            rows.append(i)
            cols.append(vocab.setdefault(h, len(vocab)))
    n = len(sets)
    m = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, max(1, len(vocab))))
    inter = (m @ m.T).tocsr()
    sizes = np.array([len(s) for s in sets], dtype=np.float64)
    leader_of = [-1] * n
    groups: list[list[int]] = []
    group_of_leader: dict[int, int] = {}
    for i in range(n):
        row = inter.getrow(i)
        best = -1
        for j, c in zip(row.indices.tolist(), row.data.tolist(), strict=True):
            if j >= i or leader_of[j] != j:
                continue
            union = sizes[i] + sizes[j] - c
            if union > 0 and c / union >= threshold and (best < 0 or j < best):
                best = j
        if best >= 0:
            leader_of[i] = best
            groups[group_of_leader[best]].append(i)
        else:
            leader_of[i] = i
            group_of_leader[i] = len(groups)
            groups.append([i])
    return groups


def memory_per_100k(n: int = 100_000, queries: int = 500) -> dict[str, Any]:
    """Bytes a full index of ``n`` fingerprints holds (the arrays and ids, and tracemalloc's count) and its query
    time at that size (signatures are random: memory does not depend on content; queries hit and miss)."""
    from models.campaign import NUM_PERM, CampaignIndex

    rng = np.random.default_rng(7)
    sigs = rng.integers(0, 2**32, size=(n, NUM_PERM), dtype=np.uint32)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idx = CampaignIndex(capacity=n)
    for i in range(n):
        idx.add(f"{i:032x}", sigs[i], "spam" if i % 5 else "ham")
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    probe = sigs[rng.integers(0, n, size=queries)].copy()
    probe[:, : NUM_PERM // 4] = rng.integers(0, 2**32, size=(queries, NUM_PERM // 4), dtype=np.uint32)  # J ~ 0.75
    miss = rng.integers(0, 2**32, size=(queries, NUM_PERM), dtype=np.uint32)
    t0 = time.perf_counter()
    hits = sum(idx.query(q) is not None for q in probe)
    t_hit = (time.perf_counter() - t0) / queries
    t0 = time.perf_counter()
    false = sum(idx.query(q) is not None for q in miss)
    t_miss = (time.perf_counter() - t0) / queries
    return {"fingerprints": len(idx), "index_nbytes": idx.nbytes, "traced_bytes": int(traced),
            "bytes_per_fingerprint": round(traced / n, 1), "query_ms_near": round(1000 * t_hit, 3),
            "query_ms_unrelated": round(1000 * t_miss, 3), "near_found": hits / queries,
            "unrelated_matched": false / queries}


def _metric(text: str, name: str, labels: str) -> float | None:
    prefix = f"{name}{{{labels}}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def _flag(stack: LocalStack, label: str, raw: bytes) -> str:
    """Flag a message the way a mail client does: classified first, then flagged by the id of that answer."""
    mid = str(stack.classify(raw)["message_id"])
    r = stack.flag(label, TRUSTED_KEY, message_id=mid)
    if r.status_code != 202:
        raise RuntimeError(f"/feedback answered {r.status_code}: {r.text}")
    return mid


def _reliability(stack: LocalStack, reporter: str) -> float:
    from models.consensus import reliability

    try:
        with stack.db() as db:
            row = db.execute("SELECT agree, disagree FROM reporters WHERE reporter=?", (reporter,)).fetchone()
    except Exception:  # noqa: BLE001 - the store is created by the worker's first batch
        return 0.0
    return reliability(row[0], row[1]) if row else 0.0


def run_campaign_bench(settings: Settings, json_path: Path | None, *, every: int = 1,
                       memory_n: int = 100_000) -> dict[str, Any]:
    """Run the benchmark (module docstring); ``every`` > 1 keeps one group in ``every``, and one later ham in
    ``every`` for the false-positive part (a quicker run, for tests; the targets are stated for the whole set)."""
    from models.campaign import fingerprint_text
    from models.corpus import load_corpus, message_date, split_p1

    started = time.monotonic()
    corpus = load_corpus(settings.downloads, settings.corpus_dir)
    train, test = split_p1(corpus)

    def when(m: CorpusMessage) -> float:
        d = message_date(m.raw)
        return d.timestamp() if d is not None else float("inf")

    spam = sorted((m for m in test if m.is_spam), key=when)
    ham = [m for m in test if not m.is_spam]
    _say(f"==> grouping {len(spam)} later spam and {len(ham)} later ham by near-duplicate")
    spam_sets = _shingle_sets([m.raw for m in spam], settings.analyse_bytes)
    groups = group_near_duplicates(spam_sets)
    with_copies = [g for g in groups if len(g) > 1]
    in_groups = sum(len(g) for g in with_copies)
    ham_sets = _shingle_sets([m.raw for m in ham], settings.analyse_bytes)
    ham_groups = group_near_duplicates(ham_sets)
    ham_near = sum(len(g) for g in ham_groups if len(g) > 1)
    _say(f"    {len(groups)} spam groups, {len(with_copies)} with near-duplicates ({in_groups} messages); "
         f"{ham_near} ham in near-duplicate groups")
    chosen = with_copies[:: max(1, every)]
    singles = [g for g in groups if len(g) == 1][:: max(1, every)]

    result: dict[str, Any] = {"grouping": GROUPING, "threshold": THRESHOLD, "catch_within_s": CATCH_WITHIN_S,
                              "later_spam": len(spam), "later_ham": len(ham), "spam_groups": len(groups),
                              "spam_groups_with_copies": len(with_copies), "spam_with_near_duplicates": in_groups,
                              "ham_with_near_duplicates": ham_near, "every": every}
    root = settings.state_dir / "bench-campaign" / time.strftime("%Y%m%dT%H%M%S")
    keys = {TRUSTED_KEY: "trusted", "dev-admin-key": "admin"}
    with LocalStack(settings, root, api_keys=keys, linear_refit_s=86400.0, neural_retrain=False,
                    feedback_identity_rate=1000.0, feedback_identity_burst=100_000,
                    feedback_source_rate=1000.0, feedback_source_burst=100_000) as stack:
        # -- a reporter earns trust ------------------------------------------------------------------------
        rnd = random.Random(20261207)
        warm = rnd.sample(train, min(len(train), WARMUP_FLAGS))
        _say(f"==> the reporter earns trust: {len(warm)} flags on earlier mail")
        for m in warm:
            _flag(stack, "spam" if m.is_spam else "ham", m.raw)
        wait_until(lambda: _reliability(stack, "trusted") >= 0.9, 180, "the reporter's reliability to reach 0.9", 0.5)
        result["reporter_reliability"] = round(_reliability(stack, "trusted"), 3)
        _say(f"    reliability {result['reporter_reliability']}")

        # -- the misses, before any campaign flag ------------------------------------------------------------
        later = [i for g in chosen for i in g[1:]]
        answers = stack.classify_many([spam[i].raw for i in later])
        missed = {i for i, a in zip(later, answers, strict=True) if not a["is_spam"]}
        result["later_copies"] = len(later)
        result["later_copies_missed_by_model"] = len(missed)
        _say(f"==> {len(later)} later copies in {len(chosen)} groups; the served model misses {len(missed)}")

        # -- one flag per group, then the missed copies within 5 s --------------------------------------------
        outcomes: list[dict[str, Any]] = []

        def run_group(g: list[int]) -> None:
            first = spam[g[0]]
            todo = [i for i in g[1:] if i in missed]
            _flag(stack, "spam", first.raw)
            flagged_at = time.monotonic()
            fingerprinted = fingerprint_text(_text(first.raw, settings.analyse_bytes)) is not None
            pending = set(todo)
            caught: dict[int, float] = {}
            while pending and time.monotonic() - flagged_at <= CATCH_WITHIN_S:
                for i in sorted(pending):
                    a = stack.classify(spam[i].raw)
                    if a["is_spam"]:
                        caught[i] = time.monotonic() - flagged_at
                        pending.discard(i)
                if pending:
                    time.sleep(0.1)
            for i in todo:
                outcomes.append({"group_first": g[0], "message": i, "caught": i in caught,
                                 "seconds": round(caught[i], 2) if i in caught else None,
                                 "first_copy_fingerprinted": fingerprinted,
                                 **({} if i in caught else _why_missed(spam_sets, g[0], i, spam, settings.analyse_bytes))})

        _say(f"==> flagging the first copy of each group ({len(chosen)}) and classifying its missed copies")
        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(run_group, chosen))
        n_pop = len(outcomes)
        n_caught = sum(o["caught"] for o in outcomes)
        secs = [o["seconds"] for o in outcomes if o["seconds"] is not None]
        result["campaign_population"] = n_pop
        result["campaign_caught"] = n_caught
        result["campaign_recall"] = round(n_caught / n_pop, 4) if n_pop else None
        result["seconds_to_catch"] = ({"median": round(float(np.median(secs)), 2), "max": round(max(secs), 2)}
                                      if secs else None)
        result["missed_without_fingerprint"] = sum(not o["first_copy_fingerprinted"] and not o["caught"]
                                                   for o in outcomes)
        result["not_caught"] = [o for o in outcomes if not o["caught"]]
        _say(f"    caught {n_caught} of {n_pop} within {CATCH_WITHIN_S:.0f} s: campaign_recall "
             f"{result['campaign_recall']}")

        # -- every spam fingerprint in, then all later ham ---------------------------------------------------
        ham_run = ham[:: max(1, every)]
        _say(f"==> flagging the other groups' first copies ({len(singles)}), then classifying {len(ham_run)} later ham")
        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(lambda g: _flag(stack, "spam", spam[g[0]].raw), singles))
        first_copies = [spam[g[0]] for g in chosen + singles]
        expected = sum(fingerprint_text(_text(m.raw, settings.analyse_bytes)) is not None for m in first_copies)

        def api_has() -> float:
            text = stack.http.get("/metrics").text
            return _metric(text, "flywheel_campaign_fingerprints", 'flagged="spam"') or 0.0

        wait_until(lambda: api_has() >= expected, 300, f"{expected} spam fingerprints in the API's memory", 0.5)
        result["spam_fingerprints"] = int(api_has())
        ham_answers = stack.classify_many([m.raw for m in ham_run])
        blocked = [a for a in ham_answers if a["decided_by"] == "campaign"]
        near_spam = [a for a in ham_answers if (a.get("campaign") or {}).get("flagged") == "spam"]
        result["ham_classified"] = len(ham_run)
        result["campaign_fp"] = round(len(blocked) / len(ham_run), 5)
        result["campaign_fp_count"] = len(blocked)
        result["ham_matching_a_spam_fingerprint"] = len(near_spam)
        result["ham_served_fpr_without_campaign"] = round(
            sum(a["is_spam"] and a["decided_by"] != "campaign" for a in ham_answers) / len(ham_run), 5)
        _say(f"    campaign memory made {len(blocked)} of {len(ham_run)} ham spam: campaign_fp {result['campaign_fp']}")

    _say(f"==> memory: a campaign index of {memory_n:,} fingerprints")
    mem = memory_per_100k(memory_n)
    result["memory"] = mem
    result["memory_bytes_per_100k"] = round(mem["traced_bytes"] * 100_000 / memory_n)
    result["checks"] = {
        "campaign_recall": {"value": result["campaign_recall"], "target": TARGETS["campaign_recall"],
                            "ok": result["campaign_recall"] is not None
                            and result["campaign_recall"] >= TARGETS["campaign_recall"]},
        "campaign_fp": {"value": result["campaign_fp"], "target": TARGETS["campaign_fp"],
                        "ok": result["campaign_fp"] <= TARGETS["campaign_fp"]},
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    _say(format_result(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _why_missed(sets: Sequence[np.ndarray], first: int, copy: int, msgs: Sequence[CorpusMessage],
                max_bytes: int) -> dict[str, Any]:
    """For a copy not caught: its exact Jaccard with the flagged first copy, and campaign memory's estimate."""
    from models.campaign import fingerprint_text

    a, b = set(sets[first].tolist()), set(sets[copy].tolist())
    fa, fb = fingerprint_text(_text(msgs[first].raw, max_bytes)), fingerprint_text(_text(msgs[copy].raw, max_bytes))
    return {"exact_jaccard": round(len(a & b) / max(1, len(a | b)), 3),
            "estimate": None if fa is None or fb is None else round(float((fa == fb).mean()), 3)}


def _text(raw: bytes, max_bytes: int) -> str:
    from models.message import parse

    m = parse(raw, max_bytes=max_bytes)
    return f"{m.subject}\n{m.body_text}"


def format_result(r: dict[str, Any]) -> str:
    mem = r["memory"]
    lines = [
        f"grouping: {r['grouping']}",
        f"later spam {r['later_spam']}: {r['spam_with_near_duplicates']} in {r['spam_groups_with_copies']} groups "
        f"with near-duplicates; later ham {r['later_ham']}: {r['ham_with_near_duplicates']} with near-duplicates",
        f"campaign_recall {r['campaign_recall']} ({r['campaign_caught']} of {r['campaign_population']} later copies "
        f"the served model missed, caught within {r['catch_within_s']:.0f} s of the first copy's flag; "
        f"seconds {r['seconds_to_catch']}) target >= {TARGETS['campaign_recall']}",
        f"campaign_fp {r['campaign_fp']} ({r['campaign_fp_count']} of {r['ham_classified']} later ham made spam by "
        f"campaign memory, {r['spam_fingerprints']} spam fingerprints in) target {TARGETS['campaign_fp']}",
        f"memory_bytes_per_100k {r['memory_bytes_per_100k']:,} ({mem['bytes_per_fingerprint']} B per fingerprint; "
        f"query {mem['query_ms_near']} ms near, {mem['query_ms_unrelated']} ms unrelated, at {mem['fingerprints']:,})",
    ]
    return "\n".join(lines)
