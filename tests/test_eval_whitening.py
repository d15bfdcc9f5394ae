"""PCA whitening of frozen features (scott.eval.whitening) and the kNN read-out that uses it."""
import json

import numpy as np
import pytest
import torch

from scott.eval.knn import knn_classify
from scott.eval.whitening import fit_whitening
from cli_helpers import exit_code, load_tool


def _correlated(n=400, d=24, seed=0, decades=2.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -decades, d)[None]
    return torch.randn(n, d, generator=g) @ mix + 5.0


def test_whitened_bank_has_zero_mean_and_identity_covariance():
    x = _correlated()
    white = fit_whitening(x, 10)
    z = white(x).double()
    assert white.dim == 10 and z.shape == (400, 10)
    assert z.mean(0).abs().max() < 1e-5
    assert torch.allclose(z.T @ z / 399, torch.eye(10, dtype=torch.float64), atol=1e-4)
    assert torch.all(white.variances[:-1] >= white.variances[1:])  # largest first


def test_equals_the_svd_of_the_centred_bank():
    """Two computations of one meaning: the covariance eigendecomposition (used) and numpy's SVD
    of the centred data, directions signed alike."""
    x = _correlated(seed=1)
    white = fit_whitening(x, 8)
    a = x.double().numpy()
    centred = a - a.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    v = vt[:8].T
    v = v * np.sign(v[np.abs(v).argmax(0), np.arange(8)])
    expected = (a - a.mean(0)) @ (v / (s[:8] / np.sqrt(len(a) - 1)))
    assert np.allclose(white(x).numpy(), expected, atol=1e-3)


def test_randomised_path_for_wide_features_matches_the_exact_one():
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(60, 6, generator=g))[0]
    x = (torch.randn(300, 6, generator=g) * torch.tensor([9.0, 7, 5, 4, 3, 2])) @ basis.T \
        + 1e-3 * torch.randn(300, 60, generator=g)
    exact = fit_whitening(x, 4)
    state = torch.random.get_rng_state()
    wide = fit_whitening(x, 4, exact_max_dim=10, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is untouched
    assert torch.allclose(wide(x), exact(x), atol=1e-3)


def test_full_whitening_makes_knn_blind_to_any_invertible_linear_map():
    x = _correlated(n=300, d=12, seed=3, decades=0.5)  # well above the variance floor after mixing
    labels = (x[:, 11] > x[:, 11].median()).long()
    g = torch.Generator().manual_seed(4)
    mixed = x @ (0.5 * torch.randn(12, 12, generator=g) + 3 * torch.eye(12))
    q, bank, yq, yb = x[:60], x[60:], labels[:60], labels[60:]
    qm, bm = mixed[:60], mixed[60:]
    w, wm = fit_whitening(bank, 12), fit_whitening(bm, 12)
    sims = torch.nn.functional.normalize(w(q)) @ torch.nn.functional.normalize(w(bank)).T
    sims_m = torch.nn.functional.normalize(wm(qm)) @ torch.nn.functional.normalize(wm(bm)).T
    assert torch.allclose(sims, sims_m, atol=1e-3)
    assert knn_classify(w(bank), yb, w(q), yq, k=5)[0] == knn_classify(wm(bm), yb, wm(qm), yq, k=5)[0]


def test_whitening_recovers_a_class_signal_that_a_nuisance_direction_hides():
    """Two classes apart along one quiet direction, five loud nuisance directions and an offset on
    top: the plain cosine follows the nuisance (chance), the whitened one the classes."""
    g = torch.Generator().manual_seed(5)
    n = 600
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) * 0.2
    x[:, 0] += 2.0 * y - 1.0                               # the class, at unit scale
    x[:, 1:6] += 10.0 * torch.randn(n, 5, generator=g)     # the nuisance, 10 times louder
    x[:, 6] += 30.0
    bank, q = x[:500], x[500:]
    plain = knn_classify(bank, y[:500], q, y[500:], k=10)[0]
    white = fit_whitening(bank, 8)
    whitened = knn_classify(white(bank), y[:500], white(q), y[500:], k=10)[0]
    assert plain < 0.65 and whitened > 0.95


def test_flat_directions_are_floored_and_bad_arguments_raise():
    x = torch.cat([_correlated(n=50, d=5), torch.zeros(50, 3)], dim=1)  # 3 constant columns
    white = fit_whitening(x, 8)
    assert torch.isfinite(white(x)).all() and white.variances.min() > 0
    with pytest.raises(ValueError, match="dim must be in"):
        fit_whitening(x, 9)
    with pytest.raises(ValueError, match="dim must be in"):
        fit_whitening(x[:4], 4)  # 4 features span 3 directions
    with pytest.raises(ValueError, match="fit on 8-dim"):
        white(torch.zeros(2, 7))


def test_eval_knn_whiten_fits_on_the_bank_and_records_it(tmp_path):
    from scott.eval import runs
    from scott.eval.features import extract_features

    knn = load_tool("eval_knn")
    out = tmp_path / "white.json"
    argv = ["--pixels", "demo", "--k", "5", "--limit-train", "300", "--limit-test", "80", "--seed", "1",
            "--whiten", "40", "--json", str(out)]
    assert exit_code(knn, argv) == 0
    rec = json.loads(out.read_text())
    assert rec["whiten"] == 40 and (rec["n_train"], rec["n_test"]) == (300, 80)
    recipe = runs.pixel_source("demo").recipe
    bank, queries = runs.eval_datasets(recipe)
    encoder = runs.pixel_source("demo").encoder
    xb, yb = extract_features(encoder, runs.limit_dataset(bank, 300, 1), progress=False)
    xq, yq = extract_features(encoder, runs.limit_dataset(queries, 80, 1), progress=False)
    white = fit_whitening(xb, 40)
    assert rec["k"]["5"]["top1"] == pytest.approx(knn_classify(white(xb), yb, white(xq), yq, k=5)[0])
    plain = knn_classify(xb, yb, xq, yq, k=5)[0]
    assert rec["k"]["5"]["top1"] != pytest.approx(plain)  # the read-out changed what kNN saw
    assert exit_code(knn, ["--pixels", "demo", "--limit-train", "30", "--whiten", "40"]) == 2  # > 29 directions
    assert exit_code(knn, ["--pixels", "demo", "--whiten", "-1"]) == 2


def test_truncate_keeps_the_leading_directions_of_one_fit():
    x = _correlated(seed=6)
    full = fit_whitening(x, 12)
    assert torch.allclose(full.truncate(5)(x), fit_whitening(x, 5)(x), atol=1e-4)
    assert full.truncate(5).dim == 5
    with pytest.raises(ValueError, match="truncate"):
        full.truncate(13)


def test_whitened_knn_chooses_the_dim_on_validation_and_reads_the_queries_once(monkeypatch):
    """The nuisance example: the class lives in the 8th principal direction of 8, so every smaller
    dim drops it; the chosen dim comes from the carved validation split, never from the queries."""
    import scott.eval.whitening as whitening
    from scott.eval.protocol import FeatureSet, carve_validation

    g = torch.Generator().manual_seed(7)
    n = 900
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) * 0.2
    x[:, 0] += 2.0 * y - 1.0
    x[:, 1:8] += 10.0 * torch.randn(n, 7, generator=g)
    train, test = FeatureSet(x[:700], y[:700]), FeatureSet(x[700:], y[700:])
    calls = []
    real = knn_classify
    monkeypatch.setattr("scott.eval.knn.knn_classify", lambda *a, **kw: calls.append(a[2].shape[0]) or real(*a, **kw))
    res = whitening.whitened_knn(train, test, dims=[2, 4, 8, 50], k=10, seed=3)
    fit, val = carve_validation(train, 0.1, 3)
    assert set(res["knn_white_val"]) == {2, 4, 8}  # 50 > the 8 dims the fit part spans
    assert res["knn_white_dim"] == 8 and res["knn_white_val"][8] > 0.95 > 0.7 > res["knn_white_val"][2]
    assert res["knn_white"] > 0.95
    assert calls == [len(val)] * 3 + [len(test)]  # three validation scores, then the queries once
    white = fit_whitening(train.features, 8, seed=3)
    assert res["knn_white"] == pytest.approx(real(white(train.features), train.labels, white(test.features),
                                                  test.labels, k=10)[0])
    with pytest.raises(ValueError, match="no whitening dim"):
        whitening.whitened_knn(train, test, dims=[100])
