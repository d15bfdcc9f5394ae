"""Weighted kNN (DINO) on hand-built feature sets with answers computed by hand."""

import math

import pytest
import torch

from scott.eval.knn import knn_classify, knn_classify_many, knn_predict, topk_accuracy

# Four training points in 2-D (not normalised on purpose: kNN must L2-normalise them).
#   a = (2, 0)  label 0     unit (1, 0)
#   b = (0, 3)  label 1     unit (0, 1)
#   c = (1, 1)  label 1     unit (1/sqrt2, 1/sqrt2)
#   d = (-1, 0) label 2     unit (-1, 0)
TRAIN = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 2])
# Query q = (8, 6) -> unit (0.8, 0.6). Cosines: a 0.8, b 0.6, c 1.4/sqrt2 = 0.98995, d -0.8.
Q = torch.tensor([[8.0, 6.0]])
COS_A, COS_B, COS_C = 0.8, 0.6, 1.4 / math.sqrt(2)


def test_scores_match_hand_computation_k3_t1():
    scores = knn_predict(TRAIN, LABELS, Q, k=3, temperature=1.0)
    # neighbours c (label 1), a (label 0), b (label 1); d is 4th and excluded
    expected = torch.tensor([[math.exp(COS_A), math.exp(COS_C) + math.exp(COS_B), 0.0]])
    assert scores.shape == (1, 3)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_scores_temperature_and_k2():
    scores = knn_predict(TRAIN, LABELS, Q, k=2, temperature=0.5)
    expected = torch.tensor([[math.exp(COS_A / 0.5), math.exp(COS_C / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_vote_weighting_changes_decision():
    # Train: one very close class-0 point, two far-ish class-1 points.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    # cosines: 1.0 (label 0), 0.6, 0.6 (label 1)
    # T=0.07: exp(1/0.07)=1.6e6 vs 2*exp(0.6/0.07)=1.0e4 -> class 0
    # T=1:    e^1=2.718 vs 2*e^0.6=3.644              -> class 1
    assert knn_classify(train, labels, q, torch.tensor([0]), k=3, temperature=0.07)[0] == 1.0
    assert knn_classify(train, labels, q, torch.tensor([0]), k=3, temperature=1.0)[0] == 0.0


def test_top1_top5_on_clusters():
    # Two queries near class 0 and class 2, one query labelled 1 but sitting at class 0.
    queries = torch.tensor([[1.0, 0.1], [-1.0, 0.05], [1.0, -0.1]])
    qlabels = torch.tensor([0, 2, 1])
    top1, top5 = knn_classify(TRAIN, LABELS, queries, qlabels, k=1)
    assert top1 == pytest.approx(2 / 3)
    assert top5 == 1.0  # only 3 classes: top-5 contains every class


def test_k_larger_than_train_is_clamped_with_warning():
    with pytest.warns(UserWarning, match="exceeds"):
        big = knn_predict(TRAIN, LABELS, Q, k=200, temperature=1.0)
    full = knn_predict(TRAIN, LABELS, Q, k=4, temperature=1.0)
    torch.testing.assert_close(big, full)
    # class 2 gets d's vote: exp(-0.8)
    assert big[0, 2].item() == pytest.approx(math.exp(-0.8), rel=1e-5)


def test_many_k_matches_single_k_and_batches():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=gen)
    labels = torch.randint(0, 6, (50,), generator=gen)
    test = torch.randn(7, 8, generator=gen)
    tlabels = torch.randint(0, 6, (7,), generator=gen)
    many = knn_classify_many(train, labels, test, tlabels, ks=[1, 5, 20], batch_size=3)
    for k in (1, 5, 20):
        assert many[k] == knn_classify(train, labels, test, tlabels, k=k, batch_size=100)
    # k=1 on the training set itself is perfect
    assert knn_classify(train, labels, train, labels, k=1) == (1.0, 1.0)


def test_num_classes_from_train_labels_and_explicit():
    scores = knn_predict(TRAIN, LABELS, Q, k=1)
    assert scores.shape[1] == 3
    assert knn_predict(TRAIN, LABELS, Q, k=1, num_classes=10).shape[1] == 10
    with pytest.raises(ValueError):
        knn_predict(TRAIN, LABELS, Q, k=1, num_classes=2)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    labels = torch.tensor([2, 0])
    top1, top2, top5 = topk_accuracy(scores, labels, (1, 2, 5))
    assert (top1, top2, top5) == (0.5, 1.0, 1.0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        knn_predict(TRAIN, LABELS, torch.zeros(1, 3), k=1)
    with pytest.raises(ValueError):
        knn_predict(TRAIN, LABELS[:2], Q, k=1)
    with pytest.raises(ValueError):
        knn_predict(TRAIN, LABELS, Q, k=0)
