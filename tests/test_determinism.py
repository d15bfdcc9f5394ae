"""train.deterministic: backend choice under deterministic algorithms, and a CPU run unchanged by it."""
import pytest
import torch

from scott.tokenizer.module import DENSE_ABOVE, backend_available, choose_backend

from train_helpers import tiny_components, tiny_recipe


def test_auto_backend_choice():
    sparse = "spconv" if backend_available("spconv")[0] else "tiles"
    assert choose_backend("auto", "cpu", None) == "dense"                   # full images
    assert choose_backend("auto", "cpu", DENSE_ABOVE + 0.1) == "dense"      # almost full
    assert choose_backend("auto", "cpu", 0.4) == "tiles"
    assert choose_backend("auto", "cuda", 0.4) == sparse
    assert choose_backend("auto", "cuda", 0.4, deterministic=True) == "dense"
    assert choose_backend("auto", "cpu", 0.4, deterministic=True) == "tiles"   # CPU tiles are exact
    assert choose_backend("tiles", "cpu", 0.4, deterministic=True) == "tiles"
    for name in ("spconv", "tiles"):
        with pytest.raises(RuntimeError, match="not deterministic on CUDA"):
            choose_backend(name, "cuda", 0.4, deterministic=True)
    assert choose_backend("dense", "cuda", 0.4, deterministic=True) == "dense"


def test_deterministic_run_on_cpu_matches_the_default_run(tmp_path):
    from scott.checkpoint import load_tensors
    from scott.train import pretrain

    results = {}
    try:
        for flag in (False, True):
            recipe = tiny_recipe(train={"max_steps": 3, "deterministic": flag})
            torch.manual_seed(0)  # tiny_components builds the objective from the global RNG
            summary = pretrain(recipe, tmp_path / str(flag), components=tiny_components(recipe))
            results[flag], _ = load_tensors(tmp_path / str(flag) / "checkpoints" / "step_00000003" / "model.safetensors")
            assert torch.are_deterministic_algorithms_enabled() == flag
            assert summary["steps"] == 3
    finally:
        torch.use_deterministic_algorithms(False)
    assert results[False].keys() == results[True].keys()
    assert all(torch.equal(results[False][k], results[True][k]) for k in results[False])
