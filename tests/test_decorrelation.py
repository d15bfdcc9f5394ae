"""VICReg's variance and covariance terms (``objective.var_weight`` / ``objective.cov_weight``):
the two functions against hand computations, and how they join MIM-JEPA's loss."""
import math

import numpy as np
import pytest
import torch

from scott.decorrelation import center_by_position, covariance_term, variance_term
from test_objective_levers import _masks, _objective  # the same tiny MIM-JEPA and masks


def test_variance_term_is_the_hinge_on_each_channels_std():
    # channel 0: values +-0.5 -> unbiased var 0.5**2 * 4/3; channel 1: +-3 -> std far above 1
    z = torch.tensor([[0.5, 3.0], [-0.5, -3.0], [0.5, 3.0], [-0.5, -3.0]])
    std0 = math.sqrt(0.25 * 4 / 3 + 1e-4)
    assert math.isclose(float(variance_term(z)), (1 - std0) / 2, rel_tol=1e-6)
    assert float(variance_term(z * 10)) == 0.0          # every std >= 1: no penalty
    assert math.isclose(float(variance_term(torch.zeros(5, 3))), 1 - math.sqrt(1e-4), rel_tol=1e-6)


def test_covariance_term_matches_numpy_and_ignores_the_diagonal():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    cov = np.cov(a, rowvar=False)
    expected = (np.square(cov).sum() - np.square(np.diag(cov)).sum()) / 6
    assert math.isclose(float(covariance_term(torch.tensor(a, dtype=torch.float32))), expected, rel_tol=1e-4)
    # uncorrelated channels of any scale cost nothing: the rows of a centred Hadamard design
    h = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) * torch.tensor([1.0, 5.0, 0.1])
    assert float(covariance_term(h)) < 1e-10


def test_terms_reject_a_single_row():
    with pytest.raises(ValueError, match="M >= 2"):
        variance_term(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="M >= 2"):
        covariance_term(torch.zeros(3))


@pytest.mark.parametrize("mode", ["visible", "all"])
def test_terms_add_to_the_masked_loss_on_the_visible_context_tokens(mode):
    torch.manual_seed(0)
    from scott.objectives import build_objective
    from test_objective_levers import MODEL
    model = {**MODEL, "context_tokens": mode}
    obj = build_objective({"model": model, "objective": {"name": "mimjepa", "var_weight": 0.5, "cov_weight": 2.0}})
    x, m = torch.randn(4, 1, 16, 16), _masks(4)
    total, stats = obj(x, x, m)
    obj.var_weight = obj.cov_weight = 0.0
    masked_only, _ = obj(x, x, m)
    ctx = obj.context_encoder(x, m.visible, context_tokens=mode)
    if mode == "all":
        tokens = ctx[m.visible.reshape(4, -1)]
    else:
        tokens = ctx.flatten(0, 1)
    assert tokens.shape[0] == int(m.visible.sum())  # every visible token, and no other
    var, cov = variance_term(tokens), covariance_term(tokens)
    assert torch.allclose(total - masked_only, 0.5 * var + 2.0 * cov, atol=1e-5)
    assert torch.allclose(stats["var_term"], var) and torch.allclose(stats["cov_term"], cov)


def test_terms_train_the_context_encoder_and_default_to_off():
    obj = _objective(var_weight=1.0, cov_weight=1.0)
    x, m = torch.randn(4, 1, 16, 16), _masks(4)

    def encoder_grads():
        obj.zero_grad(set_to_none=True)
        obj(x, x, m)[0].backward()
        return torch.cat([p.grad.flatten() for p in obj.context_encoder.parameters() if p.grad is not None])

    with_terms = encoder_grads()
    obj.var_weight = obj.cov_weight = 0.0
    masked_only = encoder_grads()
    # the terms' own gradient reaches the context encoder (the masked loss alone gives another)
    assert float((with_terms - masked_only).abs().max()) > 1e-4
    plain = _objective()
    assert plain.var_weight == 0.0 and plain.cov_weight == 0.0
    assert "var_term" not in plain(x, x, m)[1]


@pytest.mark.parametrize("key", ["var_weight", "cov_weight"])
def test_recipe_rejects_a_negative_weight(key):
    from scott.config import RecipeError, resolve_recipe

    assert resolve_recipe({"objective": {key: 0.5}}, source="<t>", check_data=False)["objective"][key] == 0.5
    with pytest.raises(RecipeError, match=f"objective.{key}"):
        resolve_recipe({"objective": {key: -1.0}}, source="<t>", check_data=False)


def test_center_by_position_removes_each_positions_mean_and_nothing_else():
    z = torch.tensor([[1.0, 10.0], [3.0, 20.0], [5.0, -4.0], [7.0, 0.0], [2.0, 2.0]])
    pos = torch.tensor([0, 0, 2, 2, 1])
    out = center_by_position(z, pos, num_positions=4)
    # position 0: mean (2, 15); position 2: mean (6, -2); position 1 holds one row -> zeros
    expected = torch.tensor([[-1.0, -5.0], [1.0, 5.0], [-1.0, -2.0], [1.0, 2.0], [0.0, 0.0]])
    assert torch.equal(out, expected)
    # a shift shared by every row at one position disappears; one that differs between rows stays
    shifted = z.clone()
    shifted[pos == 2] += torch.tensor([100.0, -50.0])
    assert torch.equal(center_by_position(shifted, pos, 4), expected)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        center_by_position(z, torch.tensor([0, 0, 2, 4, 1]), 4)
    with pytest.raises(ValueError, match="one position per row"):
        center_by_position(z, pos[:3], 4)


@pytest.mark.parametrize("mode", ["visible", "all"])
def test_position_centring_feeds_the_terms_the_tokens_minus_their_positions_mean(mode):
    torch.manual_seed(0)
    from scott.objectives import build_objective
    from test_objective_levers import MODEL
    model = {**MODEL, "context_tokens": mode}
    objective = {"name": "mimjepa", "var_weight": 0.5, "cov_weight": 2.0, "decorrelation_center": "position"}
    obj = build_objective({"model": model, "objective": objective})
    x, m = torch.randn(4, 1, 16, 16), _masks(4)
    total, stats = obj(x, x, m)
    obj.var_weight = obj.cov_weight = 0.0
    masked_only, _ = obj(x, x, m)
    ctx = obj.context_encoder(x, m.visible, context_tokens=mode)
    rows = m.visible.reshape(4, -1)
    # each visible token's grid position, written out by hand (row-major over the 4 x 4 grid)
    tokens, positions = [], []
    for i in range(4):
        for j, p in enumerate(rows[i].nonzero()[:, 0].tolist()):
            tokens.append(ctx[i, p] if mode == "all" else ctx[i, j])
            positions.append(p)
    tokens = torch.stack(tokens)
    centred = tokens.clone()
    for p in set(positions):
        at = torch.tensor([q == p for q in positions])
        centred[at] = tokens[at] - tokens[at].mean(0)
    var, cov = variance_term(centred), covariance_term(centred)
    assert torch.allclose(total - masked_only, 0.5 * var + 2.0 * cov, atol=1e-5)
    assert torch.allclose(stats["var_term"], var) and torch.allclose(stats["cov_term"], cov)
    # and it is a different loss from the batch-centred default on the same tokens
    assert abs(float(covariance_term(tokens.detach())) - float(cov.detach())) > 1e-3


def test_recipe_validates_the_centring_choice():
    from scott.config import RecipeError, resolve_recipe

    ok = resolve_recipe({"objective": {"decorrelation_center": "position"}}, source="<t>", check_data=False)
    assert ok["objective"]["decorrelation_center"] == "position"
    assert resolve_recipe({}, source="<t>", check_data=False)["objective"]["decorrelation_center"] == "batch"
    with pytest.raises(RecipeError, match="objective.decorrelation_center"):
        resolve_recipe({"objective": {"decorrelation_center": "pixel"}}, source="<t>", check_data=False)
