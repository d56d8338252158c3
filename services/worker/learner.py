"""The models side of the worker: two training clocks, the gate, lineage, promotion.

* **Fast clock (linear).** Whenever the store's ``data_version`` has moved and ``linear_refit_s`` seconds have
  passed since the last refit, the linear model is refit on the base corpus plus every trusted consensus label
  (:mod:`models.learning`): cross-fitted three times (each message in a fixed fold of each, by its id),
  bagged, calibrated out of sample, with its regularisation and flag weight re-chosen by validation whenever the
  flags have grown fourfold since the last choice.
* **Slow clock (PyTorch).** :class:`~models.learning.RetrainSchedule` decides: early and often while flags keep
  arriving on mail the champion gets wrong, less often as the data grows. It trains in its own thread, off the
  ingest path and off the fast clock.
* **The gate** (:func:`models.gate.decide`) compares challenger and champion on the same flags, each scored out
  of sample: a model's cross-fitted (or validation) scores on the flags it trained on, and on flags it never saw
  the scores of its fold models (kept in memory for the champion and the anchor; after a restart, its served
  model's). These are stored per version under ``<state>/worker/oof/``, so a restarted worker judges the
  champion as before. The corpus's held-out part tops the set up while flags are few and serves as the clean
  reference set. Every decision goes to the registry's decisions log, the model-events topic and the metrics.

Trust. A label is learned unless it contradicts a very sure base model, or lands on mail that model is unsure of,
while its reporters are not reliable (:func:`models.consensus.trusted`). The gate judges on every label, learned
or not (see :meth:`Learner.challenge`). A learned flag weighs its :func:`~models.consensus.confidence`:
what its reporters' record says it is worth (0.6 for a newcomer, nearly 1 for a proven reporter, 0.4 for one
whose flags are 30% wrong, nothing for a hostile one).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from models.consensus import SURE_HIGH, SURE_LOW, confidence, model_evidence, trusted
from models.features import FeatureBatch, FeatureConfig
from models.gate import EvalItem, GatePolicy, GateResult, ScoredModel, compose_eval_set, decide
from models.learning import (
    CrossFit,
    LinearChoice,
    RetrainSchedule,
    TrainingSet,
    calibrate,
    cross_fit_linear,
    fit_neural,
    fold_key,
    refit_linear,
    select_linear,
)
from models.message import configure_trusted_authserv_ids
from models.metrics import recall_at_fpr, roc_auc
from models.registry import jsonable
from services.worker.data import Candidate, CorpusData, Judge, load_oof, oof_path, save_oof
from services.worker.journal import count_evidence
from services.worker.store import Labelled, LabelStore

if TYPE_CHECKING:
    from models.classifier import Calibration
    from models.linear import LinearModel
    from models.registry import LoadedModel, Registry, SelfCheckVector
    from models.rules import RuleEngine, RuleResult
    from services.settings import Settings
    from services.worker.metrics import Backlog, WorkerMetrics
    from streams.events import ModelEvent
    from streams.journal import JournalWriter

log = structlog.get_logger(__name__)

__all__ = ["Learner"]

SELF_CHECK_MESSAGES = 4
SELECT_FIRST = 100
SELECT_GROWTH = 4
"""The linear model's configuration is re-chosen by validation once 100 flags are in, then each time the flags
have grown fourfold (a choice costs four cross-fits; the refits in between reuse it), and once more when the
flags settle on more than the last choice saw (see :meth:`Learner.step`)."""
NEURAL_NICE = 10
"""The slow clock's thread runs at a lower CPU priority: on a small machine the fast clock and serving go first."""


# ============================================================================================ the learner
class Learner:
    """See the module docstring. One instance per worker; ``start`` runs its loop in a thread."""

    def __init__(
        self,
        settings: Settings,
        store: LabelStore,
        metrics: WorkerMetrics,
        emit: Callable[[ModelEvent], None],
        corpus: CorpusData,
        journal: JournalWriter | None = None,
        *,
        backlog: Backlog | None = None,
    ) -> None:
        from models.registry import Registry
        from models.rules import RuleEngine

        self.settings = settings
        self.journal = journal  # judged votes are journaled before they count (streams.journal)
        self.backlog = backlog  # while the ingest catches up, passes wait (services.worker.metrics.Backlog)
        configure_trusted_authserv_ids(settings.trusted_authserv_ids)  # as the API parses
        self.store = store
        self.metrics = metrics
        self.emit = emit
        self.corpus = corpus
        self.registry: Registry = Registry(settings.registry)
        self.dir = settings.state_dir / "worker"
        self.oof_dir = self.dir / "oof"
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.policy = GatePolicy(alpha=settings.gate_alpha, relative_margin=settings.gate_relative_margin,
                                 margin_cap=settings.gate_margin_cap, fpr_tolerance=settings.gate_fpr_tolerance,
                                 clean_error=settings.gate_clean_error)
        self.schedule = RetrainSchedule(first=settings.neural_first, growth=settings.neural_growth,
                                        surprises=settings.neural_surprises)
        self.features = FeatureConfig()
        self.rules: RuleEngine = RuleEngine.default()
        self._rules_mtime: float | None = None
        self._rows: dict[str, tuple[FeatureBatch, float, RuleResult]] = {}
        self._rows_lock = threading.Lock()
        self.gate_lock = threading.Lock()
        self.refresh_rules()
        self.base_model = self._base_model()
        self._base_prob: dict[str, float] = {}
        self.current: LinearModel | None = None  # the latest linear refit (evidence: sure where base is sure too)
        self.choice: LinearChoice | None = None
        self._chosen_at_flags = 0
        self._refit_flags = 0  # trusted flags behind the last refit
        self._refit_at: int | None = None  # data_version of the last refit
        self._last_refit = 0.0
        self._neural_at_labels = sum(store.label_counts().values())  # after a restart, wait for new labels
        self._neural_recency = store.newest_recency()  # newest flag when the last neural retrain started
        self._surprise_ids: set[str] = set()
        self._neural_busy = threading.Event()
        self._threads: list[threading.Thread] = []
        self._judges: dict[str, Judge] = {}
        self._crosses: dict[str, CrossFit] = {}  # the champion's and the anchor's cross-fits, while in memory
        self.anchor_version: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loop_thread: threading.Thread | None = None

    # -- features ----------------------------------------------------------------------------------------
    def featurize(self, raws: Sequence[bytes]) -> tuple[FeatureBatch, list[RuleResult]]:
        from models.features import featurize
        from models.message import parse

        msgs = [parse(r, max_bytes=self.settings.analyse_bytes) for r in raws]
        results = [self.rules.evaluate(m) for m in msgs]
        return featurize(msgs, results, self.features), results

    def rows(self, items: Sequence[tuple[str, bytes]]) -> tuple[FeatureBatch, np.ndarray]:
        """Feature rows and rule scores of (key, raw) pairs, cached by key: each message is parsed once per
        process and per rule set (training sets, evaluation sets and evidence all reuse it)."""
        with self._rows_lock:
            cache = self._rows
            todo = list({k: raw for k, raw in items if k not in cache}.items())
        if todo:
            for i in range(0, len(todo), 512):
                chunk = todo[i : i + 512]
                batch, results = self.featurize([raw for _, raw in chunk])
                with self._rows_lock:
                    if cache is self._rows:
                        for j, (k, _) in enumerate(chunk):
                            cache[k] = (batch.row(j), float(results[j].score), results[j])
        with self._rows_lock:
            got = [self._rows.get(k) for k, _ in items]
        if any(g is None for g in got):  # the rules changed meanwhile: featurize with the new rules
            return self.rows(items)
        return (FeatureBatch.concat([g[0] for g in got if g is not None]),
                np.array([g[1] for g in got if g is not None], dtype=np.float64))

    def refresh_rules(self) -> bool:
        """Follow the operators' rule changes (the API persists them to the rules file); True when reloaded.

        Cached feature rows carry rule hits, so they are dropped: the next training and evaluation see the
        current rules."""
        from models.rules import RuleEngine, RuleError

        path = self.settings.rules_file
        mtime = path.stat().st_mtime if path.exists() else None
        if mtime == self._rules_mtime:
            return False
        try:
            rules = RuleEngine.load(path) if mtime is not None else RuleEngine.default()
        except (OSError, RuleError) as exc:
            log.warning("rules file refused; keeping the current rules", path=str(path), error=str(exc))
            return False
        with self._rows_lock:
            self.rules = rules
            self._rows = {}
        self._rules_mtime = mtime
        self.metrics.rules_active.set(rules.active_count)
        return True

    # -- the base model (evidence and trust) ----------------------------------------------------------------
    def _base_model(self) -> LinearModel:
        """Linear model of the base corpus, never touched by feedback: the anchor of reputation evidence and
        of the trust filter (a poisoner cannot move it). Stored once in the worker's directory."""
        from models.linear import LinearModel

        path = self.dir / "linear_base.npz"
        if path.exists():
            return LinearModel.load(path)
        model = LinearModel(self.features)
        if self.corpus.base:
            batch, _ = self.rows([(mid, raw) for mid, raw, _, _ in self.corpus.base])
            model.fit(batch, np.array([int(s) for _, _, s, _ in self.corpus.base]))
            model.save(path)
        return model

    def base_probability(self, items: Sequence[tuple[str, bytes]]) -> list[float | None]:
        if not self.base_model.fitted:
            return [None] * len(items)
        todo = [(k, raw) for k, raw in items if k not in self._base_prob]
        if todo:
            batch, _ = self.rows(todo)
            for (k, _), p in zip(todo, self.base_model.predict_proba(batch), strict=True):
                self._base_prob[k] = float(p)
        return [self._base_prob[k] for k, _ in items]

    def evidence_probability(self, items: Sequence[tuple[str, bytes]]) -> list[float | None]:
        """The models' opinion for reputation evidence: sure only where the base model AND the latest refit are
        both sure, and then the less sure of the two (the refit follows drift, the base cannot be talked into
        certainty by the reporters it judges)."""
        base = self.base_probability(items)
        current = self.current
        if current is None:
            return base
        batch, _ = self.rows(items)
        now = current.predict_proba(batch)
        out: list[float | None] = []
        for b, c in zip(base, now, strict=True):
            if b is None:
                out.append(float(c))
                continue
            lo, hi = min(b, float(c)), max(b, float(c))
            out.append(lo if lo >= SURE_HIGH else hi if hi <= SURE_LOW else 0.5)
        return out

    def _judge_votes(self, chunk: int = 500) -> int:
        """Model evidence for votes the ingest path recorded; returns how many were judged."""
        pending = self.store.pending_evidence(chunk)
        if not pending:
            return 0
        probs = self.evidence_probability([(mid, raw) for _, _, mid, _, raw in pending])
        evidence = [(rep, model_evidence(label, p)) for (_, rep, _, label, _), p in zip(pending, probs, strict=True)]
        live = count_evidence(self.store, self.journal, [seq for seq, *_ in pending], evidence)
        if live:  # the served verdicts these flags judged, weighted now that the flags are judged
            self.metrics.count_live(live)
        return len(pending)

    # -- the loop ---------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Catch up: judge new votes, then refit or retrain when due. True when it did something.

        Votes are judged first (their evidence moves reputations, and so what is trusted), but a steady stream of
        flags must not starve the refits: one pass judges what is pending now, then the clocks run."""
        if self.backlog is not None and self.backlog.defer("learner"):
            return False
        did = False
        for _ in range(4):  # bounded: under a flood the refit still comes round every few chunks
            n = self._judge_votes()
            did = did or n > 0
            if n < 500:
                break
        if self.refresh_rules():
            self.update_quality("rules")
        if self.registry.champion() != self.metrics.champion_version:  # promoted or rolled back elsewhere
            self.show_champion()
            self.update_quality("promotion")
        version = self.store.data_version
        due = self._refit_at is None or version > self._refit_at
        quiet = time.monotonic() - self._last_refit >= self.settings.linear_refit_s
        if due and quiet:
            self.refit()
            did = True
        elif quiet and self.choice is not None and self._refit_flags > self._chosen_at_flags:
            # The flags have settled on more than the configuration was chosen on: choose again on all of them,
            # so the champion at rest is the refit an offline run on the same data would choose, whatever the
            # sizes at which the stream happened to trigger the choices.
            self.refit(select=True)
            did = True
        self.maybe_retrain_neural()
        return did

    def start(self) -> None:
        """Run :meth:`step` in a background thread, woken by :meth:`wake` after every ingested batch."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    if not self.step():
                        self._wake.wait(0.5)
                        self._wake.clear()
                except Exception:  # keep learning alive; the store is the source of truth
                    log.exception("learner step failed")
                    self._stop.wait(1.0)

        self._loop_thread = threading.Thread(target=loop, name="learner", daemon=True)
        self._loop_thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for t in [self._loop_thread, *self._threads]:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))

    # -- training sets ----------------------------------------------------------------------------------------
    def _trusted(self, labelled: Sequence[Labelled]) -> tuple[list[Labelled], int, bool]:
        """(the labels the learner learns, how many it leaves out, whether the base model vouches for every one
        it learns: very sure of the same class)."""
        probs = self.base_probability([(lb.message_id, lb.raw) for lb in labelled])
        kept = [(lb, p) for lb, p in zip(labelled, probs, strict=True) if trusted(lb.label, p, lb.reliability)]
        vouched = bool(kept) and all(model_evidence(lb.label, p) > 0 for lb, p in kept)
        return [lb for lb, _ in kept], len(labelled) - len(kept), vouched

    def training_set(self, flags: Sequence[Labelled]) -> TrainingSet:
        base = self.corpus.base
        items = [(mid, raw) for mid, raw, _, _ in base] + [(lb.message_id, lb.raw) for lb in flags]
        batch, rule_scores = self.rows(items)
        labels = [int(s) for _, _, s, _ in base] + [int(lb.label == "spam") for lb in flags]
        is_flag = [False] * len(base) + [True] * len(flags)
        conf = [1.0] * len(base) + [confidence(lb.reliability) for lb in flags]
        keys = [fold_key(mid) for mid, _, _, _ in base] + [fold_key(lb.message_id) for lb in flags]
        return TrainingSet(batch, np.array(labels), rule_scores, np.array(is_flag), np.array(conf), np.array(keys))

    @staticmethod
    def _lineage(flags: Sequence[Labelled], train: TrainingSet, data_version: int, untrusted: int) -> dict[str, Any]:
        from models.registry import training_set_hash

        ranges: dict[str, list[int]] = {}
        for lb in flags:
            for t, p, o in lb.offsets:
                r = ranges.setdefault(f"{t}:{p}", [o, o])
                r[0], r[1] = min(r[0], o), max(r[1], o)
        raws = [lb.raw for lb in flags]
        return {
            "reference_held_out": True,
            "offsets": dict(sorted(ranges.items())),
            "counts": train.counts(),
            "flags": len(flags),
            "untrusted_flags_left_out": untrusted,
            "data_version": data_version,
            "flags_hash": training_set_hash(raws, [lb.label == "spam" for lb in flags]),
        }

    # -- the fast clock -----------------------------------------------------------------------------------------
    def refit(self, *, select: bool = False) -> str | None:
        """Refit the linear model on the base corpus plus every trusted label; gate it. ``select`` re-chooses
        the configuration by validation whatever the flags' growth since the last choice."""
        self.metrics.training.labels(kind="linear").set(1)
        data_version = self.store.data_version
        try:
            return self._refit(data_version, select=select)
        finally:
            self.metrics.training.labels(kind="linear").set(0)
            self.metrics.judged_version.set(data_version)

    def _refit(self, data_version: int, *, select: bool = False) -> str | None:
        started = time.monotonic()
        self._refit_at = data_version
        self._last_refit = started
        labelled = self.store.labelled()
        flags, untrusted, vouched = self._trusted(labelled)
        if not flags and self.registry.champion() is not None:
            return None  # nothing to learn that the champion lacks
        train = self.training_set(flags)
        if len(set(train.labels.tolist())) < 2:
            log.info("refit skipped: one class only")
            return None
        n_flags = len(flags)
        self._refit_flags = n_flags
        reselected = select and self.choice is not None
        if select or self.choice is None or n_flags >= max(SELECT_GROWTH * self._chosen_at_flags, SELECT_FIRST):
            self.choice = select_linear(train, features=self.features)
            self._chosen_at_flags = max(n_flags, 1)
        else:
            self.choice.cross = cross_fit_linear(train, self.choice.config, self.choice.flag_weight,
                                                 features=self.features)
        choice = self.choice
        model = refit_linear(train, choice, features=self.features)
        cal, cal_source = calibrate(train, choice.oof, fpr_budget=self.settings.fpr_budget)
        self.current = model
        base_n = train.rows - n_flags
        oof = {lb.message_id: float(z) for lb, z in zip(flags, choice.oof[base_n:], strict=True)}
        lineage = {"source": "refit: base corpus + trusted consensus flags (cross-fitted, bagged)",
                   **self._lineage(flags, train, data_version, untrusted), "calibration": cal_source}
        hp = {**choice.config.to_dict(), "flag_weight": choice.flag_weight, "bag": len(choice.cross.models) + 1,
              "selected_by": f"out-of-fold 1-AUC on {choice.judged_on}", "candidates": choice.report,
              "flag_confidence": "2 * reliability - 1 (models.consensus.confidence)"}
        training_s = time.monotonic() - started
        self.metrics.refit_seconds.labels(kind="linear").set(training_s)
        cand = Candidate("linear", model, cal, oof, set(oof), data_version, lineage, hp, training_s, linear_state=model,
                         cross=choice.cross, reselected=reselected, vouched=vouched)
        return self.challenge(cand, labelled)

    # -- the slow clock -----------------------------------------------------------------------------------------
    def maybe_retrain_neural(self, force: bool = False) -> bool:
        if not self.settings.neural_retrain or self._neural_busy.is_set():
            return False
        labels_now = sum(self.store.label_counts().values())
        if not force and not self.schedule.due(labels_now, self._neural_at_labels, len(self._surprise_ids)):
            return False
        self._neural_at_labels = labels_now
        self._neural_recency = self.store.newest_recency()
        self._surprise_ids = set()
        self._neural_busy.set()
        t = threading.Thread(target=self._retrain_neural, name="retrain-neural", daemon=True)
        self._threads = [th for th in self._threads if th.is_alive()] + [t]
        t.start()
        return True

    def _retrain_neural(self) -> None:
        with contextlib.suppress(OSError):  # Linux: a thread's nice value is its own (per task id)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NEURAL_NICE)
        self.metrics.training.labels(kind="neural").set(1)
        try:
            self.retrain_neural()
        except Exception:  # a failed retrain must not stop the worker; the schedule retries
            log.exception("neural retrain failed")
        finally:
            self._neural_busy.clear()
            self.metrics.training.labels(kind="neural").set(0)

    def retrain_neural(self) -> str | None:
        """Train the PyTorch challenger on the same data as the linear refit (minus a stratified validation
        share that chooses its configuration and calibrates it); gate it."""
        started = time.monotonic()
        data_version = self.store.data_version
        labelled = self.store.labelled()
        flags, untrusted, vouched = self._trusted(labelled)
        train = self.training_set(flags)
        if len(set(train.labels.tolist())) < 2:
            return None
        fit = fit_neural(train, self.choice.flag_weight if self.choice else 1.0, features=self.features)
        cal, cal_source = fit.calibrate(train, fpr_budget=self.settings.fpr_budget)
        base_n = train.rows - len(flags)
        oof = {flags[i - base_n].message_id: float(z) for i, z in zip(fit.validation, fit.logits, strict=True)
               if i >= base_n}
        trained = {lb.message_id for lb in flags}  # every flag: the validation ones judge through ``oof``
        lineage = {"source": "PyTorch: base corpus + trusted consensus flags, minus a 15% validation share",
                   **self._lineage(flags, train, data_version, untrusted), "calibration": cal_source,
                   "validation_rows": int(fit.validation.size)}
        hp = {**fit.config, "selected_by": "validation 1-AUC (15% stratified by source and class)",
              "candidates": fit.report}
        training_s = time.monotonic() - started
        self.metrics.refit_seconds.labels(kind="neural").set(training_s)
        cand = Candidate("neural", fit.model, cal, oof, trained, data_version, lineage, hp, training_s,
                         vouched=vouched)
        return self.challenge(cand, labelled)

    # -- the gate ---------------------------------------------------------------------------------------------------
    def _judge(self, version: str) -> Judge | None:
        from models.classifier import Calibration
        from models.registry import ModelRejected, RegistryError

        judge = self._judges.get(version)
        if judge is None:
            try:
                loaded: LoadedModel = self.registry.load(version, max_bytes=self.settings.analyse_bytes)
            except (ModelRejected, RegistryError) as exc:
                log.warning("cannot load a version for the gate", version=version, error=str(exc))
                return None
            oof, trained, dv = load_oof(self.oof_dir, version)
            judge = Judge(version, loaded.kind, loaded.model, Calibration.from_meta(loaded.calibration), oof, trained,
                           dv, bool(loaded.meta.get("lineage", {}).get("reference_held_out")))
            self._judges = {v: j for v, j in self._judges.items() if v in (self.anchor_version,)}
            self._judges[version] = judge
        return judge

    def _reference(self) -> list[tuple[str, bytes, bool, str]]:
        """The corpus's held-out part minus anything users flagged (flagged messages may be trained on)."""
        ref = self.corpus.reference
        known = self.store.known_messages([mid for mid, _, _, _ in ref])
        return [r for r in ref if r[0] not in known]

    @staticmethod
    def _scores(judge_logit: Callable[[FeatureBatch], np.ndarray], batch: FeatureBatch) -> np.ndarray:
        return judge_logit(batch) if batch.rows else np.zeros(0)

    def _out_of_sample(self, flags: Sequence[Labelled], batch: FeatureBatch, oof: dict[str, float],
                       trained: set[str], logit: Callable[[FeatureBatch], np.ndarray],
                       cross: CrossFit | None = None) -> np.ndarray:
        """A model's out-of-sample logit per flag (NaN where it trained on the flag without a held-out score).

        A flag the model never saw is scored by its fold models when they are known
        (:meth:`~models.learning.CrossFit.held_out`), else by the served model. Like with like: a challenger's
        scores on its own flags come from fold models, and the bag it serves ranks markedly better than they do
        (about half the ranking errors of a single fold model, measured offline on the flywheel benchmark's
        split). Scoring the champion's unseen flags with its whole bag held every fresher challenger to a higher
        standard than its champion, and the gate kept refusing refits on more data ("not shown not worse",
        differences of -0.0005 to -0.0009). With folds by message (:func:`~models.learning.fold_key`), the
        champion's fold models for a new flag are the siblings of the challenger's that held the same flag out:
        the pair differs by the new flags, not by which rows each happened to leave out."""
        out = np.full(len(flags), np.nan)
        fresh = []
        for i, lb in enumerate(flags):
            if lb.message_id in oof:
                out[i] = oof[lb.message_id]
            elif lb.message_id not in trained:
                fresh.append(i)
        if not fresh:
            return out
        sub = batch.take(fresh)
        z = (cross.held_out(sub, np.array([fold_key(flags[i].message_id) for i in fresh]))
             if cross is not None else np.full(len(fresh), np.nan))
        if np.isnan(z).any():
            z = np.where(np.isnan(z), logit(sub), z)
        out[fresh] = z
        return out

    def challenge(self, cand: Candidate, labelled: Sequence[Labelled]) -> str:
        """Save a challenger, gate it against the champion, promote or reject; returns its version id.

        The gate judges on every consensus label whose reporters are more often right than wrong, trusted or
        not: what the learner leaves out is still evidence of how models rank. Judging on the trusted labels
        alone would make the gate blind to exactly what a challenger gave up: when reporters' reliability falls,
        their earlier labels on hard mail stop being learned and stop being judged, and a challenger that forgot
        them looked perfect on the easy rest (measured on the noisy poisoning test: both AUC 1.00000 on the
        trusted flags, promoted, and 0.0023 AUC worse on mail nobody flagged). Labels the challenger did not
        learn are scored out of sample by its served model, like any flag it never saw.
        """
        from models.runtime import OnnxModel

        flags = [lb for lb in labelled if confidence(lb.reliability) > 0]

        onnx_path = self.dir / "tmp" / f"{cand.kind}-{int(time.time() * 1000)}.onnx"
        cand.model.export_onnx(onnx_path)
        # the provider serving uses (CUDA first where there is one), like the champion's, which the registry opened:
        # both sides of the gate are scored the way they are or would be served
        served = OnnxModel(onnx_path)

        def chall_logit(b: FeatureBatch) -> np.ndarray:
            return np.asarray(served.decision_function(b), dtype=np.float64).reshape(-1)

        with self.gate_lock:
            champ_v = self.registry.champion()
            champ = self._judge(champ_v) if champ_v else None
            batch, rule_scores = self.rows([(lb.message_id, lb.raw) for lb in flags])
            # Each model's out-of-sample logit on every flag (NaN where it cannot judge one), then on the clean
            # reference set (the corpus's held-out part, which no model trained on).
            chall_flags = self._out_of_sample(flags, batch, cand.oof, cand.trained, chall_logit, cand.cross)
            champ_flags = (self._out_of_sample(flags, batch, champ.oof, champ.trained, champ.logit,
                                               self._crosses.get(champ.version))
                           if champ is not None else np.zeros(len(flags)))
            judgeable = np.flatnonzero(~np.isnan(chall_flags) & ~np.isnan(champ_flags))
            ref = self._reference()
            ref_batch, ref_rules = self.rows([(mid, raw) for mid, raw, _, _ in ref])
            ref_y = np.array([s for _, _, s, _ in ref], dtype=bool)
            chall_ref = chall_logit(ref_batch) if ref else np.zeros(0)
            champ_ref = champ.logit(ref_batch) if (ref and champ is not None) else np.zeros(len(ref))
            # The evaluation set: flags first, the reference set's messages as a top-up while flags are few.
            # Each item's key names its row: ("flags", position in ``flags``) or ("corpus", position in ``ref``).
            rows: dict[str, tuple[str, int]] = {}
            flag_items = []
            for i in judgeable.tolist():
                rows[key := f"flag:{i}"] = ("flags", i)
                flag_items.append(EvalItem(key, flags[i].label == "spam", "flags", flags[i].label, flags[i].recency))
            corpus_items = []
            for i, (_, _, is_spam, group) in enumerate(ref):
                rows[key := f"corpus:{i}"] = ("corpus", i)
                corpus_items.append(EvalItem(key, is_spam, "corpus", group))
            order = np.random.default_rng(0).permutation(len(corpus_items))
            sel = compose_eval_set(flag_items, [corpus_items[i] for i in order],
                                   min_per_class=self.settings.gate_eval_min_per_class,
                                   max_per_class=self.settings.gate_eval_max_per_class)
            from_flags = [rows[it.key][1] for it in sel.items if rows[it.key][0] == "flags"]
            from_ref = [rows[it.key][1] for it in sel.items if rows[it.key][0] == "corpus"]

            def on_set(on_flags: np.ndarray, on_ref: np.ndarray) -> np.ndarray:
                """A per-flag and a per-reference-message array, restricted to the evaluation set, in its order."""
                return np.concatenate([on_flags[from_flags], on_ref[from_ref]]) if (from_flags or from_ref) \
                    else np.zeros(0)

            y = on_set(np.array([lb.label == "spam" for lb in flags], dtype=bool), ref_y).astype(bool)
            right = on_set(np.array([lb.reliability for lb in flags], dtype=np.float64), np.ones(len(ref)))
            set_rules = on_set(rule_scores, ref_rules)
            chall_set, champ_set = on_set(chall_flags, chall_ref), on_set(champ_flags, champ_ref)

            def scored(z: np.ndarray, cal: Calibration, rules: np.ndarray) -> ScoredModel:
                return ScoredModel(z, cal.combined(z, rules) >= cal.threshold)

            # Fresher: labels the champion never saw, or (a re-chosen configuration) validation on all of them.
            fresher = champ is None or cand.data_version > champ.data_version or cand.reselected
            # A refit on more of the same data: the champion's family, every flag the champion trained on, judged
            # on users' flags alone. While flags are few the corpus tops the set up, and every model looks alike
            # and nearly faultless on that old mail: its error says nothing of how clean the users' labels are
            # (30% wrong flags: a refit on the first handful was waved through there and served 1.02x the seed).
            refit = (champ is not None and cand.kind == champ.kind and champ.trained <= cand.trained
                     and "corpus" not in sel.composition)
            anchor = None
            if champ is not None and self.anchor_version not in (None, champ.version):
                a = self._judge(self.anchor_version) if self.anchor_version else None
                if a is not None:
                    anchor_flags = self._out_of_sample(flags, batch, a.oof, a.trained, a.logit,
                                                       self._crosses.get(a.version))
                    anchor_set = on_set(anchor_flags, a.logit(ref_batch) if ref else np.zeros(0))
                    if not np.isnan(anchor_set).any():
                        anchor = scored(anchor_set, a.calibration, set_rules)
            result: GateResult = decide(
                y, scored(chall_set, cand.calibration, set_rules),
                scored(champ_set, champ.calibration, set_rules) if champ is not None else None,
                fresher=fresher, refit=refit, policy=self.policy, anchor=anchor, reliability=right,
                vouched=cand.vouched,
                # A champion that trained on the reference set (an older seed) would look better there than it is.
                reference=(ref_y, scored(chall_ref, cand.calibration, ref_rules),
                           scored(champ_ref, champ.calibration, ref_rules))
                if (ref and champ is not None and champ.reference_held_out) else None,
            )
            version = self._save(cand, onnx_path, champ_v, sel.composition, result)
            if cand.cross is not None:
                self._crosses[version] = cand.cross
            self._record(cand, version, champ, result, sel.composition, y, chall_set, champ_set, judged=champ_v)
            keep = {self.registry.champion(), self.anchor_version}
            self._crosses = {v: c for v, c in self._crosses.items() if v in keep}
            self._count_surprises(flags, champ_flags, champ, cand.trained)
            return version

    def _count_surprises(self, flags: Sequence[Labelled], champ_flags: np.ndarray, champ: Judge | None,
                         trained: set[str]) -> None:
        """Remember flags, newer than the last neural retrain, on mail the champion got wrong (its model verdict,
        out of sample): the slow clock retrains early while they pile up."""
        if champ is None:
            return
        thr = champ.calibration.model_threshold_logit
        for lb, z in zip(flags, champ_flags, strict=True):
            if lb.message_id not in trained:
                continue  # a label the learner leaves out (untrusted) is no reason to retrain early
            if lb.recency > self._neural_recency and not math.isnan(z) and (z >= thr) != (lb.label == "spam"):
                self._surprise_ids.add(lb.message_id)

    def _self_check(self, cand: Candidate) -> list[SelfCheckVector]:
        from models.registry import SelfCheckVector

        sample = [(mid, raw) for mid, raw, _, _ in (self.corpus.base or self.corpus.reference)[:SELF_CHECK_MESSAGES]]
        if not sample:
            sample = [("self-check", b"Subject: self-check\r\n\r\nhello\r\n")]
        batch, results = self.featurize([raw for _, raw in sample])
        expected = np.asarray(cand.model.predict_proba(batch), dtype=np.float64).reshape(-1)
        return [SelfCheckVector(raw=raw, rule_result=rr, expected=float(p))
                for (_, raw), rr, p in zip(sample, results, expected, strict=True)]

    def _save(self, cand: Candidate, onnx_path: Path, parent: str | None, composition: dict[str, Any],
              result: GateResult) -> str:
        version = self.registry.save(
            kind=cand.kind, model_path=onnx_path, features=self.features, self_check=self._self_check(cand),
            metrics={"gate": jsonable(result.figures), "evaluation_set": composition},
            lineage={**cand.lineage, "training_s": round(cand.training_s, 3)},
            hyperparameters=cand.hyperparameters, parent=parent, calibration=cand.calibration.to_dict(),
        )
        if cand.linear_state is not None:
            cand.linear_state.save(self.registry.root / "versions" / version / "linear_state.npz")
        save_oof(self.oof_dir, version, cand.oof, cand.trained, cand.data_version)
        onnx_path.unlink(missing_ok=True)
        return version

    def _record(self, cand: Candidate, version: str, champ: Judge | None, result: GateResult,
                composition: dict[str, Any], y: np.ndarray, chall_set: np.ndarray, champ_set: np.ndarray,
                judged: str | None = None) -> None:
        from models.registry import ChampionChanged
        from streams.events import ModelEvent

        if result.promote:  # compare-and-swap: an operator's rollback or promotion while the gate decided is kept
            try:
                self.registry.promote(version, result.reason, expected=judged)
            except ChampionChanged as exc:
                log.warning("gate decision overtaken", version=version, judged=judged, champion=exc.current)
                result = GateResult(False, f"champion changed during the gate (now {exc.current or 'none'}, judged "
                                    f"{judged or 'none'}); the gate had found: {result.reason}", result.test,
                                    result.figures)
        decision = "promoted" if result.promote else "rejected"

        def side(z: np.ndarray) -> dict[str, Any]:
            if not (y.any() and (~y).any()):
                return {"one_minus_auc": None, "n_spam": int(y.sum()), "n_ham": int((~y).sum())}
            return {"one_minus_auc": 1.0 - roc_auc(z, y), "recall_at_fpr_1pct": recall_at_fpr(z, y, 0.01),
                    "n_spam": int(y.sum()), "n_ham": int((~y).sum())}

        chall_m, champ_m = side(chall_set), side(champ_set) if champ is not None else None
        self.registry.record_decision(
            challenger=version, decision=decision, reason=result.reason, challenger_metrics=chall_m,
            champion=champ.version if champ else None, champion_metrics=champ_m,
            extra={"kind": cand.kind, "test": result.test, "evaluation_set": composition,
                   "statistics": jsonable(result.figures), "data_version": cand.data_version,
                   "anchor": self.anchor_version},
        )
        if result.promote:
            anchor_auc = result.figures.get("anchor_auc", {}).get("auc_champion")
            mine = result.figures.get("auc", {}).get("auc_challenger")
            if self.anchor_version is None or champ is None or anchor_auc is None or (
                    mine is not None and mine >= anchor_auc):
                self.anchor_version = version
            self.metrics.promotions.labels(kind=cand.kind).inc()
            self.show_champion()
        self.metrics.decisions.labels(decision=decision, kind=cand.kind).inc()
        if chall_m["one_minus_auc"] is not None:
            self.metrics.one_minus_auc.labels(role="challenger", kind=cand.kind).set(chall_m["one_minus_auc"])
        if champ_m is not None and champ_m["one_minus_auc"] is not None:
            self.metrics.one_minus_auc.labels(role="champion", kind=champ.kind if champ else cand.kind).set(
                champ_m["one_minus_auc"])
        self.metrics.gate_eval.clear()
        for src, groups in composition.items():
            for g, n in groups.items():
                self.metrics.gate_eval.labels(source=src, label=g).set(n)
        self.emit(ModelEvent(kind=decision, version=version, previous=champ.version if champ else None,
                             model_kind=cand.kind, reason=result.reason,
                             metrics={"challenger": jsonable(chall_m), "champion": jsonable(champ_m or {}),
                                      "test": result.test, "evaluation_set": composition}))
        log.info("gate decision", kind=cand.kind, version=version, decision=decision, reason=result.reason,
                 evaluation_set=composition)
        pruned = self.registry.prune(keep=self.settings.registry_keep)
        for v in pruned:
            oof_path(self.oof_dir, v).unlink(missing_ok=True)
        if result.promote:
            self.update_quality("promotion")

    # -- the fixed quality set (metrics) -------------------------------------------------------------------------------
    def show_champion(self) -> None:
        """Set the champion's series from the registry (at start, and whoever promoted it: the gate, an
        operator's promotion or rollback through the API)."""
        version = self.registry.champion()
        if version is None:
            return
        try:
            info = self.registry.get(version)
        except Exception:  # noqa: BLE001 - a champion pointer to a missing version: nothing to show
            return
        promoted = [h for h in self.registry.history() if h.get("version") == version]
        at = time.time()
        if promoted:
            from datetime import datetime

            at = datetime.fromisoformat(promoted[-1]["at"].replace("Z", "+00:00")).timestamp()
        self.metrics.set_champion(version, info.kind, at)
        counts = info.lineage.get("counts", {})
        for src in ("flags", "corpus"):
            part = counts.get(src, {})
            self.metrics.examples.labels(source=src).set(sum(part.values()) if isinstance(part, dict) else 0)

    def update_quality(self, cause: str = "start") -> dict[str, dict[str, float]]:
        """Re-score the fixed quality set with the champion and the rules, set the gauges, and record a point of
        the improvement curves: the model's after a promotion (x: flags behind the champion), the rules' after a
        rule change (x: active rules). Champions and rule sets only: rejected challengers draw no curve."""
        ref = self.corpus.reference
        if not ref:
            return {}
        y = np.array([s for _, _, s, _ in ref], dtype=bool)
        if not (y.any() and (~y).any()):
            return {}
        batch, rules = self.rows([(mid, raw) for mid, raw, _, _ in ref])
        sides = {"rules": rules}
        champ_v = self.registry.champion()
        judge = self._judge(champ_v) if champ_v else None
        if judge is not None:
            z = judge.logit(batch)
            sides["model"] = z
            sides["served"] = judge.calibration.combined_logit(z, rules)
        figures: dict[str, dict[str, float]] = {}
        for name, sc in sides.items():
            f = {"one_minus_auc": 1.0 - roc_auc(sc, y), "recall_at_fpr_0_1pct": recall_at_fpr(sc, y, 0.001),
                 "recall_at_fpr_1pct": recall_at_fpr(sc, y, 0.01)}
            figures[name] = f
            self.metrics.quality_one_minus_auc.labels(side=name).set(f["one_minus_auc"])
            self.metrics.quality_recall.labels(side=name, fpr="0.001").set(f["recall_at_fpr_0_1pct"])
            self.metrics.quality_recall.labels(side=name, fpr="0.01").set(f["recall_at_fpr_1pct"])
        self.metrics.quality_messages.labels(label="spam").set(int(y.sum()))
        self.metrics.quality_messages.labels(label="ham").set(int((~y).sum()))
        quality_set = {"spam": int(y.sum()), "ham": int((~y).sum())}
        if cause == "start":  # a restart adds a point only where the curves do not already end on this state
            last = {p["side"]: p for p in self.registry.curve_points()}
            if last.get("rules", {}).get("x") == self.rules.active_count:
                cause = "start-model"
            if judge is not None and last.get("model", {}).get("version") == judge.version:
                cause = "none" if cause == "start-model" else "rules"
        if cause in ("start", "rules"):
            self.registry.record_curve_point({"side": "rules", "x": self.rules.active_count, "cause": cause,
                                              **figures["rules"], "quality_set": quality_set})
        if cause in ("start", "start-model", "promotion") and judge is not None:
            counts = self.registry.get(judge.version).lineage.get("counts", {})
            flags = counts.get("flags", {}) if isinstance(counts.get("flags"), dict) else {}
            self.registry.record_curve_point({
                "side": "model", "x": int(sum(flags.values())), "cause": cause, "version": judge.version,
                "kind": judge.kind, **figures["model"], "served": figures.get("served"), "quality_set": quality_set})
        return figures

