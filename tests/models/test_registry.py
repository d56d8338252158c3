"""Registry: atomic versions, champion pointer and rollback, refusal of bad artifacts, several processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.features import FeatureConfig, featurize
from models.message import parse
from models.registry import (
    ChampionChanged,
    ModelRejected,
    Registry,
    RegistryError,
    SelfCheckVector,
    new_version_id,
    training_set_hash,
)
from models.rules import RuleHit, RuleResult

N_BUCKETS = 1 << 12
CONFIG = FeatureConfig(n_buckets=N_BUCKETS)

RAWS = [
    b"From: alice@example.org\r\nSubject: lunch tomorrow?\r\n\r\nShall we meet at noon near the office?\r\n",
    b"From: promo@cheap-pills.biz\r\nSubject: BUY NOW!!! 90% OFF\r\nContent-Type: text/html\r\n\r\n"
    b"<html><body><a href='http://cheap-pills.biz/x'>CLICK HERE</a> free money</body></html>\r\n",
    b"From: bob@lists.example.net\r\nSubject: [dev] patch for the parser\r\n\r\nAttached is the fix, see diff.\r\n",
]
RULES = [
    RuleResult(score=0.0, threshold=5.0, is_spam=False, hits=[]),
    RuleResult(score=6.5, threshold=5.0, is_spam=True, hits=[RuleHit("CLICK_HERE", 3.0, "click here"),
                                                              RuleHit("HTML_ONLY", 3.5, "html only")]),
    RuleResult(score=-1.0, threshold=5.0, is_spam=False, hits=[RuleHit("LIST_ID", -1.0, "mailing list")]),
]


def linear_onnx(path: Path, weights: np.ndarray, bias: float) -> Path:
    """A hashed logistic regression as an ONNX graph with the project's inputs (ids, vals, seg, rows)."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [len(weights)], weights.astype(np.float32).tolist())
    b = helper.make_tensor("B", TensorProto.FLOAT, [1], [float(bias)])
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["w_ids"]),
        helper.make_node("Mul", ["w_ids", "vals"], ["contrib"]),
        helper.make_node("ConstantOfShape", ["rows"], ["zeros"],
                         value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ScatterElements", ["zeros", "seg", "contrib"], ["summed"], axis=0, reduction="add"),
        helper.make_node("Add", ["summed", "B"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("vals", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("seg", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["R"])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def numpy_proba(weights: np.ndarray, bias: float) -> np.ndarray:
    """The same model computed independently of onnxruntime, for the expected self-check values."""
    batch = featurize([parse(r) for r in RAWS], RULES, CONFIG)
    z = np.bincount(batch.seg, weights=weights[batch.ids] * batch.vals, minlength=batch.rows) + bias
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture()
def weights() -> np.ndarray:
    return np.random.default_rng(7).normal(0, 2.0, N_BUCKETS).astype(np.float32)


@pytest.fixture()
def vectors(weights: np.ndarray) -> list[SelfCheckVector]:
    expected = numpy_proba(weights, 0.25)
    return [SelfCheckVector(r, rr, float(e)) for r, rr, e in zip(RAWS, RULES, expected, strict=True)]


def save_one(reg: Registry, tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector], **kw: object) -> str:
    model = linear_onnx(tmp_path / f"m{time.monotonic_ns()}.onnx", weights, 0.25)
    return reg.save(kind="linear", model_path=model, features=CONFIG, self_check=vectors,
                    metrics={"auc": 0.99}, lineage={"source": "seed"}, hyperparameters={"alpha": 1e-5}, **kw)


@pytest.mark.unit
def test_version_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_version_id("linear") for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids, key=lambda v: v.split("-")[0])
    assert ids[0].split("-")[1] == "linear"


@pytest.mark.unit
def test_training_set_hash_ignores_order_but_not_labels() -> None:
    a = training_set_hash([b"x", b"y"], [True, False])
    assert a == training_set_hash([b"y", b"x"], [False, True])
    assert a != training_set_hash([b"x", b"y"], [False, False])


@pytest.mark.unit
def test_save_writes_complete_version_and_loads(tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector]) -> None:
    reg = Registry(tmp_path / "reg")
    v = save_one(reg, tmp_path, weights, vectors, parent=None, calibration={"threshold": 0.7})
    vdir = reg.root / "versions" / v
    assert sorted(p.name for p in vdir.iterdir()) == ["features.json", "meta.json", "model.onnx"]
    assert list((reg.root / "tmp").iterdir()) == []  # staging cleaned up by the rename
    info = reg.get(v)
    assert info.kind == "linear" and info.metrics == {"auc": 0.99} and info.lineage == {"source": "seed"}
    assert info.code_version and info.calibration == {"threshold": 0.7}
    assert [i.version for i in reg.list()] == [v]
    loaded = reg.load(v)
    assert loaded.version == v and loaded.kind == "linear" and loaded.calibration == {"threshold": 0.7}
    batch = featurize([parse(r) for r in RAWS], RULES, loaded.features)
    np.testing.assert_allclose(loaded.model.predict_proba(batch), [x.expected for x in vectors], atol=1e-5)
    assert loaded.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")


@pytest.mark.unit
def test_save_refuses_an_export_that_disagrees_with_its_framework(
    tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector]
) -> None:
    reg = Registry(tmp_path / "reg")
    bad = [SelfCheckVector(v.raw, v.rule_result, v.expected + 0.01) for v in vectors]
    with pytest.raises(ModelRejected, match="disagrees"):
        save_one(reg, tmp_path, weights, bad)
    assert reg.list() == []


@pytest.mark.unit
def test_failed_save_leaves_nothing_behind(
    tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path / "reg")
    import models.registry as registry_mod

    def boom(path: Path, text: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(registry_mod, "_write_durable", boom)
    with pytest.raises(OSError, match="disk full"):
        save_one(reg, tmp_path, weights, vectors)
    assert reg.list() == [] and list((reg.root / "tmp").iterdir()) == []


@pytest.mark.unit
def test_promote_rollback_and_history(tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector]) -> None:
    reg = Registry(tmp_path / "reg")
    assert reg.champion() is None
    a, b, c = (save_one(reg, tmp_path, weights, vectors) for _ in range(3))
    reg.promote(a, "seed")
    reg.promote(b, "gate: better auc")
    reg.promote(c, "gate: better auc")
    assert reg.champion() == c
    assert reg.rollback("bad in production") == b and reg.champion() == b
    assert reg.rollback("still bad") == a and reg.champion() == a
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback("nothing left")
    assert reg.champion() == a
    actions = [(h["action"], h["version"]) for h in reg.history()]
    assert actions == [("promote", a), ("promote", b), ("promote", c), ("rollback", b), ("rollback", a)]
    with pytest.raises(RegistryError):
        reg.promote("20990101T000000000000Z-linear-ffff", "unknown")
    with pytest.raises(RegistryError, match="champion"):
        reg.delete(a)  # serving: kept
    reg.delete(b)  # rolled away from: no rollback can reach it any more
    assert [i.version for i in reg.list()] == [a, c]


@pytest.mark.unit
def test_promote_with_expected_is_a_compare_and_swap(tmp_path: Path, weights: np.ndarray,
                                                      vectors: list[SelfCheckVector]) -> None:
    """The gate promotes against the champion it judged: a rollback made meanwhile is kept."""
    reg = Registry(tmp_path / "reg")
    a, b, c = (save_one(reg, tmp_path, weights, vectors) for _ in range(3))
    with pytest.raises(ChampionChanged):
        reg.promote(a, "gate", expected="someone-else")  # no champion yet, not the one expected
    reg.promote(a, "seed", expected=None)
    reg.promote(b, "gate", expected=a)
    judged = reg.champion()
    assert reg.rollback("an administrator, while the gate judges c against b") == a
    with pytest.raises(ChampionChanged, match="rolled back meanwhile") as err:
        reg.promote(c, "gate: better auc", expected=judged)
    assert err.value.current == a and err.value.expected == b
    assert reg.champion() == a
    assert [h["action"] for h in reg.history()] == ["promote", "promote", "rollback"]
    reg.promote(c, "an operator's explicit promotion")  # no expectation: whatever the champion is
    assert reg.champion() == c


@pytest.mark.unit
def test_decisions_keep_both_sides(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.record_decision(challenger="v2", decision="rejected", reason="fpr up", challenger_metrics={"auc": 0.97,
                        "fpr": float("nan")}, champion="v1", champion_metrics={"auc": 0.98})
    reg.record_decision(challenger="v3", decision="promoted", reason="auc up", challenger_metrics={"auc": 0.99},
                        champion="v1", champion_metrics={"auc": 0.98})
    d = reg.decisions()
    assert [x["decision"] for x in d] == ["rejected", "promoted"]
    assert d[0]["challenger_metrics"] == {"auc": 0.97, "fpr": None} and d[0]["champion_metrics"] == {"auc": 0.98}
    assert reg.decisions(limit=1)[0]["challenger"] == "v3"
    with pytest.raises(ValueError):
        reg.record_decision(challenger="v4", decision="maybe", reason="", challenger_metrics={}, champion=None,
                            champion_metrics=None)


@pytest.mark.unit
def test_truncated_model_is_refused(tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector]) -> None:
    reg = Registry(tmp_path / "reg")
    v = save_one(reg, tmp_path, weights, vectors)
    f = reg.root / "versions" / v / "model.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelRejected, match="sha256") as e:
        reg.load(v)
    assert e.value.version == v


@pytest.mark.unit
def test_swapped_graph_fails_the_self_check(tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector]) -> None:
    """A readable, hash-consistent graph that scores differently is caught by re-scoring the known messages."""
    reg = Registry(tmp_path / "reg")
    v = save_one(reg, tmp_path, weights, vectors)
    vdir = reg.root / "versions" / v
    linear_onnx(vdir / "model.onnx", weights * 1.5, 0.25)
    meta = json.loads((vdir / "meta.json").read_text())
    meta.pop("model_sha256")  # as if an older registry wrote it without a hash
    (vdir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelRejected, match="self-check failed"):
        reg.load(v)


@pytest.mark.unit
def test_wrong_self_check_value_is_refused(tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector]) -> None:
    reg = Registry(tmp_path / "reg")
    v = save_one(reg, tmp_path, weights, vectors)
    meta_path = reg.root / "versions" / v / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["self_check"][1]["expected"] += 2e-4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelRejected, match="self-check failed"):
        reg.load(v)
    meta["self_check"] = []
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelRejected, match="no self-check"):
        reg.load(v)


@pytest.mark.unit
@pytest.mark.parametrize("victim", ["model.onnx", "features.json", "meta.json"])
def test_missing_or_garbled_files_are_refused(
    tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector], victim: str
) -> None:
    reg = Registry(tmp_path / "reg")
    v = save_one(reg, tmp_path, weights, vectors)
    f = reg.root / "versions" / v / victim
    f.unlink()
    with pytest.raises(ModelRejected, match="missing"):
        reg.load(v)
    f.write_bytes(b"\x00garbage{")
    with pytest.raises(ModelRejected):
        reg.load(v)
    with pytest.raises(ModelRejected, match="no such version"):
        reg.load("20990101T000000000000Z-linear-0000")


def _promoter(root: str, versions: list[str], rounds: int) -> None:
    reg = Registry(Path(root))
    for i in range(rounds):
        reg.promote(versions[i % len(versions)], f"round {i}")


def _reader(root: str, allowed: list[str], deadline: float, bad: mp.Value) -> None:  # type: ignore[valid-type]
    reg = Registry(Path(root))
    while time.monotonic() < deadline:
        c = reg.champion()
        if c is not None and c not in allowed:
            bad.value += 1  # type: ignore[attr-defined]


@pytest.mark.unit
def test_concurrent_writers_and_readers(tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector]) -> None:
    """Writers in several processes never lose a history line; readers never see a torn champion pointer."""
    reg = Registry(tmp_path / "reg")
    versions = [save_one(reg, tmp_path, weights, vectors) for _ in range(3)]
    ctx = mp.get_context("fork")
    bad = ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(str(reg.root), versions, time.monotonic() + 3.0, bad))
    reader.start()
    writers = [ctx.Process(target=_promoter, args=(str(reg.root), versions, 25)) for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    reader.join(60)
    assert reader.exitcode == 0
    assert bad.value == 0
    hist = reg.history()
    assert len(hist) == 100 and all(h["action"] == "promote" for h in hist)
    assert reg.champion() == hist[-1]["version"]


@pytest.mark.unit
def test_prune_bounds_disk_and_keeps_rollback_targets(
    tmp_path: Path, weights: np.ndarray, vectors: list[SelfCheckVector]
) -> None:
    reg = Registry(tmp_path / "reg")
    champions = []
    challengers = []
    for i in range(6):
        v = save_one(reg, tmp_path, weights, vectors)
        reg.promote(v, f"round {i}")
        champions.append(v)
        challengers.append(save_one(reg, tmp_path, weights, vectors))
    removed = reg.prune(keep=2)
    left = {info.version for info in reg.list()}
    assert reg.champion() == champions[-1]
    assert set(champions[-2:]) <= left  # the champion and one rollback target
    assert set(challengers[-2:]) <= left  # the newest other versions
    assert len(left) == 4 and len(removed) == 8
    assert reg.rollback("test") == champions[-2]
    with pytest.raises(RegistryError, match="no longer in the registry"):
        reg.rollback("too deep")


@pytest.mark.unit
def test_jsonable_turns_numpy_and_undefined_metrics_into_plain_json() -> None:
    import json

    import numpy as np

    from models.registry import jsonable

    value = {"auc": float("nan"), 1: (np.float64(0.5), np.int64(3)), "nested": {"inf": np.float32("inf")},
             "array": np.array([1.0, np.nan])}
    out = jsonable(value)
    assert out == {"auc": None, "1": [0.5, 3], "nested": {"inf": None}, "array": [1.0, None]}
    assert json.loads(json.dumps(out, allow_nan=False)) == out
