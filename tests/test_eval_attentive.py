"""Attentive probe: learned-query pooling finds the one informative token among distractors."""

import pytest
import torch

from scott.eval.attentive import AttentiveProbe, attentive_grid, attentive_probe
from scott.eval.linear import linear_grid, linear_probe
from scott.eval.protocol import FeatureSet


def one_informative_token(n, tokens=6, dim=16, classes=3, seed=0):
    """Token 0 carries the class (a marker in dim 0 plus the class mean); others are noise.

    The class signal is weak in the token average (diluted 1/tokens into strong noise) but
    clean in the marked token, which attention can select.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    x = 2.0 * torch.randn(n, tokens, dim, generator=gen)
    x[:, 0] = 0.1 * torch.randn(n, dim, generator=gen)
    x[:, 0, 0] = 5.0
    x[torch.arange(n), 0, 1 + labels] += 3.0
    return FeatureSet(x, labels)


def test_attentive_probe_learns_informative_token():
    train, test = one_informative_token(300, seed=0), one_informative_token(90, seed=1)
    grid = attentive_grid(lrs=[3e-3], epochs=[15], batch_size=32, num_heads=2)
    result = attentive_probe(train, test, grid=grid, seed=0)
    assert result.test["top1"] >= 0.95
    assert result.n_fit + result.n_val == 300 and result.n_test == 90
    # the same tokens averaged are a much harder problem for a linear probe
    avg = linear_probe(FeatureSet(train.features.mean(1), train.labels),
                       FeatureSet(test.features.mean(1), test.labels),
                       grid=linear_grid(lrs=[0.1], epochs=[15]))
    assert avg.test["top1"] < result.test["top1"]


def test_probe_shapes_and_errors():
    probe = AttentiveProbe(16, 5, num_heads=4, num_queries=3)
    assert probe(torch.randn(2, 7, 16)).shape == (2, 5)
    with pytest.raises(ValueError):
        AttentiveProbe(10, 2, num_heads=4)
    with pytest.raises(ValueError, match="tokens"):
        attentive_probe(FeatureSet(torch.zeros(4, 3), torch.zeros(4).long()),
                        FeatureSet(torch.zeros(4, 3), torch.zeros(4).long()))
