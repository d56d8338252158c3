"""The worker's Prometheus series: defined once, here, and served on ``worker_port``.

Quality series are measured, not decorated: the *quality set* is fixed (the corpus's held-out part, never
trained on, hard ham included) and re-scored whenever the champion or the rules change, so a curve of the model's
recall against the labels behind the champion, or of the rules' recall against the number of rules, is a curve of
champions, never of rejected challengers. Series whose label set could grow with users or versions (reporters,
served versions) are bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["Backlog", "WorkerMetrics"]

log = structlog.get_logger(__name__)

FPRS = ("0.001", "0.01")


class WorkerMetrics:
    """One registry per worker process (tests create several side by side)."""

    def __init__(self, *, reporters_max: int = 20, versions_max: int = 20) -> None:
        self.registry = r = CollectorRegistry()
        self.reporters_max = reporters_max
        self.versions_max = versions_max
        self.events = Counter("flywheel_worker_events_total", "Feedback-topic records by type and outcome.",
                              ["type", "outcome"], registry=r)
        self.labels = Counter("flywheel_labels_total", "Labels accepted by consensus.", ["label"], registry=r)
        self.decisions = Counter("flywheel_gate_decisions_total", "Gate decisions.", ["decision", "kind"], registry=r)
        self.promotions = Counter("flywheel_promotions_total", "Champions promoted by the gate.", ["kind"], registry=r)
        self.one_minus_auc = Gauge("flywheel_model_one_minus_auc",
                                   "1-AUC on the gate's last evaluation set (role: challenger or champion).",
                                   ["role", "kind"], registry=r)
        self.gate_eval = Gauge("flywheel_gate_eval_messages", "Composition of the gate's last evaluation set.",
                               ["source", "label"], registry=r)
        self.quality_recall = Gauge("flywheel_quality_recall",
                                    "Spam recall at a false-positive rate on the fixed quality set, by side.",
                                    ["side", "fpr"], registry=r)
        self.quality_one_minus_auc = Gauge("flywheel_quality_one_minus_auc", "1-AUC on the fixed quality set, by side.",
                                           ["side"], registry=r)
        self.quality_messages = Gauge("flywheel_quality_messages", "Messages in the fixed quality set.", ["label"],
                                      registry=r)
        self.examples = Gauge("flywheel_training_examples",
                              "Labelled examples behind the current champion, by source (flags, corpus).",
                              ["source"], registry=r)
        self.champion = Gauge("flywheel_champion_info", "The champion (1 for the current version).",
                              ["version", "kind"], registry=r)
        self.promoted_at = Gauge("flywheel_champion_promoted_timestamp_seconds",
                                 "When the current champion was promoted (Unix time).", registry=r)
        self.rules_active = Gauge("flywheel_rules_active", "Active rules in the worker's rule set.", registry=r)
        self.live = Counter("flywheel_live_verdicts_total",
                            "Served verdicts judged by a later flag, by served version and outcome (tp, fp, tn, fn); each flag "
                            "weighted like a label (models.consensus.live_weight: proven reporters only).",
                            ["version", "outcome"], registry=r)
        self.reporter_weight = Gauge("flywheel_reporter_weight",
                                     "Reputation of the most and least trusted reporters (bounded).", ["reporter"],
                                     registry=r)
        self.reporters = Gauge("flywheel_reporters", "Reporters by reputation band.", ["band"], registry=r)
        self.lag = Gauge("flywheel_worker_lag_records", "Records on the feedback topic not yet processed.", registry=r)
        self.data_version = Gauge("flywheel_worker_data_version", "Changes to what a model would learn so far.",
                                  registry=r)
        self.training = Gauge("flywheel_training_in_progress", "1 while a model of this kind trains.", ["kind"],
                              registry=r)
        self.judged_version = Gauge("flywheel_worker_judged_data_version",
                                    "data_version of the last linear refit the gate judged (caught up when equal).",
                                    registry=r)
        self.refit_seconds = Gauge("flywheel_refit_seconds", "Duration of the last training, by kind.", ["kind"],
                                   registry=r)
        self.store_errors = Counter("flywheel_worker_store_errors_total",
                                    "Batches the store refused (retried, not acknowledged), by cause.", ["error"],
                                    registry=r)
        self.store_ok = Gauge("flywheel_worker_store_ok",
                              "1 while the store applies batches, 0 while it refuses them (the worker retries).",
                              registry=r)
        self.store_bytes = Gauge("flywheel_worker_store_bytes",
                                 "The worker's store: raw mail kept (raw) and the database on disk (file).", ["part"],
                                 registry=r)
        self.store_quota = Gauge("flywheel_worker_store_quota_bytes", "store_quota_bytes: raw mail the store keeps.",
                                 registry=r)
        self.store_dropped = Counter("flywheel_worker_store_dropped_bytes_total",
                                     "Raw mail dropped to stay within the quota (votes kept), by whose share was full.",
                                     ["share"], registry=r)
        self.disk_free = Gauge("flywheel_worker_disk_free_bytes", "Free bytes on the store's file system.",
                               registry=r)
        self.store_ok.set(1)
        for cause in ("locked", "disk_full", "io", "other"):  # every series from the start (alerts, dashboards)
            self.store_errors.labels(error=cause)
        self._champion_key: tuple[str, str] | None = None
        self._shown_reporters: set[str] = set()
        self._live_versions: list[str] = []

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    @property
    def champion_version(self) -> str | None:
        return self._champion_key[0] if self._champion_key else None

    def set_champion(self, version: str, kind: str, promoted_at: float) -> None:
        if self._champion_key is not None and self._champion_key != (version, kind):
            self.champion.remove(*self._champion_key)
        self._champion_key = (version, kind)
        self.champion.labels(version=version, kind=kind).set(1)
        self.promoted_at.set(promoted_at)

    def set_reporters(self, reporters: Iterable[tuple[str, float, int]], bar: float) -> None:
        """Weights of the ``reporters_max`` most telling reporters (half the lowest, half the highest weights)
        and the count per band: one series per reporter would grow with every identity a client invents."""
        rows = sorted(reporters, key=lambda r: (r[1], -r[2], r[0]))
        half = max(1, self.reporters_max // 2)
        shown = {r[0]: r[1] for r in rows[:half] + rows[-half:]} if len(rows) > self.reporters_max else {
            r[0]: r[1] for r in rows}
        for gone in self._shown_reporters - set(shown):
            self.reporter_weight.remove(gone)
        for name, w in shown.items():
            self.reporter_weight.labels(reporter=name).set(w)
        self._shown_reporters = set(shown)
        bands = {"distrusted": 0, "newcomer": 0, "trusted": 0}
        for _, w, _ in rows:
            bands["distrusted" if w < 0.5 * bar else "trusted" if w >= 1.5 else "newcomer"] += 1
        for band, n in bands.items():
            self.reporters.labels(band=band).set(n)

    def count_live(self, tallies: Mapping[tuple[str, str], float]) -> None:
        """Add live verdict outcomes; only the newest ``versions_max`` served versions keep a series."""
        for (version, outcome), n in tallies.items():
            if version not in self._live_versions:
                self._live_versions.append(version)
                for o in ("tp", "fp", "tn", "fn"):
                    self.live.labels(version=version, outcome=o).inc(0)
            self.live.labels(version=version, outcome=outcome).inc(n)
        while len(self._live_versions) > self.versions_max:
            old = self._live_versions.pop(0)
            for o in ("tp", "fp", "tn", "fn"):
                self.live.remove(old, o)


class Backlog:
    """Whether the worker is catching up on a backlog of feedback, and so whether background work should wait.

    A worker that restarts behind a burst (or falls behind a flood) shares two cores between applying the backlog
    and the learner's and the campaign publisher's passes, which featurize, refit and read the whole store again
    for every few batches applied: work that the pass after the backlog redoes on all of it. So while more than
    ``threshold`` records wait, each background task (``who``) runs at most one pass every ``max_wait_s``: the
    backlog is applied at the ingest path's own speed, and a flood that never ends still gets its refits. A
    worker starts ``awaiting`` its first measurement (its consumer has partitions and knows their ends), counted
    as a backlog: a restart's first refit would otherwise start on the first batch of the backlog.
    """

    def __init__(self, threshold: int, max_wait_s: float, *, awaiting: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.max_wait_s = max_wait_s
        self.lag: int | None = None if awaiting else 0  # None: not measured yet
        self._clock = clock
        self._lock = threading.Lock()
        self._ran: dict[str, float] = {}  # who -> when its last pass during this backlog was let through

    def _behind(self) -> bool:
        return self.lag is None or self.lag > self.threshold

    def update(self, lag: int) -> None:
        """The records still to apply (the worker's lag, measured on its timer and with every batch)."""
        with self._lock:
            before, self.lag = self.lag, lag
            behind = lag > self.threshold
            if before is None or (before > self.threshold) != behind:  # the first measurement, or a change
                log.info("catching up on a backlog: background passes wait" if behind
                         else "no backlog: background passes run" if before is None else "backlog applied",
                         lag=lag, threshold=self.threshold)
            if not behind:
                self._ran.clear()

    def defer(self, who: str) -> bool:
        """True when ``who`` should skip this pass (a backlog is being applied and its last pass was recent)."""
        with self._lock:
            if not self._behind():
                return False
            now = self._clock()
            last = self._ran.setdefault(who, now)
            if now - last < self.max_wait_s:
                return True
            self._ran[who] = now
            return False
