"""EMA update math on a tiny module."""
import pytest
import torch
import torch.nn as nn

from scott.ema import update_ema


def _pair():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(1.0)
        for p in target.parameters():
            p.fill_(3.0)
    online[1].running_mean.fill_(7.0)
    return target, online


@pytest.mark.parametrize("m, expected", [(0.0, 1.0), (1.0, 3.0), (0.5, 2.0), (0.75, 2.5)])
def test_update_values(m, expected):
    target, online = _pair()
    update_ema(target, online, m)
    for p in target.parameters():
        assert torch.allclose(p, torch.full_like(p, expected))
    for p in online.parameters():          # online untouched
        assert torch.allclose(p, torch.ones_like(p))
    assert torch.allclose(target[1].running_mean, torch.full((2,), 7.0))  # buffers copied


def test_repeated_updates_converge_geometrically():
    target, online = _pair()
    for _ in range(3):
        update_ema(target, online, 0.5)
    # distance 2 halves each step: 1 + 2 / 8
    assert torch.allclose(target[0].weight, torch.full((2, 3), 1.25))


def test_no_grad_and_rejects_bad_inputs():
    target, online = _pair()
    out = online[0](torch.ones(1, 3)).sum()
    update_ema(target, online, 0.3)
    assert not any(p.grad_fn is not None for p in target.parameters())
    out.backward()                          # online graph still valid
    with pytest.raises(ValueError):
        update_ema(target, online, 1.5)
    with pytest.raises(ValueError):
        update_ema(nn.Linear(3, 2), online, 0.5)
