"""benchmarks/tokenizer.py: which stack --recipe measures, and what auto picks on it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from scott.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tokenizer", ROOT / "benchmarks" / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_option_reads_the_recipes_tokenizer():
    bench = _bench()
    assert bench.stack_from_recipe(str(ROOT / "recipes" / "fashion_mnist_cpu.yaml")) == {
        "tokenizer": "small", "img_size": 28, "patch_size": 4, "embed_dim": 128, "in_chans": 1, "hidden_dim": 32}
    assert bench.stack_from_recipe(str(ROOT / "recipes" / "flowers.yaml")) == bench.PAPER


def test_measure_times_every_backend_on_the_recipes_shapes_and_reports_autos_pick():
    bench = _bench()
    stack = {"tokenizer": "small", "img_size": 16, "patch_size": 4, "embed_dim": 8, "in_chans": 1, "hidden_dim": 4}
    tok = Tokenizer(embed_dim=8, patch_size=4, in_chans=1, stack="small", hidden_dim=4)
    ms, pick = bench.measure(2, 0.4, 1, torch.device("cpu"), tok, stack)
    assert set(ms) == {"dense NCHW", "dense CL", "tiles", "auto"} and all(v > 0 for v in ms.values())
    assert pick == "tiles"  # 40 % visible on a CPU
    assert bench.measure(2, 1.0, 1, torch.device("cpu"), tok, stack)[1] == "dense"
