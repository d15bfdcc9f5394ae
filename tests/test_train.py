"""Pretraining loop: data order, schedules, run folder, resume equality, NaN guard, CLI errors."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scott import checkpoint as ck
from scott.data import eval_transform_spec
from scott.schedules import lr_at, momentum_at, wd_at
from scott.train import (NonFiniteLossError, ProcessBatches, RunDirError, StepSampler,
                         pretrain)
from train_helpers import tiny_components, tiny_recipe, one_torch_thread  # noqa: F401 (autouse: 1 thread)




def _run(recipe, out, resume=False, **kw):
    return pretrain(recipe, out, resume=resume, components=tiny_components(recipe, **kw))


# ----------------------------------------------------------------------------- sampler
def test_sampler_shards_partition_the_global_batch():
    s = StepSampler(num_samples=50, global_batch=8, num_shards=4, seed=1)
    assert s.steps_per_epoch == 6  # 50 // 8, tail of 2 dropped
    for step in (0, 5, 6, 13):
        shards = [s.shard(step, k) for k in range(4)]
        flat = [i for sh in shards for _, i in sh]
        assert all(len(sh) == 2 for sh in shards)
        assert flat == s.global_indices(step).tolist()
        assert all(e == step // 6 for sh in shards for e, _ in sh)
    # one epoch visits 48 distinct images
    seen = [i for step in range(6) for i in s.global_indices(step).tolist()]
    assert len(set(seen)) == 48
    # epochs use different permutations; the same seed gives the same order
    assert s.permutation(0).tolist() != s.permutation(1).tolist()
    assert StepSampler(50, 8, 4, 1).permutation(3).tolist() == s.permutation(3).tolist()
    assert StepSampler(50, 8, 4, 2).permutation(3).tolist() != s.permutation(3).tolist()


def test_global_batch_is_independent_of_process_layout():
    a = StepSampler(40, 8, num_shards=1, seed=5)
    b = StepSampler(40, 8, num_shards=4, seed=5)  # e.g. 2 processes x 2 accumulation steps
    for step in range(12):
        merged = [p for k in range(4) for p in b.shard(step, k)]
        assert merged == a.shard(step, 0)


def test_process_batches_resume_mid_epoch_skips_exactly_consumed_batches():
    s = StepSampler(40, 8, num_shards=4, seed=0)  # 2 processes x 2 micro-batches
    full = list(ProcessBatches(s, rank=1, accum_steps=2, start_step=0, end_step=9))
    resumed = list(ProcessBatches(s, rank=1, accum_steps=2, start_step=3, end_step=9))
    assert len(full) == 18 and resumed == full[6:]
    # keys (epoch, index, step, shard): the sampler's pairs plus what the mask collator needs
    assert full[0] == [(e, i, 0, 2) for e, i in s.shard(0, 2)]
    assert full[1] == [(e, i, 0, 3) for e, i in s.shard(0, 3)]
    assert {(k[2], k[3]) for k in full[17]} == {(8, 3)}


def test_sampler_rejects_indivisible_batch_and_tiny_dataset():
    with pytest.raises(ValueError, match="divisible"):
        StepSampler(40, 6, num_shards=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(5, 8)


# ----------------------------------------------------------------------------- run folder
def test_run_start_says_when_the_ema_target_will_stay_near_its_init(tmp_path, capsys):
    recipe = tiny_recipe()  # 6 steps at momentum 0.996 -> 1: the target keeps ~99 % of its init
    _run(recipe, tmp_path / "short")
    assert "still keeps 99 % of its initial weights" in capsys.readouterr().out
    fast = tiny_recipe(objective={"ema_start": 0.5, "ema_end": 0.5})  # 0.5 ** 6 = 1.6 %: no note
    _run(fast, tmp_path / "fast")
    assert "initial weights" not in capsys.readouterr().out


def test_run_folder_metrics_schedules_and_exports(tmp_path):
    recipe = tiny_recipe()
    summary = _run(recipe, tmp_path)
    assert summary["steps"] == 6 and summary["start_step"] == 0 and summary["labelled"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in lines] == [0, 0, 0, 0, 1, 1]  # 32 images / batch 8 = 4 steps per epoch
    for r in lines:
        s = r["step"] - 1
        assert r["lr"] == pytest.approx(lr_at(s, 6, 4, recipe["optim"]))
        assert r["wd"] == pytest.approx(wd_at(s, 6, recipe["optim"]))
        assert r["momentum"] == pytest.approx(momentum_at(s, 6, recipe["objective"]))
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["data_wait_s"] >= 0
        # the objective's diagnostics are logged every step (LayerNorm-ed targets: a spread well
        # above the collapse warning's 0.05 and below 1)
        assert 0.1 < r["target_std"] < 1 and r["pred_std"] > 0 and r["target_abs"] > 0
    assert lines[-1]["loss"] == pytest.approx(summary["final_loss"])
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]
    assert any((tmp_path / "tb").iterdir())
    assert (tmp_path / "recipe.yaml").is_file()

    # the exported target encoder is the EMA target of the last checkpoint, with metadata
    state, model_cfg, spec, extra = ck.load_encoder_file(tmp_path / "encoder.safetensors")
    assert model_cfg == recipe["model"] and spec == eval_transform_spec(recipe["model"])
    assert extra["which"] == "target" and extra["step"] == 6
    weights, _ = ck.load_tensors(tmp_path / "checkpoints" / "step_00000006" / "model.safetensors")
    for key, value in state.items():
        assert torch.equal(weights[f"target_encoder.{key}"], value)
    ctx, _, _, extra = ck.load_encoder_file(tmp_path / "context_encoder.safetensors")
    assert extra["which"] == "context"
    for key, value in ctx.items():
        assert torch.equal(weights[f"context_encoder.{key}"], value)
    # the EMA target moved away from its initialisation but is not the context encoder
    assert any(not torch.equal(ctx[k], state[k]) for k in state)


def test_weight_decay_only_on_matrices(tmp_path):
    from scott.train import PretrainRun

    recipe = tiny_recipe()
    run = PretrainRun(recipe, tmp_path, components=tiny_components(recipe))
    run._apply_schedule({"lr": 0.1, "wd": 0.3, "momentum": 0.99})
    for group in run.optimizer.param_groups:
        ndims = {p.ndim for p in group["params"]}
        if group["apply_wd"]:
            assert group["weight_decay"] == 0.3 and min(ndims) >= 2
        else:
            assert group["weight_decay"] == 0.0 and 1 in ndims
        assert group["lr"] == 0.1


def test_fresh_run_refuses_folder_with_checkpoints(tmp_path):
    recipe = tiny_recipe(train={"max_steps": 3})
    _run(recipe, tmp_path)
    with pytest.raises(RunDirError, match="--resume"):
        _run(recipe, tmp_path)


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_output_that_is_or_lies_under_a_file_is_a_run_folder_error(tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    output = blocker if where == "file" else blocker / "run"
    with pytest.raises(RunDirError, match="choose another --output") as info:
        _run(tiny_recipe(train={"max_steps": 2}), output)
    assert str(output) in str(info.value)
    assert blocker.read_text() == "not a folder"  # the file is left as it was


def test_indivisible_global_batch_is_an_error(tmp_path):
    recipe = tiny_recipe(optim={"accum_steps": 2}).to_dict()
    recipe["optim"]["batch_size"] = 9  # scott.config rejects this too; the run checks processes x accum
    with pytest.raises(RunDirError, match="not divisible"):
        _run(recipe, tmp_path)


# ----------------------------------------------------------------------------- resume
def test_resume_from_mid_run_checkpoint_is_bit_identical(tmp_path):
    """Run 7 steps; then drop everything after the step-3 checkpoint and resume: same weights."""
    recipe = tiny_recipe(train={"max_steps": 7, "checkpoint_every": 3}, optim={"accum_steps": 2})
    full = tmp_path / "full"
    _run(recipe, full)
    expected, _ = ck.load_tensors(full / "checkpoints" / "step_00000007" / "model.safetensors")
    expected_metrics = (full / "metrics.jsonl").read_text().splitlines()

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("step_00000006", "step_00000007"):
        shutil.rmtree(cut / "checkpoints" / name)
    (cut / "encoder.safetensors").unlink()
    # a torn later checkpoint must be skipped, not used
    (cut / "checkpoints" / "step_00000006").mkdir()
    summary = _run(recipe, cut, resume=True)
    assert summary["start_step"] == 3

    got, _ = ck.load_tensors(cut / "checkpoints" / "step_00000007" / "model.safetensors")
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # optimiser state too
    a = ck.load_torch_state(full / "checkpoints" / "step_00000007" / "optimizer.pt")
    b = ck.load_torch_state(cut / "checkpoints" / "step_00000007" / "optimizer.pt")
    for pid, st in a["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["state"][pid]["exp_avg_sq"])
    # the metrics log is continued, not duplicated, and the losses match
    resumed = (cut / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in resumed] == list(range(1, 8))
    assert [json.loads(x)["loss"] for x in resumed] == [json.loads(x)["loss"] for x in expected_metrics]


def test_resume_with_only_torn_checkpoints_is_an_error(tmp_path):
    recipe = tiny_recipe(train={"max_steps": 3})
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(ck.CheckpointError, match="none is complete"):
        _run(recipe, tmp_path, resume=True)


def test_resume_without_checkpoints_starts_at_zero(tmp_path):
    recipe = tiny_recipe(train={"max_steps": 2})
    assert _run(recipe, tmp_path, resume=True)["start_step"] == 0


# ----------------------------------------------------------------------------- NaN guard
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    recipe = tiny_recipe(train={"max_steps": 8, "checkpoint_every": 2})
    parts = tiny_components(recipe)
    objective = parts.objective
    calls = {"n": 0}
    original = objective.forward

    def poisoned(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 5 else loss), stats

    objective.forward = poisoned
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        pretrain(recipe, tmp_path, components=parts)
    assert info.value.step == 5
    assert info.value.last_checkpoint.name == "step_00000004"
    assert "step_00000004" in str(info.value)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert ck.find_last_complete(tmp_path).name == "step_00000004"
    weights, _ = ck.load_tensors(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "encoder.safetensors").exists()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- CLI

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "tools" / "pretrain.py")]
TINY_CLI = ["--set", "model.depth=1", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
            "--set", "model.predictor_dim=32", "--set", "model.predictor_depth=1", "--set", "model.hidden_dim=8",
            "--set", "optim.batch_size=16", "--set", "data.num_workers=0", "--no-knn"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_bad_recipe_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    proc = subprocess.run(CLI + [str(bad), "--output", str(tmp_path / "run")], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "did you mean 'lr'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_nan_loss_exits_nonzero_and_keeps_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(CLI + [str(ROOT / "recipes" / "demo.yaml"), "--output", str(out), *TINY_CLI,
                                 "--set", "train.max_steps=8", "--set", "train.checkpoint_every=1",
                                 "--set", "optim.lr=1e30", "--set", "optim.warmup_epochs=0"],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "Traceback" not in proc.stderr
    step = int(proc.stderr.split("at step ")[1].split()[0])
    last = ck.find_last_complete(out)
    assert last is not None and ck.checkpoint_step(last) == step - 1


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """SIGKILL a CLI run at a random moment after its first checkpoint, --resume it, compare bits."""
    args = [str(ROOT / "recipes" / "demo.yaml"), *TINY_CLI, "--set", "train.max_steps=40",
            "--set", "train.checkpoint_every=5", "--set", "train.keep_checkpoints=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.run(CLI + args + ["--output", str(full)], capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    child = subprocess.Popen(CLI + args + ["--output", str(killed)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None:
            if (killed / "checkpoints" / "step_00000005" / "meta.json").exists():
                break
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.8))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "encoder.safetensors").exists()
    start = ck.checkpoint_step(ck.find_last_complete(killed))
    assert 5 <= start < 40

    proc = subprocess.run(CLI + args + ["--output", str(killed), "--resume"], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"step {start} of 40" in proc.stdout

    for name in ("checkpoints/step_00000040/model.safetensors", "encoder.safetensors",
                 "context_encoder.safetensors"):
        a, _ = ck.load_tensors(full / name)
        b, _ = ck.load_tensors(killed / name)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    losses = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x)["loss"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert resumed == losses


# ----------------------------------------------------------------------------- kNN monitor / payoff
@pytest.mark.slow
def test_knn_monitor_and_random_init_report(tmp_path):
    from scott.train import compare_with_random_init

    recipe = tiny_recipe(train={"max_steps": 4, "monitor_every": 1, "monitor_k": 10})
    summary = _run(recipe, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in lines if "knn_top1" in r]
    assert [r["step"] for r in monitored] == [4]  # 4 steps per epoch, every epoch
    top1 = monitored[0]["knn_top1"]
    assert 0.3 < top1 <= 1.0  # 10 classes: far above chance even for a barely trained encoder
    assert summary["knn_top1_monitor"] == top1
    # the exported target encoder reproduces the monitor's number on the same (carved) split
    report = compare_with_random_init(tmp_path, recipe, split="val")
    assert report["pretrained"] == pytest.approx(top1, abs=1e-9)
    assert 0.3 < report["random_init"] <= 1.0 and report["k"] == 10
    assert 0.3 < report["pretrained_context"] <= 1.0
    # raw pixels through the same bank/query rule: 16 px demo images are far above chance too
    assert 0.5 < report["pixels"] <= 1.0 and report["pool"] == "avg"
    # the report leaves the caller's RNG stream where it was
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    compare_with_random_init(tmp_path, recipe, split="val")
    assert torch.equal(torch.rand(3), expected)


def test_library_run_prints_no_summary_and_the_cli_does(tmp_path, capsys):
    _run(tiny_recipe(train={"max_steps": 2}), tmp_path)
    assert "pretraining summary" not in capsys.readouterr().out
    from rich.console import Console

    from scott.run_log import summary_table

    console = Console(width=100, record=True)
    console.print(summary_table({"steps": 2, "final_loss": 0.123456}))
    text = console.export_text()
    assert "pretraining summary" in text and "0.1235" in text


@pytest.mark.slow
def test_two_process_cli_run_matches_one_process_accumulation(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 with ACCELERATE_USE_CPU=1 (gloo on CPU)."""
    args = [str(ROOT / "recipes" / "demo.yaml"), *TINY_CLI, "--set", "train.max_steps=4",
            "--set", "train.checkpoint_every=2"]
    env = _env()
    one = subprocess.run(CLI + args + ["--output", str(tmp_path / "one"), "--set", "optim.accum_steps=2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    env2 = dict(env, ACCELERATE_USE_CPU="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(29600 + random.randrange(300))]
    two = subprocess.run(launch + [str(ROOT / "tools" / "pretrain.py")] + args + ["--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env2, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    last = tmp_path / "two" / "checkpoints" / "step_00000004"
    assert ck.read_meta(last)["num_processes"] == 2
    assert (last / "rng_rank1.pt").is_file()
    a, _ = ck.load_tensors(tmp_path / "one" / "checkpoints" / "step_00000004" / "model.safetensors")
    b, _ = ck.load_tensors(last / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def test_cli_exports_the_encoder_the_recipe_names(tmp_path):
    base = CLI + [str(ROOT / "recipes" / "demo.yaml"), *TINY_CLI, "--set", "train.max_steps=2",
                  "--set", "train.monitor_every=0"]
    bad = subprocess.run(base + ["--output", str(tmp_path / "bad"), "--set", "train.export_encoder=student"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 2 and "train.export_encoder" in bad.stderr and "Traceback" not in bad.stderr
    for which in ("target", "context"):
        out = tmp_path / which
        proc = subprocess.run(base + ["--output", str(out), "--set", f"train.export_encoder={which}"],
                              capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        card = json.loads((out / "export" / "config.json").read_text())["scott"]
        source = "encoder.safetensors" if which == "target" else "context_encoder.safetensors"
        assert card["which"] == which
        exported, _ = ck.load_tensors(out / "export" / "model.safetensors")
        original, _ = ck.load_tensors(out / source)
        key = next(k for k in original if k.endswith("blocks.0.attn.qkv.weight"))
        match = [k for k in exported if k.endswith("blocks.0.attn.qkv.weight")]
        assert match and torch.equal(exported[match[0]], original[key])
