"""Schedules: values at known steps and monotonic pieces."""
import math

import pytest

from scott.schedules import linear_at, lr_at, momentum_at, warmup_steps, wd_at

OPT = {"lr": 5e-4, "start_lr": 1e-6, "min_lr": 1e-5, "warmup_epochs": 4, "flat_fraction": 0.5,
       "weight_decay": 0.04, "weight_decay_end": 0.4}
SPE = 10          # steps per epoch
TOTAL = 240       # warm-up 40 steps, flat 100, cosine 100


def test_lr_known_points():
    assert lr_at(0, TOTAL, SPE, OPT) == pytest.approx(1e-6)
    assert lr_at(20, TOTAL, SPE, OPT) == pytest.approx(1e-6 + (5e-4 - 1e-6) / 2)
    assert lr_at(40, TOTAL, SPE, OPT) == pytest.approx(5e-4)        # end of warm-up
    assert lr_at(139, TOTAL, SPE, OPT) == pytest.approx(5e-4)       # last flat step
    assert lr_at(140, TOTAL, SPE, OPT) == pytest.approx(5e-4)       # cosine starts at the peak
    t = 33  # cosine phase: 100 steps, progress t / 99
    assert lr_at(140 + t, TOTAL, SPE, OPT) == pytest.approx(1e-5 + (5e-4 - 1e-5) * (1 + math.cos(math.pi / 3)) / 2)
    assert lr_at(TOTAL - 1, TOTAL, SPE, OPT) == pytest.approx(1e-5)  # ends at min_lr
    assert lr_at(TOTAL + 50, TOTAL, SPE, OPT) == pytest.approx(1e-5)


def test_lr_monotonic_pieces():
    lrs = [lr_at(s, TOTAL, SPE, OPT) for s in range(TOTAL)]
    warm, flat, cos = lrs[:41], lrs[40:140], lrs[140:]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert len(set(flat)) == 1
    assert all(b < a for a, b in zip(cos, cos[1:]))
    assert max(lrs) == pytest.approx(5e-4) and min(lrs) == pytest.approx(1e-6)


def test_lr_cosine_shape():
    # a quarter into the cosine: min + (peak - min) * (1 + cos(pi/4)) / 2
    opt = dict(OPT, flat_fraction=0.0, warmup_epochs=0)
    q = lr_at(25, 101, SPE, opt)
    assert q == pytest.approx(1e-5 + (5e-4 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)


def test_run_shorter_than_warmup():
    opt = dict(OPT, warmup_epochs=100)            # 1000 warm-up steps, run of 50
    assert warmup_steps(50, SPE, 100) == 50
    lrs = [lr_at(s, 50, SPE, opt) for s in range(50)]
    assert lrs[0] == pytest.approx(1e-6)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] < 5e-4 and all(math.isfinite(x) for x in lrs)


def test_tiny_runs_are_finite():
    for total in (0, 1, 2, 3):
        for s in range(max(total, 1)):
            assert math.isfinite(lr_at(s, total, SPE, OPT))
            assert math.isfinite(wd_at(s, total, OPT))
    assert lr_at(0, 1, 1, dict(OPT, warmup_epochs=0)) == pytest.approx(1e-5)


def test_weight_decay_linear():
    assert wd_at(0, 101, OPT) == pytest.approx(0.04)
    assert wd_at(50, 101, OPT) == pytest.approx(0.22)
    assert wd_at(100, 101, OPT) == pytest.approx(0.4)
    assert wd_at(500, 101, OPT) == pytest.approx(0.4)


def test_momentum_linear():
    cfg = {"ema_start": 0.996, "ema_end": 1.0}
    assert momentum_at(0, 1001, cfg) == pytest.approx(0.996)
    assert momentum_at(500, 1001, cfg) == pytest.approx(0.998)
    assert momentum_at(1000, 1001, cfg) == pytest.approx(1.0)
    ms = [momentum_at(s, 1001, cfg) for s in range(0, 1001, 100)]
    assert all(b > a for a, b in zip(ms, ms[1:]))


def test_linear_at_clamps():
    assert linear_at(-5, 10, 1.0, 2.0) == 1.0
    assert linear_at(9, 10, 1.0, 2.0) == 2.0
    assert linear_at(0, 1, 1.0, 2.0) == 2.0


def test_ema_initial_share_matches_the_product_of_momenta():
    from scott.schedules import ema_initial_share

    # constant momentum m over T updates leaves exactly m**T of the initial weights
    assert ema_initial_share(100, {"ema_start": 0.99, "ema_end": 0.99}) == pytest.approx(0.99 ** 100)
    # the default linear 0.996 -> 1 schedule: the demo's old 234-step run kept ~63 %, 1,560 steps ~4 %
    cfg = {"ema_start": 0.996, "ema_end": 1.0}
    assert ema_initial_share(234, cfg) == pytest.approx(0.627, abs=0.005)
    assert ema_initial_share(1560, cfg) == pytest.approx(0.044, abs=0.002)
    # a resumed run only counts the updates still to come
    first_half = math.prod(momentum_at(s, 200, cfg) for s in range(100))
    assert ema_initial_share(200, cfg, start_step=100) == pytest.approx(ema_initial_share(200, cfg) / first_half)
    # momentum 1 never moves the target, momentum 0 copies the online weights
    assert ema_initial_share(50, {"ema_start": 1.0, "ema_end": 1.0}) == 1.0
    assert ema_initial_share(10, {"ema_start": 0.0, "ema_end": 0.0}) == 0.0


def test_warmup_cosine_is_the_one_curve():
    from scott.schedules import warmup_cosine

    # warm-up 0.1 -> 1 over 4 steps, flat 2 steps, cosine over the remaining 5 steps to 0.5
    values = [warmup_cosine(s, 11, 1.0, warmup=4, start=0.1, floor=0.5, flat=2) for s in range(12)]
    assert values[:4] == pytest.approx([0.1, 0.325, 0.55, 0.775])
    assert values[4:7] == pytest.approx([1.0, 1.0, 1.0])
    assert values[7] == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 4)))
    assert values[10:] == pytest.approx([0.5, 0.5])
    # lr_at is that curve with the recipe's keys
    from scott.schedules import lr_at
    for s in range(TOTAL):
        assert lr_at(s, TOTAL, SPE, OPT) == warmup_cosine(s, TOTAL, 5e-4, 40, 1e-6, 1e-5, 100)


def test_recipe_schedules_need_complete_sections():
    """No second set of defaults: a partial section is an error, not another schedule."""
    with pytest.raises(KeyError):
        lr_at(0, 10, 1, {"lr": 1e-3})
    with pytest.raises(KeyError):
        momentum_at(0, 10, {})
