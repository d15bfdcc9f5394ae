"""Attentive probe on frozen patch tokens: learned-query cross-attention pooling + linear head.

Same selection rule as the linear probe (validation split carved from TRAIN, test once).

Public API:
    AttentiveProbe(dim, num_classes, num_heads, num_queries)
    attentive_grid(lrs, epochs, ...)            -> list of settings
    attentive_probe(train, test, ...)           -> ProbeResult   (features [N, T, D])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from scott.eval.protocol import FeatureSet, ProbeResult, make_grid, run_probe_protocol

__all__ = ["AttentiveProbe", "attentive_grid", "attentive_probe", "DEFAULT_LRS"]

DEFAULT_LRS = (3e-3, 1e-3, 3e-4)


class AttentiveProbe(nn.Module):
    """Pool tokens with ``num_queries`` learned queries (multi-head cross-attention), then classify.

    tokens [B, T, D] -> LayerNorm -> queries attend to tokens -> mean over queries
    -> LayerNorm -> Linear -> logits [B, C].
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4, num_queries: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"feature dim {dim} is not divisible by num_heads={num_heads}")
        self.query = nn.Parameter(torch.zeros(1, num_queries, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_in = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention-pooled feature [B, D]."""
        kv = self.norm_in(tokens)
        q = self.query.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attn(q, kv, kv, need_weights=False)
        return pooled.mean(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"attentive probe expects tokens [B, T, D], got {tuple(tokens.shape)}")
        return self.head(self.norm_out(self.pool(tokens)))


def attentive_grid(
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: Sequence[int] = (20,),
    batch_size: int = 128,
    weight_decay: float = 0.05,
    num_heads: int = 4,
    num_queries: int = 1,
) -> list[dict]:
    """Every (lr, epochs) pair with AdamW, a one-epoch warm-up and a cosine schedule."""
    return make_grid(
        lr=list(lrs), epochs=list(epochs), batch_size=[batch_size], weight_decay=[weight_decay],
        optimizer=["adamw"], warmup_epochs=[1], num_heads=[num_heads], num_queries=[num_queries],
    )


def attentive_probe(
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int | None = None,
    grid: Sequence[dict] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    refit: str = "train+val",
    device=None,
    on_result=None,
) -> ProbeResult:
    """Attentive probe with validation-split selection; features are tokens [N, T, D]."""
    if train.features.ndim != 3:
        raise ValueError(f"attentive probe expects tokens [N, T, D], got {tuple(train.features.shape)}")
    dim = train.features.shape[2]
    classes = num_classes or int(train.labels.max()) + 1

    def build(params: dict) -> nn.Module:
        return AttentiveProbe(dim, classes, params.get("num_heads", 4), params.get("num_queries", 1))

    return run_probe_protocol(
        train, test, grid or attentive_grid(), build, val_fraction=val_fraction, seed=seed, refit=refit,
        device=device, on_result=on_result,
    )
