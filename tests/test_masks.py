"""Mask generators: exact counts, reproducibility, disjointness, batch equalisation."""
import pytest
import torch

from scott.masks import (BlockwiseMask, MaskBatch, MultiblockMask, UniformMask, build_mask_generator,
                         masks_for_step, num_visible_for_ratio, step_generator)

GRID = (14, 14)


def _counts(t):
    return t.flatten(1).sum(1)


@pytest.mark.parametrize("ratio, expected", [(0.6, 78), (0.75, 49), (0.5, 98), (0.4, 118)])
def test_num_visible_for_ratio(ratio, expected):
    assert num_visible_for_ratio(196, ratio) == expected


def test_ratio_out_of_range_rejected():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            num_visible_for_ratio(196, bad)


@pytest.mark.parametrize("kind", ["blockwise", "uniform"])
@pytest.mark.parametrize("grid, ratio", [((14, 14), 0.6), ((7, 7), 0.6), ((8, 4), 0.75), ((14, 14), 0.3)])
def test_exact_visible_count_and_complement_target(kind, grid, ratio):
    gen = build_mask_generator({"kind": kind, "ratio": ratio, "min_block": 16}, grid)
    mb = masks_for_step(gen, 16, seed=3, step=7)
    n = grid[0] * grid[1]
    nv = n - round(ratio * n)
    assert mb.visible.shape == (16, *grid) and mb.visible.dtype == torch.bool
    assert _counts(mb.visible).tolist() == [nv] * 16
    assert torch.equal(mb.target, ~mb.visible)
    assert mb.num_visible == nv


@pytest.mark.parametrize("kind", ["blockwise", "multiblock", "uniform"])
def test_same_seed_same_masks_and_different_seeds_differ(kind):
    gen = build_mask_generator({"kind": kind}, GRID)
    a = masks_for_step(gen, 8, seed=0, step=5, shard=0)
    b = masks_for_step(gen, 8, seed=0, step=5, shard=0)
    assert torch.equal(a.visible, b.visible) and torch.equal(a.target, b.target)
    for other in (masks_for_step(gen, 8, seed=1, step=5, shard=0),
                  masks_for_step(gen, 8, seed=0, step=6, shard=0),
                  masks_for_step(gen, 8, seed=0, step=5, shard=1)):
        assert not torch.equal(a.visible, other.visible)


def test_masks_do_not_touch_global_rng():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    masks_for_step(build_mask_generator({"kind": "blockwise"}, GRID), 4, seed=0, step=0)
    assert torch.equal(torch.rand(3), before)


def test_images_in_a_batch_differ():
    mb = masks_for_step(build_mask_generator({"kind": "blockwise"}, GRID), 8, seed=0, step=0)
    distinct = {tuple(v.flatten().tolist()) for v in mb.visible}
    assert len(distinct) == 8


def test_blockwise_is_blocky():
    """Rectangles make visible patches cluster: far more visible-visible neighbour pairs than
    uniform masks with the same count (uniform: ~40 % of neighbours visible)."""
    def neighbour_agreement(vis):
        v = vis.float()
        pairs = (v[:, 1:, :] * v[:, :-1, :]).sum() + (v[:, :, 1:] * v[:, :, :-1]).sum()
        return float(pairs / v.sum())  # visible neighbours per visible patch (x 1/2)
    block = masks_for_step(build_mask_generator({"kind": "blockwise"}, GRID), 32, 0, 0).visible
    unif = masks_for_step(build_mask_generator({"kind": "uniform"}, GRID), 32, 0, 0).visible
    assert neighbour_agreement(block) > 1.5 * neighbour_agreement(unif)
    assert neighbour_agreement(block) > 1.4  # a solid region has close to 2 pairs per patch


def test_blockwise_uses_blocks_at_least_min_block():
    """With min_block = number of visible patches, the first rectangle already holds them all
    (up to rounding of its sides), so the visible set is (almost) one rectangle."""
    gen = BlockwiseMask((10, 10), ratio=0.64, min_block=36, aspect=(1.0, 1.0))
    for i in range(5):
        vis, _ = gen.sample(step_generator(0, i))
        rows = vis.any(1).nonzero().flatten()
        cols = vis.any(0).nonzero().flatten()
        bbox = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(vis.sum()) == 36
        assert int(bbox) <= 42


def test_multiblock_targets_disjoint_and_equal_visible_count():
    gen = build_mask_generator({"kind": "multiblock"}, GRID)
    for step in range(3):
        mb = masks_for_step(gen, 16, seed=0, step=step)
        assert not (mb.visible & mb.target).any()
        counts = _counts(mb.visible)
        assert (counts == counts[0]).all() and int(counts[0]) >= 4
        # 4 target blocks of 15-20 % each: the union covers between 15 % and 80 % of the grid
        t = _counts(mb.target)
        assert int(t.min()) >= int(0.15 * 196) - 14 and int(t.max()) <= int(0.8 * 196) + 1


def test_multiblock_block_sizes_cover_the_range():
    """Target areas (one block) span [lo, hi] * N, and blocks can touch the last row/column."""
    gen = MultiblockMask(GRID, num_targets=1, target_scale=(0.1, 0.3), target_aspect=(1.0, 1.0),
                         context_scale=(1.0, 1.0))
    areas, last_row, last_col = [], 0, 0
    for i in range(300):
        _, target = gen.sample(step_generator(1, i))
        areas.append(int(target.sum()))
        last_row += bool(target[-1].any())
        last_col += bool(target[:, -1].any())
    # side = round(sqrt(s * 196)) for s in [0.1, 0.3]: 4 (16 patches) ... 8 (64 patches)
    assert min(areas) == 16 and max(areas) == 64
    assert last_row > 20 and last_col > 20


def test_multiblock_scale_and_aspect_independent():
    """In the original I-JEPA code one random number sets both; here they are independent."""
    gen = MultiblockMask((32, 32), num_targets=1, target_scale=(0.05, 0.3), target_aspect=(0.5, 2.0))
    hs, ws = [], []
    for i in range(400):
        _, t = gen.sample(step_generator(2, i))
        hs.append(int(t.any(1).sum()))
        ws.append(int(t.any(0).sum()))
    h, w = torch.tensor(hs, dtype=torch.float64), torch.tensor(ws, dtype=torch.float64)
    area, aspect = (h * w).log(), (h / w).log()
    corr = torch.corrcoef(torch.stack([area, aspect]))[0, 1]
    assert abs(float(corr)) < 0.15


def test_multiblock_visible_inside_context_scale():
    gen = MultiblockMask(GRID, num_targets=1, target_scale=(0.01, 0.01), context_scale=(0.25, 0.25))
    vis, target = gen.sample(step_generator(0, 0))
    # context block 7x7 = 49 patches, the 1-2 patch target removed from it
    assert 47 <= int(vis.sum()) <= 49
    rows = vis.any(1).nonzero().flatten()
    assert int(rows.max() - rows.min()) + 1 <= 7


def test_unknown_kind_and_keys_are_checked_by_the_schema():
    with pytest.raises(ValueError, match="mask.kind: expected one of 'blockwise', 'multiblock', 'uniform'"):
        build_mask_generator({"kind": "random"}, GRID)
    with pytest.raises(ValueError, match="unknown key 'mask.ration'; did you mean 'ratio'"):
        build_mask_generator({"ration": 0.5}, GRID)
    # a partial section takes the schema's defaults, never a second set
    from scott.config import SCHEMA

    gen = build_mask_generator({}, GRID)
    assert gen.ratio == SCHEMA["mask"]["ratio"].default and gen.min_block == SCHEMA["mask"]["min_block"].default


def test_mask_batch_validates():
    v = torch.zeros(2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError):
        MaskBatch(v, torch.zeros(2, 3, 4, dtype=torch.bool))
    assert MaskBatch(v, ~v).to("cpu").target.all()


def test_uniform_fraction_per_position_is_balanced():
    gen = UniformMask((4, 4), ratio=0.5)
    mb = gen.batch(2000, step_generator(0, 0))
    freq = mb.visible.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.05)


# sha256 (first 16 hex digits) of the masks of steps 0-39 (batch 8, seed 3, shard = step % 3),
# recorded from the torch formulation of the generators before they moved to numpy grids: the
# stream of every recipe's masks must not change under a refactor (resumed and rerun recipes
# mean the same masks).
MASK_FINGERPRINTS = {
    "blockwise 7x7 0.6": ((7, 7), {"kind": "blockwise", "ratio": 0.6, "min_block": 4}, "53631a7a19e57570"),
    "blockwise 14x14 0.4": ((14, 14), {"kind": "blockwise", "ratio": 0.4, "min_block": 40}, "e636f0e03b707bbe"),
    "blockwise 4x6": ((4, 6), {"kind": "blockwise", "ratio": 0.5, "min_block": 2, "aspect": [0.5, 2]}, "ebc76b040cfc8747"),
    "multiblock 14x14": ((14, 14), {"kind": "multiblock"}, "e84952fbdb0be993"),
    "multiblock 5x5 crowded": ((5, 5), {"kind": "multiblock", "num_targets": 6, "target_scale": [0.3, 0.5],
                                        "context_scale": [0.4, 0.6]}, "22cdf9097f0ad16c"),
    "uniform 7x7": ((7, 7), {"kind": "uniform", "ratio": 0.6}, "9e3ed24e344d065f"),
}


@pytest.mark.parametrize("name", sorted(MASK_FINGERPRINTS))
def test_mask_stream_is_pinned(name):
    import hashlib
    grid, cfg, expected = MASK_FINGERPRINTS[name]
    gen = build_mask_generator(cfg, grid)
    h = hashlib.sha256()
    for step in range(40):
        mb = masks_for_step(gen, 8, 3, step, step % 3)
        h.update(mb.visible.numpy().tobytes())
        h.update(mb.target.numpy().tobytes())
    assert h.hexdigest()[:16] == expected


def test_sample_returns_torch_bool_grids():
    for cfg in ({"kind": "blockwise"}, {"kind": "multiblock"}, {"kind": "uniform"}):
        visible, target = build_mask_generator(cfg, (7, 7)).sample(torch.Generator().manual_seed(1))
        assert isinstance(visible, torch.Tensor) and visible.dtype == torch.bool and visible.shape == (7, 7)
        assert isinstance(target, torch.Tensor) and target.dtype == torch.bool
        assert not (visible & target).any()
