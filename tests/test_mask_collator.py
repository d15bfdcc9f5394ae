"""Masks drawn by the loader's collator: the same masks as the pure (seed, step, shard)
function, with or without worker processes, and the training run is unchanged by it."""
import torch

from scott.mask_collator import MaskCollator, StepItems
from scott.masks import StepMasks, build_mask_generator, masks_for_step
from scott.step_sampler import ProcessBatches, StepSampler
from train_helpers import TinyViews, one_torch_thread  # noqa: F401

GEN = build_mask_generator({"kind": "blockwise", "ratio": 0.5, "min_block": 2}, (4, 4))


def _loader(workers, start=0, accum=2, masks_per_image=1):
    sampler = StepSampler(32, 8, num_shards=accum, seed=7)
    return torch.utils.data.DataLoader(
        StepItems(TinyViews(32)), batch_sampler=ProcessBatches(sampler, 0, accum, start, 6),
        collate_fn=MaskCollator(StepMasks(GEN, masks_per_image), seed=7), num_workers=workers)


def test_collated_masks_are_the_pure_function_of_seed_step_shard():
    for workers in (0, 2):
        batches = list(_loader(workers))
        assert [(b["step"], b["shard"]) for b in batches] == [(s, k) for s in range(6) for k in range(2)]
        for b in batches:
            expected = masks_for_step(GEN, 4, 7, b["step"], b["shard"])
            assert torch.equal(b["masks"].visible, expected.visible)
            assert torch.equal(b["masks"].target, expected.target)
            assert b["views"][0].shape == (4, 1, 16, 16)
    # the views are the dataset's, in the sampler's order
    sampler = StepSampler(32, 8, num_shards=2, seed=7)
    first = next(iter(_loader(0)))
    data = TinyViews(32)
    for row, (e, i) in enumerate(sampler.shard(0, 0)):
        assert torch.equal(first["views"][0][row], data[(e, i)][0])


def test_several_masks_per_image_and_resume_mid_run():
    b = next(iter(_loader(0, masks_per_image=3)))
    assert b["masks"].visible.shape[0] == 12
    assert torch.equal(b["masks"].visible, masks_for_step(GEN, 12, 7, 0, 0).visible)
    resumed = next(iter(_loader(0, start=4)))
    assert (resumed["step"], resumed["shard"]) == (4, 0)
    assert torch.equal(resumed["masks"].visible, masks_for_step(GEN, 4, 7, 4, 0).visible)


def test_a_batch_mixing_steps_is_refused():
    import pytest

    collate = MaskCollator(StepMasks(GEN), seed=0)
    items = StepItems(TinyViews(4))
    with pytest.raises(ValueError, match="mixes steps"):
        collate([items[(0, 0, 1, 0)], items[(0, 1, 2, 0)]])


def test_training_with_loader_workers_equals_training_without(tmp_path):
    from scott import checkpoint as ck
    from scott.train import pretrain
    from train_helpers import tiny_components, tiny_recipe

    weights = []
    for workers in (0, 1):
        recipe = tiny_recipe(data={"num_workers": workers}, train={"max_steps": 3})
        torch.manual_seed(0)
        pretrain(recipe, tmp_path / str(workers), components=tiny_components(recipe))
        weights.append(ck.load_tensors(tmp_path / str(workers) / "checkpoints" / "step_00000003" / "model.safetensors")[0])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
