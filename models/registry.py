"""Model registry: immutable version directories, an atomically swapped champion pointer, and an audit trail.

Layout under ``root``::

    versions/<version>/model.onnx      the served graph
    versions/<version>/features.json   the FeatureConfig it was trained with (no train/serve skew)
    versions/<version>/meta.json       kind, metrics, lineage, hyperparameters, calibration, self-check vectors
    champion                           one line: the serving version (replaced with os.replace)
    history.jsonl                      every promotion / rollback, replayed to find what to roll back to
    decisions.jsonl                    every gate decision with both models' metrics
    curves.jsonl                       the improvement curves: each champion's and each rule set's quality
    worker.json                        the worker's latest summary (reporters, feedback flow), for the operators
    .lock                              fcntl lock taken by writers (one worker writes, API replicas read)

A version directory is written under ``tmp/`` and renamed into ``versions/`` in one step, so a reader never
sees half a version. Readers take no lock: each file they read is either absent or complete. ``load`` refuses
an artifact that is missing, corrupt (hash mismatch, unreadable graph) or that fails the load-time self-check
(known messages re-scored must match the probabilities stored at save time within ``SELF_CHECK_TOL``), so a
bad version can never replace a good champion in a running process. This module never imports torch.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

if TYPE_CHECKING:
    from models.features import FeatureConfig
    from models.rules import RuleResult
    from models.runtime import OnnxModel

log = structlog.get_logger(__name__)

SELF_CHECK_TOL = 1e-4
MODEL_FILE = "model.onnx"
FEATURES_FILE = "features.json"
META_FILE = "meta.json"
KINDS = ("linear", "neural")
_REPO_ROOT = Path(__file__).resolve().parent.parent


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to...)."""


class ChampionChanged(RegistryError):
    """A compare-and-swap promotion found another champion than the one its caller judged."""

    def __init__(self, version: str, expected: str | None, current: str | None) -> None:
        super().__init__(f"not promoting {version}: the champion is {current or 'none'}, not {expected or 'none'} "
                         "as judged (promoted or rolled back meanwhile)")
        self.version, self.expected, self.current = version, expected, current


_ANY = object()
"""``promote``'s default ``expected``: promote whatever the champion is (an operator's explicit command)."""


class ModelRejected(RegistryError):
    """A version's artifact is missing, corrupt or fails its self-check; the current champion keeps serving."""

    def __init__(self, version: str, reason: str) -> None:
        super().__init__(f"model {version} rejected: {reason}")
        self.version = version
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """What ``GET /models`` shows about one version (everything but the graph itself)."""

    version: str
    kind: str
    created_at: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    parent: str | None
    hyperparameters: dict[str, Any]
    code_version: str
    calibration: dict[str, Any] | None
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "created_at": self.created_at,
            "metrics": self.metrics,
            "lineage": self.lineage,
            "parent": self.parent,
            "hyperparameters": self.hyperparameters,
            "code_version": self.code_version,
            "calibration": self.calibration,
        }


@dataclass(slots=True)
class LoadedModel:
    """A self-checked version ready to serve: the ONNX session, its feature config and its metadata."""

    version: str
    kind: str
    model: OnnxModel
    features: FeatureConfig
    meta: dict[str, Any]
    path: Path

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def calibration(self) -> dict[str, Any] | None:
        """Combination parameters fitted with this model (see models.classifier), or None."""
        cal = self.meta.get("calibration")
        return cal if isinstance(cal, dict) else None


@dataclass(frozen=True, slots=True)
class SelfCheckVector:
    """A known message, the rule result it was scored with, and the probability the model must give it.

    The rule result is stored rather than recomputed because the live rule set may change at run time; the
    self-check verifies the artifact (graph + feature config + runtime), not today's rules.
    """

    raw: bytes
    rule_result: RuleResult
    expected: float

    def to_dict(self) -> dict[str, Any]:
        rr = self.rule_result
        return {
            "raw_b64": base64.b64encode(self.raw).decode("ascii"),
            "rules": {
                "score": float(rr.score),
                "threshold": float(rr.threshold),
                "is_spam": bool(rr.is_spam),
                "hits": [[h.name, float(h.weight), h.description] for h in rr.hits],
            },
            "expected": float(self.expected),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SelfCheckVector:
        from models.rules import RuleHit, RuleResult

        r = d["rules"]
        hits = [RuleHit(name=str(n), weight=float(w), description=str(desc)) for n, w, desc in r["hits"]]
        rr = RuleResult(score=float(r["score"]), threshold=float(r["threshold"]), is_spam=bool(r["is_spam"]), hits=hits)
        return cls(raw=base64.b64decode(d["raw_b64"]), rule_result=rr, expected=float(d["expected"]))


def new_version_id(kind: str, now: datetime | None = None) -> str:
    """Sortable (UTC timestamp to the microsecond first) and unique (24 random bits after it):
    ``20261123T120501123456Z-linear-3f2a9c``."""
    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%S%f')}Z-{kind}-{secrets.token_hex(3)}"


def code_version() -> str:
    """``git describe`` of the checkout when there is one (with -dirty), else the installed package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],  # noqa: S607 - git from PATH, fixed argv
            cwd=_REPO_ROOT, capture_output=True, text=True, timeout=5, check=True,
        )
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return importlib.metadata.version("flywheel")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def training_set_hash(raws: Sequence[bytes], labels: Sequence[bool]) -> str:
    """Order-independent sha256 of (message, label) pairs: the same data gives the same hash however it was listed."""
    digests = sorted(hashlib.sha256(r).hexdigest() + ("1" if y else "0") for r, y in zip(raws, labels, strict=True))
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode("ascii"))
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, sort_keys=True, indent=1, allow_nan=False)


def _write_durable(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def score_raws(
    model: OnnxModel, config: FeatureConfig, raws: Sequence[bytes], rule_results: Sequence[RuleResult],
    max_bytes: int = 262144,
) -> np.ndarray:
    """Serving-path probabilities for raw messages with given rule results (parse -> featurize -> ONNX)."""
    from models.features import featurize
    from models.message import parse

    msgs = [parse(r, max_bytes=max_bytes) for r in raws]
    batch = featurize(msgs, list(rule_results), config)
    return np.asarray(model.predict_proba(batch), dtype=np.float64).reshape(-1)


class Registry:
    """Versions, champion pointer, promotion history and gate decisions in one directory shared by processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self._champion_file = self.root / "champion"
        self._history_file = self.root / "history.jsonl"
        self._decisions_file = self.root / "decisions.jsonl"
        self._curves_file = self.root / "curves.jsonl"
        self._status_file = self.root / "worker.json"
        self._lock_file = self.root / ".lock"
        self._tmp_dir = self.root / "tmp"

    # ------------------------------------------------------------------ locking / setup
    def _ensure(self) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """Exclusive writer lock across processes (readers never take it)."""
        self._ensure()
        with self._lock_file.open("a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _append_jsonl(self, path: Path, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, default=_json_default, sort_keys=True, allow_nan=False) + "\n"
        with path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _read_jsonl(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        out: list[dict[str, Any]] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line after a crash: ignore it, keep the rest
                log.warning("registry_bad_jsonl_line", path=str(path))
        return out

    # ------------------------------------------------------------------ writing versions
    def save(
        self,
        *,
        kind: str,
        model_path: Path,
        features: FeatureConfig,
        self_check: Sequence[SelfCheckVector],
        metrics: Mapping[str, Any] | None = None,
        lineage: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        parent: str | None = None,
        calibration: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        verify: bool = True,
    ) -> str:
        """Store a new immutable version and return its id.

        ``model_path`` is copied; ``self_check`` holds known messages with the probabilities the training
        framework gave them. With ``verify`` the ONNX graph must reproduce them before anything is written,
        so a broken export never reaches the registry.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not self_check:
            raise ValueError("at least one self-check vector is required")
        model_path = Path(model_path)
        if verify:
            from models.runtime import OnnxModel

            got = score_raws(OnnxModel(model_path), features, [v.raw for v in self_check], [v.rule_result for v in self_check])
            want = np.array([v.expected for v in self_check])
            diff = float(np.max(np.abs(got - want)))
            if not diff <= SELF_CHECK_TOL:
                raise ModelRejected("(unsaved)", f"ONNX disagrees with the expected self-check probabilities by {diff:.2e}")
        version = new_version_id(kind)
        meta: dict[str, Any] = {
            "version": version,
            "kind": kind,
            "created_at": _now_iso(),
            "metrics": dict(metrics or {}),
            "lineage": dict(lineage or {}),
            "parent": parent,
            "hyperparameters": dict(hyperparameters or {}),
            "code_version": code_version(),
            "calibration": dict(calibration) if calibration is not None else None,
            "model_sha256": _sha256_file(model_path),
            "features_sha256": None,
            "self_check": [v.to_dict() for v in self_check],
            **dict(extra or {}),
        }
        features_text = _dump_json(features.to_dict())
        meta["features_sha256"] = hashlib.sha256(features_text.encode("utf-8")).hexdigest()
        self._ensure()
        staging = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=self._tmp_dir))
        try:
            shutil.copyfile(model_path, staging / MODEL_FILE)
            with (staging / MODEL_FILE).open("rb") as f:
                os.fsync(f.fileno())
            _write_durable(staging / FEATURES_FILE, features_text)
            _write_durable(staging / META_FILE, _dump_json(meta))
            _fsync_dir(staging)
            with self._writer():
                os.rename(staging, self.versions_dir / version)
                _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("model_saved", version=version, kind=kind, parent=parent)
        return version

    def version_files(self, version: str) -> dict[str, bytes]:
        """The files of ``version`` as stored (to publish it where replicas share no directory)."""
        self._meta(version)  # a known version, and a safe name
        root = self.versions_dir / version
        return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}

    def install(self, version: str, files: Mapping[str, bytes]) -> bool:
        """Add a version received whole from elsewhere (the models topic); False when it is here already.

        Nothing is checked here beyond the names: :meth:`load` checks the hashes and the self-check before
        anything serves it, as for a version trained here."""
        if "/" in version or version.startswith(".") or not version:
            raise RegistryError(f"bad version id {version!r}")
        if any("/" in name or name.startswith(".") or not name for name in files) or META_FILE not in files:
            raise RegistryError(f"version {version}: bad file names {sorted(files)[:8]}")
        if (self.versions_dir / version).is_dir():
            return False
        self._ensure()
        staging = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=self._tmp_dir))
        try:
            for name, data in files.items():
                with (staging / name).open("wb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
            _fsync_dir(staging)
            with self._writer():
                if (self.versions_dir / version).is_dir():
                    shutil.rmtree(staging, ignore_errors=True)
                    return False
                os.rename(staging, self.versions_dir / version)
                _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("model_installed", version=version)
        return True

    # ------------------------------------------------------------------ reading versions
    def _meta(self, version: str) -> dict[str, Any]:
        path = self.versions_dir / version / META_FILE
        if "/" in version or version.startswith("."):
            raise RegistryError(f"bad version id {version!r}")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise RegistryError(f"unknown version {version}") from e
        if not isinstance(meta, dict):
            raise RegistryError(f"meta.json of {version} is not an object")
        return meta

    def _info(self, version: str, meta: Mapping[str, Any]) -> VersionInfo:
        return VersionInfo(
            version=version,
            kind=str(meta.get("kind", "")),
            created_at=str(meta.get("created_at", "")),
            metrics=dict(meta.get("metrics") or {}),
            lineage=dict(meta.get("lineage") or {}),
            parent=meta.get("parent"),
            hyperparameters=dict(meta.get("hyperparameters") or {}),
            code_version=str(meta.get("code_version", "")),
            calibration=meta.get("calibration"),
            path=self.versions_dir / version,
        )

    def get(self, version: str) -> VersionInfo:
        return self._info(version, self._meta(version))

    def list(self) -> list[VersionInfo]:
        """All readable versions, oldest first (version ids sort by creation time)."""
        if not self.versions_dir.exists():
            return []
        out: list[VersionInfo] = []
        for d in sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir()):
            try:
                out.append(self.get(d))
            except (RegistryError, json.JSONDecodeError, OSError) as e:
                log.warning("registry_unreadable_version", version=d, error=str(e))
        return out

    def meta(self, version: str) -> dict[str, Any]:
        """The full meta.json of a version (including self-check vectors)."""
        return self._meta(version)

    def load(self, version: str, *, max_bytes: int = 262144) -> LoadedModel:
        """Open a version for serving after verifying hashes and the self-check; raise ModelRejected otherwise."""
        from models.features import FeatureConfig
        from models.runtime import OnnxModel

        vdir = self.versions_dir / version
        if "/" in version or not vdir.is_dir():
            raise ModelRejected(version, "no such version directory")
        try:
            meta = json.loads((vdir / META_FILE).read_text(encoding="utf-8"))
            features_text = (vdir / FEATURES_FILE).read_text(encoding="utf-8")
            features = FeatureConfig.from_dict(json.loads(features_text))
        except FileNotFoundError as e:
            raise ModelRejected(version, f"missing {Path(e.filename).name}") from e
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            raise ModelRejected(version, f"unreadable meta/features: {e}") from e
        model_file = vdir / MODEL_FILE
        if not model_file.is_file():
            raise ModelRejected(version, f"missing {MODEL_FILE}")
        want_sha = meta.get("model_sha256")
        if want_sha and _sha256_file(model_file) != want_sha:
            raise ModelRejected(version, f"{MODEL_FILE} does not match its recorded sha256 (truncated or altered)")
        want_fsha = meta.get("features_sha256")
        if want_fsha and hashlib.sha256(features_text.encode("utf-8")).hexdigest() != want_fsha:
            raise ModelRejected(version, f"{FEATURES_FILE} does not match its recorded sha256")
        try:
            model = OnnxModel(model_file)
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise ModelRejected(version, f"onnxruntime cannot open the graph: {e}") from e
        try:
            vectors = [SelfCheckVector.from_dict(d) for d in meta.get("self_check") or []]
        except (KeyError, ValueError, TypeError) as e:
            raise ModelRejected(version, f"unreadable self-check vectors: {e}") from e
        if not vectors:
            raise ModelRejected(version, "no self-check vectors")
        try:
            got = score_raws(model, features, [v.raw for v in vectors], [v.rule_result for v in vectors], max_bytes)
        except Exception as e:
            raise ModelRejected(version, f"self-check scoring failed: {e}") from e
        want = np.array([v.expected for v in vectors])
        if got.shape != want.shape or not np.all(np.isfinite(got)):
            raise ModelRejected(version, "self-check produced malformed probabilities")
        diff = float(np.max(np.abs(got - want)))
        if not diff <= SELF_CHECK_TOL:
            raise ModelRejected(version, f"self-check failed: max |p - expected| = {diff:.2e} > {SELF_CHECK_TOL:g}")
        log.info("model_loaded", version=version, kind=meta.get("kind"), provider=model.provider, self_check_diff=diff)
        return LoadedModel(version=version, kind=str(meta.get("kind")), model=model, features=features, meta=meta, path=vdir)

    # ------------------------------------------------------------------ champion pointer
    def champion(self) -> str | None:
        """The serving version, or None before the first promotion. Lock-free: the pointer is replaced atomically."""
        try:
            text = self._champion_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return text or None

    def _write_champion(self, version: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".champion.", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(version + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._champion_file)
            _fsync_dir(self.root)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _stack(self) -> builtins.list[str]:
        """Champion stack replayed from history: promote pushes, rollback pops."""
        stack: list[str] = []
        for rec in self._read_jsonl(self._history_file):
            if rec.get("action") == "promote":
                stack.append(rec["version"])
            elif rec.get("action") == "rollback" and stack:
                stack.pop()
        return stack

    def promote(self, version: str, reason: str, *, expected: str | object | None = _ANY) -> None:
        """Make ``version`` the champion (it must exist and have a model file).

        ``expected`` makes it a compare-and-swap: the champion must still be that version (None: no champion),
        checked under the writer lock, or :class:`ChampionChanged` is raised and nothing changes. The gate
        passes the champion it judged, so an administrator's rollback (or promotion) made while the gate
        decided is kept instead of silently undone."""
        with self._writer():
            if not (self.versions_dir / version / MODEL_FILE).is_file():
                raise RegistryError(f"cannot promote {version}: no such version")
            previous = self.champion()
            if expected is not _ANY and previous != expected:
                raise ChampionChanged(version, expected if isinstance(expected, str) else None, previous)
            self._append_jsonl(self._history_file, {
                "at": _now_iso(), "action": "promote", "version": version, "previous": previous, "reason": reason,
            })
            self._write_champion(version)
        log.info("model_promoted", version=version, previous=previous, reason=reason)

    def rollback(self, reason: str) -> str:
        """Return to the champion before the current one and return its id."""
        with self._writer():
            stack = self._stack()
            current = self.champion()
            if len(stack) < 2:
                raise RegistryError("no previous champion to roll back to")
            target = stack[-2]
            if not (self.versions_dir / target / MODEL_FILE).is_file():
                raise RegistryError(f"previous champion {target} is no longer in the registry")
            self._append_jsonl(self._history_file, {
                "at": _now_iso(), "action": "rollback", "version": target, "previous": current, "reason": reason,
            })
            self._write_champion(target)
        log.warning("model_rolled_back", version=target, previous=current, reason=reason)
        return target

    def history(self) -> builtins.list[dict[str, Any]]:
        return self._read_jsonl(self._history_file)

    # ------------------------------------------------------------------ gate decisions
    def record_decision(
        self,
        *,
        challenger: str,
        decision: str,
        reason: str,
        challenger_metrics: Mapping[str, Any],
        champion: str | None,
        champion_metrics: Mapping[str, Any] | None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one gate decision ("promoted" | "rejected") with both sides' metrics; returns the record."""
        if decision not in ("promoted", "rejected"):
            raise ValueError("decision must be 'promoted' or 'rejected'")
        rec = {
            "at": _now_iso(), "challenger": challenger, "decision": decision, "reason": reason,
            "challenger_metrics": jsonable(dict(challenger_metrics)), "champion": champion,
            "champion_metrics": jsonable(dict(champion_metrics or {})), **dict(extra or {}),
        }
        with self._writer():
            self._append_jsonl(self._decisions_file, rec)
        return rec

    def decisions(self, limit: int | None = None) -> builtins.list[dict[str, Any]]:
        """Gate decisions, oldest first (the last ``limit`` when given)."""
        recs = self._read_jsonl(self._decisions_file)
        return recs[-limit:] if limit else recs

    # ------------------------------------------------------------------ what operators read
    def record_curve_point(self, point: Mapping[str, Any]) -> None:
        """Append one point of the improvement curves (``side``: "model" or "rules", ``x``, recalls, ...)."""
        with self._writer():
            self._append_jsonl(self._curves_file, {"at": _now_iso(), **jsonable(dict(point))})

    def curve_points(self) -> builtins.list[dict[str, Any]]:
        return self._read_jsonl(self._curves_file)

    def write_worker_status(self, status: Mapping[str, Any]) -> None:
        """Replace the worker's summary atomically (readers see the old or the new one, never half)."""
        self._ensure()
        fd, tmp = tempfile.mkstemp(prefix=".worker.", dir=self.root)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_dump_json({"at": _now_iso(), **jsonable(dict(status))}))
        os.replace(tmp, self._status_file)

    def worker_status(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self._status_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def load_champion(self, *, max_bytes: int = 262144) -> LoadedModel | None:
        """Load the current champion (None when there is none); raises ModelRejected like ``load``."""
        v = self.champion()
        return self.load(v, max_bytes=max_bytes) if v else None

    def prune(self, keep: int = 20) -> builtins.list[str]:
        """Bound the registry's disk use; returns the versions removed.

        The incremental model may be promoted every few seconds while flags flow, so without this the registry
        grows without end. Kept: the champion, the last ``keep`` champions (the rollback targets) and the newest
        ``keep`` other versions (recent challengers, for inspection). A rollback deeper than ``keep`` then says
        the target is gone instead of finding it.
        """
        with self._writer():
            recent_champions = self._stack()[-keep:]
            keep_set = set(recent_champions) | {self.champion()}
            others = [v for v in sorted(os.listdir(self.versions_dir)) if v not in keep_set]
            doomed = others[:-keep] if keep else others
            trashed = []
            for version in doomed:
                trash = self._tmp_dir / f"{version}.deleted-{secrets.token_hex(3)}"
                os.rename(self.versions_dir / version, trash)
                trashed.append(trash)
        for trash in trashed:
            shutil.rmtree(trash, ignore_errors=True)
        if doomed:
            log.info("registry_pruned", removed=len(doomed), kept=len(keep_set) + min(len(others), keep))
        return doomed

    def delete(self, version: str, *, keep_rollback_targets: bool = True) -> None:
        """Remove a version no rollback can reach (not the champion nor below it in the stack): housekeeping.

        ``keep_rollback_targets=False`` (a replica's copy of a version its source withdrew: the replica never rolls
        back by itself) refuses the champion only."""
        with self._writer():
            if version == self.champion() or (keep_rollback_targets and version in self._stack()):
                raise RegistryError(f"{version} is the champion or a rollback target; keep it")
            target = self.versions_dir / version
            if not target.is_dir():
                raise RegistryError(f"unknown version {version}")
            trash = self._tmp_dir / f"{version}.deleted-{secrets.token_hex(3)}"
            os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)


def jsonable(o: Any) -> Any:
    """``o`` as plain JSON values: numpy scalars and arrays as Python ones, tuples as lists, keys as strings, and
    NaN or infinity as null (JSON has neither: a metric undefined on one class only is stored as null)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return [jsonable(v) for v in o.tolist()]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


__all__ = [
    "KINDS",
    "SELF_CHECK_TOL",
    "ChampionChanged",
    "LoadedModel",
    "ModelRejected",
    "Registry",
    "RegistryError",
    "SelfCheckVector",
    "VersionInfo",
    "code_version",
    "jsonable",
    "new_version_id",
    "score_raws",
    "training_set_hash",
]

