"""Linear probe and the probe protocol: separable data is solved, test data never reaches selection."""

import pytest
import torch

from scott.eval import protocol
from scott.eval.linear import LinearProbe, linear_grid, linear_probe
from scott.eval.protocol import FeatureSet, carve_validation, run_probe_protocol, select_hyperparameters


def separable(n_per_class, dim=16, classes=3, seed=0, spread=0.3):
    """Gaussian clusters around well separated means (linearly separable with high probability)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.eye(classes, dim) * 4.0
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = means[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return FeatureSet(feats, labels)


def rows_in(a, b):
    """For each row of ``a``: is it exactly equal to some row of ``b``?"""
    return (a[:, None, :] == b[None, :, :]).all(dim=-1).any(dim=1)


def test_linear_probe_reaches_full_accuracy_on_separable_features():
    train, test = separable(60, seed=0), separable(30, seed=1)
    result = linear_probe(train, test, grid=linear_grid(lrs=[0.01, 0.1], epochs=[5]), seed=0)
    assert result.test["top1"] >= 0.99
    assert result.test["top5"] == 1.0
    assert result.test["mean_per_class"] >= 0.99
    assert result.n_fit + result.n_val == len(train)
    assert result.n_refit == len(train)  # default refit on train+val
    assert result.n_test == len(test)
    assert len(result.table) == 2 and {r["lr"] for r in result.table} == {0.01, 0.1}


def test_untrained_probe_is_near_chance_so_the_accuracy_test_can_fail():
    test = separable(30, seed=1)
    probe = LinearProbe(16, 3).eval()
    probe.norm.running_mean.zero_()
    acc = protocol.evaluate_classifier(probe, test)["top1"]
    assert acc < 0.9


def test_selection_never_receives_test_data(monkeypatch):
    train, test = separable(40, seed=0), separable(20, seed=5)
    test = FeatureSet(test.features + 100.0, test.labels)  # rows that cannot occur in train
    seen = {}

    def spy(fit, val, grid, build, **kw):
        seen["args"] = (fit, val, grid, build, kw)
        assert not any(isinstance(v, FeatureSet) for v in kw.values())
        return select_hyperparameters(fit, val, grid, build, **kw)

    evaluated = []
    real_eval = protocol.evaluate_classifier

    def eval_spy(model, data):
        evaluated.append(data)
        return real_eval(model, data)

    monkeypatch.setattr(protocol, "evaluate_classifier", eval_spy)
    result = run_probe_protocol(train, test, linear_grid(lrs=[0.05, 0.5], epochs=[3]),
                                lambda p: LinearProbe(16, 3), val_fraction=0.25, seed=3, select_fn=spy)
    fit, val = seen["args"][0], seen["args"][1]
    assert len(fit) + len(val) == len(train)
    received = torch.cat([fit.features, val.features])
    # every received row is a train row, none is a test row
    assert torch.cdist(received, test.features).min() > 50.0
    assert rows_in(received, train.features).all()
    assert not rows_in(received, test.features).any()
    # fit and val are disjoint
    assert not rows_in(fit.features, val.features).any()
    # the test split is evaluated exactly once, after selection (2 grid points on val first)
    test_evals = [d for d in evaluated if d is test]
    assert len(test_evals) == 1 and evaluated[-1] is test
    assert sum(d is val for d in evaluated) == 2
    assert result.best["lr"] in (0.05, 0.5)


def test_carve_validation_is_deterministic_and_disjoint():
    train = separable(50, seed=0)
    fit1, val1 = carve_validation(train, 0.2, seed=7)
    fit2, val2 = carve_validation(train, 0.2, seed=7)
    assert torch.equal(val1.features, val2.features) and torch.equal(fit1.labels, fit2.labels)
    assert 20 <= len(val1) <= 40 and len(fit1) + len(val1) == 150
    with pytest.raises(ValueError):
        carve_validation(train, 0.0, seed=0)


def test_refit_train_only_uses_fit_part():
    train, test = separable(30, seed=0), separable(10, seed=1)
    result = linear_probe(train, test, grid=linear_grid(lrs=[0.1], epochs=[2]), refit="train")
    assert result.n_refit == result.n_fit < len(train)


def test_linear_probe_rejects_token_features():
    tokens = FeatureSet(torch.zeros(4, 2, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="pooled"):
        linear_probe(tokens, tokens)


def test_grid_edges():
    grid = linear_grid(lrs=[0.1, 1.0, 3.0], epochs=[10, 20])
    assert protocol.grid_edges({"lr": 1.0, "epochs": 20, "batch_size": 256}, grid) == ["epochs"]
    assert protocol.grid_edges({"lr": 3.0, "epochs": 10}, grid) == ["lr", "epochs"]
    assert protocol.grid_edges({"lr": 1.0}, grid) == []
