"""The non-linear model: hashed-token embeddings pooled per message, hidden layers, a sigmoid (PyTorch).

Architecture ("wide and deep" over the shared :class:`~models.features.FeatureBatch`): every token id (folded
into ``n_embed`` rows) has a ``dim``-vector and a scalar weight. A message's vector is the value-weighted sum of
its tokens' vectors (an EmbeddingBag done as gather + scatter-add by segment id), goes through ``hidden``
ReLU layers to one logit, and the value-weighted sum of the scalar weights (a linear term, the "wide" part)
is added. Rule hits are tokens, so the rules reach both parts.

Training runs on the CPU in seconds: embedding tables get sparse gradients (SparseAdam), the small dense layers
AdamW; regularisation is token dropout (whole entries dropped at random) plus dropout on the hidden layer.

Export: the graph is written directly with ``onnx.helper`` from the trained weights, the same way as the linear
model's, with the same four inputs (ids, vals, seg, rows). That keeps the pooling exactly a GatherElements/Gather
plus ScatterElements(reduction="add"), which onnxruntime runs without the ``Loop`` that ``nn.EmbeddingBag``
exports to, and it does not depend on an exporter's handling of a data-dependent row count.

torch is imported only here; serving (``models.runtime``) never imports this module.
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

from models.features import FeatureBatch, FeatureConfig
from models.linear import OPSET, build_onnx_inputs

__all__ = ["NeuralConfig", "NeuralModel", "train_neural"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class NeuralConfig:
    """Hyperparameters; the defaults were chosen by validation inside the P1 training period."""

    n_embed: int = 1 << 18
    dim: int = 32
    hidden: int = 64
    epochs: int = 8
    batch_size: int = 32
    lr_embed: float = 3e-3
    lr_dense: float = 2e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    token_dropout: float = 0.2
    wide: bool = True
    threads: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuralConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class _Net(nn.Module):
    def __init__(self, cfg: NeuralConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_embed, cfg.dim, sparse=True)
        nn.init.normal_(self.embed.weight, std=0.1)
        self.wide = nn.Embedding(cfg.n_embed, 1, sparse=True) if cfg.wide else None
        if self.wide is not None:
            nn.init.zeros_(self.wide.weight)
        self.hidden = nn.Linear(cfg.dim, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, 1)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor, vals: torch.Tensor, seg: torch.Tensor, rows: int) -> torch.Tensor:
        """Logit per row; ``ids`` already folded into ``n_embed``."""
        e = self.embed(ids) * vals.unsqueeze(1)
        pooled = torch.zeros(rows, self.cfg.dim, dtype=e.dtype).index_add_(0, seg, e)
        h = self.drop(torch.relu(self.hidden(pooled)))
        logit = self.out(h).squeeze(1)
        if self.wide is not None:
            w = self.wide(ids).squeeze(1) * vals
            logit = logit + torch.zeros(rows, dtype=w.dtype).index_add_(0, seg, w)
        return logit


class NeuralModel:
    """A trained network plus its feature and training configuration."""

    def __init__(self, net: _Net, features: FeatureConfig, config: NeuralConfig, seed: int) -> None:
        self.net = net.eval()
        self.features = features
        self.config = config
        self.seed = seed
        self.train_seconds = 0.0

    def _tensors(self, batch: FeatureBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(np.ascontiguousarray(batch.ids % self.config.n_embed, dtype=np.int64))
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
            numpy_helper.from_array(np.array(cfg.n_embed, dtype=np.int64), "n_embed"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array([cfg.dim], dtype=np.int64), "dim"),
        ]
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        nodes = [
            helper.make_node("Mod", ["ids", "n_embed"], ["fid"]),
            helper.make_node("Gather", ["E", "fid"], ["emb"], axis=0),
            helper.make_node("Unsqueeze", ["vals", "axis1"], ["vals2"]),
            helper.make_node("Mul", ["emb", "vals2"], ["wemb"]),
            helper.make_node("Concat", ["rows", "dim"], ["pool_shape"], axis=0),
            helper.make_node("ConstantOfShape", ["pool_shape"], ["pool0"], value=zero),
            helper.make_node("Unsqueeze", ["seg", "axis1"], ["seg2"]),
            helper.make_node("Shape", ["wemb"], ["wemb_shape"]),
            helper.make_node("Expand", ["seg2", "wemb_shape"], ["seg_nd"]),
            helper.make_node("ScatterElements", ["pool0", "seg_nd", "wemb"], ["pooled"], axis=0, reduction="add"),
            helper.make_node("MatMul", ["pooled", "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["o0"]),
            helper.make_node("Add", ["o0", "b2"], ["o1"]),
            helper.make_node("Squeeze", ["o1", "axis1"], ["deep"]),
        ]
        if net.wide is not None:
            inits.append(numpy_helper.from_array(net.wide.weight.detach().numpy().reshape(-1).astype(f32), "Wwide"))
            nodes += [
                helper.make_node("GatherElements", ["Wwide", "fid"], ["w_ids"], axis=0),
                helper.make_node("Mul", ["w_ids", "vals"], ["wcontrib"]),
                helper.make_node("ConstantOfShape", ["rows"], ["wide0"], value=zero),
                helper.make_node("ScatterElements", ["wide0", "seg", "wcontrib"], ["wide"], axis=0, reduction="add"),
                helper.make_node("Add", ["deep", "wide"], ["logit"]),
            ]
        else:
            nodes.append(helper.make_node("Identity", ["deep"], ["logit"]))
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["prob"]))
        graph = helper.make_graph(
            nodes,
            "flywheel_neural",
            build_onnx_inputs(),
            [
                helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["rows"]),
                helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["rows"]),
            ],
            initializer=inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="flywheel")
        model.ir_version = 9
        helper.set_model_props(
            model,
            {
                "kind": "neural",
                "features": json.dumps(self.features.to_dict()),
                "hyperparameters": json.dumps(self.config.to_dict()),
                "seed": str(self.seed),
            },
        )
        onnx.checker.check_model(model)
        return model

    def export_onnx(self, path: Path | str) -> Path:
        """Write the serving graph to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(self.to_onnx(), str(path))
        return path


def _row_starts(batch: FeatureBatch) -> np.ndarray:
    return np.searchsorted(batch.seg, np.arange(batch.rows + 1)).astype(np.int64)


def train_neural(
    batch: FeatureBatch,
    y: Sequence[int] | np.ndarray,
    config: NeuralConfig | None = None,
    seed: int = 0,
    features: FeatureConfig | None = None,
) -> NeuralModel:
    """Train the network from scratch on ``batch`` (deterministic for a given seed and thread count)."""
    cfg = config or NeuralConfig()
    feats = features or FeatureConfig()
    labels = np.asarray(y, dtype=np.float32).reshape(-1)
    if labels.size != batch.rows:
        raise ValueError(f"{batch.rows} rows but {labels.size} labels")
    if labels.size and not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 (ham) or 1 (spam)")
    started = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = _Net(cfg)
        sparse_params = [net.embed.weight] + ([net.wide.weight] if net.wide is not None else [])
        dense_params = [p for n, p in net.named_parameters() if not n.startswith(("embed.", "wide."))]
        opt_sparse = torch.optim.SparseAdam(sparse_params, lr=cfg.lr_embed)
        opt_dense = torch.optim.AdamW(dense_params, lr=cfg.lr_dense, weight_decay=cfg.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        starts = _row_starts(batch)
        ids_all = batch.ids % cfg.n_embed
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
                )
                loss = loss_fn(logit, torch.from_numpy(labels[rows]))
                opt_sparse.zero_grad()
                opt_dense.zero_grad()
                loss.backward()
                opt_sparse.step()
                opt_dense.step()
        net.eval()
    finally:
        torch.set_num_threads(prev_threads)
    model = NeuralModel(net, feats, cfg, seed)
    model.train_seconds = time.perf_counter() - started
    log.info("neural_trained", rows=batch.rows, seconds=round(model.train_seconds, 2), seed=seed, **cfg.to_dict())
    return model
