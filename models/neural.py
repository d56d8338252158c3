"""The non-linear model: hashed-token embeddings pooled per message, a hidden layer, a sigmoid (PyTorch).

Architecture ("wide and deep" over the shared :class:`~models.features.FeatureBatch`): every token id (folded
into ``n_embed`` rows by a bit mask) has a ``dim``-vector; a message's vector is the value-weighted sum of its
tokens' vectors (an EmbeddingBag done as gather + scatter-add by segment id) and goes through a ReLU layer to one
logit. The wide part, by default, is the SGD linear model over the full hash space, stacked: it is fit first,
the deep part then learns on its out-of-fold logits (how the linear model errs on mail it has not seen) with a
learned scale and shift. Rule hits are tokens, so they reach both parts. ``wide="table"`` learns a folded linear
table jointly instead, ``wide="none"`` is the deep part alone (both validated worse, see ``NeuralConfig``).

Training runs on the CPU in seconds with one thread by default: on the shared 2-core machine torch's
2-thread CPU kernels (index_add_/scatter under contention) were 10x slower than one thread.

Export: the graph is written directly with ``onnx.helper`` from the trained weights, like the linear model's, with
the same four inputs (ids, vals, seg, rows). Pooling is Gather + ScatterND(reduction="add") on whole vectors,
which onnxruntime runs without the ``Loop`` that ``nn.EmbeddingBag`` exports to, and without depending on an
exporter's handling of a data-dependent row count. torch is imported only here; serving never imports it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import structlog
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.base import read_state, write_onnx, write_state
from models.features import FeatureBatch, FeatureConfig
from models.linear import finish_onnx_model

__all__ = ["NeuralConfig", "NeuralModel"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class NeuralConfig:
    """Hyperparameters; defaults chosen by 3-fold blocked cross-validation inside the P1 training period.

    Validation (out-of-fold (1-AUC)%, the linear model alone 0.333): deep only 1.8-2.1, folded wide table
    1.1-1.9, stacked linear + deep trained 8 epochs at lr 3e-3 0.64, 2 epochs at lr 1e-3 0.346 (chosen); the
    deep part helps little on ~3,100 messages, and more training of it only overfits.
    """

    n_embed: int = 1 << 16
    dim: int = 16
    hidden: int = 64
    epochs: int = 2
    batch_size: int = 32
    lr_embed: float = 1e-3
    lr_dense: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    token_dropout: float = 0.2
    wide: str = "linear"  # "linear" (stacked SGD model), "table" (learned folded table) or "none"
    stack_folds: int = 5
    table_optimizer: str = "adam"
    table_weight_decay: float = 0.0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.n_embed < 2 or self.n_embed & (self.n_embed - 1):
            raise ValueError(f"n_embed must be a power of two, got {self.n_embed}")
        if self.wide not in ("linear", "table", "none"):
            raise ValueError(f"wide must be linear, table or none, got {self.wide!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuralConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class _Net(nn.Module):
    lin_w: torch.Tensor  # buffers (register_buffer below): module attributes the type checker cannot see
    lin_b: torch.Tensor

    def __init__(self, cfg: NeuralConfig, n_buckets: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_embed, cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.1)
        self.hidden = nn.Linear(cfg.dim, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, 1)
        self.drop = nn.Dropout(cfg.dropout)
        self.wide_table: nn.Embedding | None = None
        if cfg.wide == "table":
            self.wide_table = nn.Embedding(cfg.n_embed, 1)
            nn.init.zeros_(self.wide_table.weight)
        # wide == "linear": fixed SGD weights over the full hash space, a learned scale and shift on their logit
        self.register_buffer("lin_w", torch.zeros(n_buckets if cfg.wide == "linear" else 1))
        self.register_buffer("lin_b", torch.zeros(()))
        self.lin_scale = nn.Parameter(torch.ones(()))
        self.lin_shift = nn.Parameter(torch.zeros(()))

    def linear_logit(self, ids: torch.Tensor, vals: torch.Tensor, seg: torch.Tensor, rows: int) -> torch.Tensor:
        w = self.lin_w[ids] * vals
        return torch.zeros(rows, dtype=w.dtype).scatter_add(0, seg, w) + self.lin_b

    def forward(
        self,
        ids: torch.Tensor,
        vals: torch.Tensor,
        seg: torch.Tensor,
        rows: int,
        wide_logit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logit per row. ``wide_logit`` replaces the linear part in training (out-of-fold logits)."""
        fid = ids & (self.cfg.n_embed - 1)
        e = self.embed(fid) * vals.unsqueeze(1)
        # scatter_add, not index_add_: torch's multi-threaded CPU index_add_ into a few rows is ~100x slower
        seg_nd = seg.unsqueeze(1).expand(-1, self.cfg.dim)
        pooled = torch.zeros(rows, self.cfg.dim, dtype=e.dtype).scatter_add(0, seg_nd, e)
        h = self.drop(torch.relu(self.hidden(pooled)))
        logit = self.out(h).squeeze(1)
        if self.wide_table is not None:
            w = self.wide_table(fid).squeeze(1) * vals
            logit = logit + torch.zeros(rows, dtype=w.dtype).scatter_add(0, seg, w)
        elif self.cfg.wide == "linear":
            lin = wide_logit if wide_logit is not None else self.linear_logit(ids, vals, seg, rows)
            logit = logit + self.lin_scale * lin + self.lin_shift
        return logit


class NeuralModel:
    """The PyTorch family (see :class:`models.base.SpamModel`): a network plus its feature and training
    configuration; :meth:`fit` trains it from scratch."""

    kind = "neural"

    def __init__(self, features: FeatureConfig | None = None, config: NeuralConfig | None = None,
                 seed: int = 0) -> None:
        self.features = features or FeatureConfig()
        self.config = config or NeuralConfig()
        self.seed = seed
        self.net = _Net(self.config, self.features.n_buckets).eval()
        self.train_seconds = 0.0

    def _tensors(self, batch: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(np.ascontiguousarray(batch.ids, dtype=np.int64))
        vals = torch.from_numpy(np.ascontiguousarray(batch.vals, dtype=np.float32))
        seg = torch.from_numpy(np.ascontiguousarray(batch.seg, dtype=np.int64))
        return ids, vals, seg

    @torch.no_grad()
    def decision_function(self, batch: FeatureBatch) -> np.ndarray:
        """Logit per row (float32), computed by torch."""
        self.net.eval()
        ids, vals, seg = self._tensors(batch)
        return self.net(ids, vals, seg, batch.rows).numpy().astype(np.float32)

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        """Spam probability per row (float32), computed by torch (the reference for the parity tests)."""
        with torch.no_grad():
            return torch.sigmoid(torch.from_numpy(self.decision_function(batch))).numpy()

    def fit(self, batch: FeatureBatch, y: Sequence[int] | np.ndarray, sample_weight: np.ndarray | None = None,
            ) -> NeuralModel:
        """Train the network from scratch on ``batch`` (deterministic for a given seed and thread count);
        ``sample_weight`` weighs rows in the loss (and in the stacked linear part)."""
        cfg, feats, seed = self.config, self.features, self.seed
        labels = np.asarray(y, dtype=np.float32).reshape(-1)
        if labels.size != batch.rows:
            raise ValueError(f"{batch.rows} rows but {labels.size} labels")
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float32).reshape(-1)
        if weights is not None and weights.size != labels.size:
            raise ValueError(f"{labels.size} labels but {weights.size} sample weights")
        if labels.size and not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError("labels must be 0 (ham) or 1 (spam)")
        started = time.perf_counter()
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, cfg.threads))
        try:
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            net = _Net(cfg, feats.n_buckets)
            oof: np.ndarray | None = None
            if cfg.wide == "linear":
                oof = _stack_linear(net, batch, labels, feats, cfg.stack_folds, rng, weights)
            _train(net, cfg, batch, labels, weights, oof, rng)
            net.eval()
        finally:
            torch.set_num_threads(prev_threads)
        self.net = net
        self.train_seconds = time.perf_counter() - started
        log.info("neural_trained", rows=batch.rows, seconds=round(self.train_seconds, 2), seed=seed, **cfg.to_dict())
        return self

    def save(self, path: Path | str) -> Path:
        """Weights, configuration and seed in one ``.npz``; :meth:`load` restores identical scores."""
        arrays = {f"param:{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        meta = {"features": self.features.to_dict(), "config": self.config.to_dict(), "seed": self.seed}
        return write_state(path, arrays, meta)

    @classmethod
    def load(cls, path: Path | str) -> NeuralModel:
        arrays, meta = read_state(path)
        model = cls(FeatureConfig.from_dict(meta["features"]), NeuralConfig.from_dict(meta["config"]), int(meta["seed"]))
        model.net.load_state_dict({k[len("param:"):]: torch.from_numpy(v) for k, v in arrays.items()})
        model.net.eval()
        return model

    # --- export ---------------------------------------------------------------------------------------
    def to_onnx(self) -> onnx.ModelProto:
        """The serving graph: inputs ids/vals/seg/rows, outputs ``prob`` and ``logit`` float32[rows]."""
        cfg = self.config
        net = self.net
        f32 = np.float32
        inits = [
            numpy_helper.from_array(net.embed.weight.detach().numpy().astype(f32), "E"),
            numpy_helper.from_array(net.hidden.weight.detach().numpy().T.astype(f32).copy(), "W1"),
            numpy_helper.from_array(net.hidden.bias.detach().numpy().astype(f32), "b1"),
            numpy_helper.from_array(net.out.weight.detach().numpy().T.astype(f32).copy(), "W2"),
            numpy_helper.from_array(net.out.bias.detach().numpy().astype(f32), "b2"),
            numpy_helper.from_array(np.array(cfg.n_embed - 1, dtype=np.int64), "fold_mask"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array([cfg.dim], dtype=np.int64), "dim"),
        ]
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        nodes = [
            # ids mod n_embed as a bit mask (n_embed is a power of two): onnxruntime's int64 Mod is ~10x slower
            helper.make_node("BitwiseAnd", ["ids", "fold_mask"], ["fid"]),
            helper.make_node("Gather", ["E", "fid"], ["emb"], axis=0),
            helper.make_node("Unsqueeze", ["vals", "axis1"], ["vals2"]),
            helper.make_node("Mul", ["emb", "vals2"], ["wemb"]),
            helper.make_node("Concat", ["rows", "dim"], ["pool_shape"], axis=0),
            helper.make_node("ConstantOfShape", ["pool_shape"], ["pool0"], value=zero),
            # ScatterND adds whole dim-vectors per entry; ScatterElements over an expanded [N, dim] index was
            # ~40x slower in onnxruntime (one bookkeeping step per element instead of per vector).
            helper.make_node("Unsqueeze", ["seg", "axis1"], ["seg2"]),
            helper.make_node("ScatterND", ["pool0", "seg2", "wemb"], ["pooled"], reduction="add"),
            helper.make_node("MatMul", ["pooled", "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["o0"]),
            helper.make_node("Add", ["o0", "b2"], ["o1"]),
            helper.make_node("Squeeze", ["o1", "axis1"], ["deep"]),
        ]
        wide_nodes = [
            helper.make_node("Mul", ["w_ids", "vals"], ["wcontrib"]),
            helper.make_node("ConstantOfShape", ["rows"], ["wide0"], value=zero),
            helper.make_node("ScatterElements", ["wide0", "seg", "wcontrib"], ["wide"], axis=0, reduction="add"),
        ]
        if net.wide_table is not None:
            inits.append(
                numpy_helper.from_array(net.wide_table.weight.detach().numpy().reshape(-1).astype(f32), "Wwide")
            )
            nodes += [helper.make_node("GatherElements", ["Wwide", "fid"], ["w_ids"], axis=0), *wide_nodes]
            nodes.append(helper.make_node("Add", ["deep", "wide"], ["logit"]))
        elif cfg.wide == "linear":
            inits += [
                numpy_helper.from_array(net.lin_w.detach().numpy().astype(f32), "Wlin"),
                numpy_helper.from_array(np.array([float(net.lin_b)], dtype=f32), "blin"),
                numpy_helper.from_array(np.array([float(net.lin_scale.detach())], dtype=f32), "lin_scale"),
                numpy_helper.from_array(np.array([float(net.lin_shift.detach())], dtype=f32), "lin_shift"),
            ]
            nodes += [helper.make_node("GatherElements", ["Wlin", "ids"], ["w_ids"], axis=0), *wide_nodes]
            nodes += [
                helper.make_node("Add", ["wide", "blin"], ["lin_logit"]),
                helper.make_node("Mul", ["lin_logit", "lin_scale"], ["lin_scaled"]),
                helper.make_node("Add", ["deep", "lin_scaled"], ["deep_lin"]),
                helper.make_node("Add", ["deep_lin", "lin_shift"], ["logit"]),
            ]
        else:
            nodes.append(helper.make_node("Identity", ["deep"], ["logit"]))
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["prob"]))
        return finish_onnx_model(
            nodes,
            "flywheel_neural",
            inits,
            {
                "kind": "neural",
                "features": json.dumps(self.features.to_dict()),
                "hyperparameters": json.dumps(self.config.to_dict()),
                "seed": str(self.seed),
            },
        )

    def export_onnx(self, path: Path | str) -> Path:
        """Write the serving graph to ``path``."""
        return write_onnx(self.to_onnx(), path)


def _stack_linear(
    net: _Net, batch: FeatureBatch, labels: np.ndarray, feats: FeatureConfig, k: int, rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Fit the linear part on everything (kept fixed in the net) and return its out-of-fold logits.

    The deep part learns on top of out-of-fold logits, i.e. on how the linear model errs on mail it did not
    see, which is how it behaves on new mail; in-sample logits would be overconfident and leave nothing to learn.
    """
    from models.linear import LinearModel

    rows = batch.rows
    fold = rng.permutation(rows) % max(2, k)
    oof = np.zeros(rows, dtype=np.float32)
    for j in range(max(2, k)):
        tr, va = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
        if np.unique(labels[tr]).size < 2:
            continue
        part = LinearModel(feats).fit(batch.take(tr), labels[tr].astype(np.int64),
                                      sample_weight=None if weights is None else weights[tr])
        oof[va] = part.decision_function(batch.take(va)).astype(np.float32)
    full = LinearModel(feats).fit(batch, labels.astype(np.int64), sample_weight=weights)
    w, b = full._weights()
    with torch.no_grad():
        net.lin_w.copy_(torch.from_numpy(w.astype(np.float32)))
        net.lin_b.fill_(float(b))
    return oof


def _row_starts(batch: FeatureBatch) -> np.ndarray:
    return np.searchsorted(batch.seg, np.arange(batch.rows + 1)).astype(np.int64)


def _train(net: _Net, cfg: NeuralConfig, batch: FeatureBatch, labels: np.ndarray, weights: np.ndarray | None,
           oof: np.ndarray | None, rng: np.random.Generator) -> None:
    """Minibatch training of ``net`` in place (AdamW on the dense layers, the chosen optimizer on the tables)."""
    table_params = [net.embed.weight] + ([net.wide_table.weight] if net.wide_table is not None else [])
    dense_params = [p for n, p in net.named_parameters() if not n.startswith(("embed.", "wide_table."))]
    opt_dense = torch.optim.AdamW(dense_params, lr=cfg.lr_dense, weight_decay=cfg.weight_decay)
    opt_table: torch.optim.Optimizer
    if cfg.table_optimizer == "adagrad":
        # per-row step sizes that shrink with a token's history: rare tokens are not blown up as by Adam
        opt_table = torch.optim.Adagrad(table_params, lr=cfg.lr_embed, weight_decay=cfg.table_weight_decay)
    elif cfg.table_optimizer == "adam":
        opt_table = torch.optim.AdamW(table_params, lr=cfg.lr_embed, weight_decay=cfg.table_weight_decay)
    else:
        raise ValueError(f"unknown table_optimizer {cfg.table_optimizer!r}")
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    starts = _row_starts(batch)
    ids_all = batch.ids
    vals_all = batch.vals.astype(np.float32)
    net.train()
    for _epoch in range(cfg.epochs):
        order = rng.permutation(batch.rows)
        for lo in range(0, batch.rows, cfg.batch_size):
            rows = order[lo : lo + cfg.batch_size]
            spans = [np.arange(starts[r], starts[r + 1]) for r in rows]
            lens = np.array([s.size for s in spans])
            take = np.concatenate(spans)
            seg = np.repeat(np.arange(rows.size), lens)
            vals = vals_all[take]
            if cfg.token_dropout > 0:
                keep = rng.random(take.size) >= cfg.token_dropout
                take, seg, vals = take[keep], seg[keep], vals[keep] / (1.0 - cfg.token_dropout)
            logit = net(
                torch.from_numpy(ids_all[take]),
                torch.from_numpy(vals.astype(np.float32)),
                torch.from_numpy(seg.astype(np.int64)),
                int(rows.size),
                None if oof is None else torch.from_numpy(oof[rows]),
            )
            per_row = loss_fn(logit, torch.from_numpy(labels[rows]))
            if weights is None:
                loss = per_row.mean()
            else:
                w = torch.from_numpy(weights[rows])
                loss = (per_row * w).sum() / torch.clamp(w.sum(), min=1e-6)
            opt_table.zero_grad(set_to_none=True)
            opt_dense.zero_grad(set_to_none=True)
            loss.backward()
            opt_table.step()
            opt_dense.step()
