"""SIGTERM / Ctrl-C: finish the step, checkpoint, say how to resume, exit non-zero; exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scott import checkpoint as ck
from scott.interrupt import TrainingInterrupted
from scott.train import pretrain
from train_helpers import tiny_components, tiny_recipe, one_torch_thread  # noqa: F401 (autouse: 1 thread)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = dict(train={"max_steps": 8, "checkpoint_every": 3, "keep_checkpoints": 5})




def components(recipe, signal_at_step=None, signals=()):
    """tiny_components whose mask function sends ``signals`` to this process during a step."""
    torch.manual_seed(0)
    parts = tiny_components(recipe)
    if signal_at_step is None:
        return parts
    inner = parts.mask_fn

    def mask_fn(batch, seed, step, shard):
        if step == signal_at_step and shard == 0:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return inner(batch, seed, step, shard)

    return dataclasses.replace(parts, mask_fn=mask_fn)


def model_of(run, step):
    return ck.load_tensors(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")[0]


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_bit_identically(tmp_path, sig):
    recipe = tiny_recipe(**RECIPE)
    full = tmp_path / "full"
    pretrain(recipe, full, components=components(recipe))

    run = tmp_path / "run"
    before = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted) as info:
        pretrain(recipe, run, components=components(recipe, signal_at_step=4, signals=[sig]))
    exc = info.value
    assert exc.step == 5 and exc.exit_status == 128 + sig  # the step in progress (5) was finished
    assert exc.checkpoint == run / "checkpoints" / "step_00000005"
    assert str(exc.checkpoint) in str(exc) and signal.Signals(sig).name in str(exc)
    assert ck.find_last_complete(run) == exc.checkpoint
    assert not (run / "encoder.safetensors").exists()
    assert signal.getsignal(sig) is before  # handlers restored

    summary = pretrain(recipe, run, resume=True, components=components(recipe))
    assert summary["start_step"] == 5
    a, b = model_of(full, 8), model_of(run, 8)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(run) == losses(full)


def test_second_ctrl_c_quits_at_once(tmp_path):
    recipe = tiny_recipe(**RECIPE)
    # Python's own Ctrl-C handler, whatever this test process inherited (a job started in the
    # background of a shell inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(recipe, tmp_path, components=components(recipe, signal_at_step=4,
                                                             signals=[signal.SIGINT, signal.SIGINT]))
        assert ck.find_last_complete(tmp_path) == tmp_path / "checkpoints" / "step_00000003"  # no new checkpoint
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    finally:
        signal.signal(signal.SIGINT, inherited)


# ----------------------------------------------------------------------------- CLI, 1 and 2 processes
CLI_ARGS = [str(ROOT / "recipes" / "demo.yaml"), "--set", "model.depth=1", "--set", "model.embed_dim=32",
            "--set", "model.num_heads=2", "--set", "model.predictor_dim=32", "--set", "model.predictor_depth=1",
            "--set", "model.hidden_dim=8", "--set", "optim.batch_size=16", "--set", "train.max_steps=40",
            "--set", "train.checkpoint_every=7", "--set", "train.keep_checkpoints=2", "--no-knn"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, str(ROOT / "tools" / "pretrain.py")]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(29600 + random.randrange(300)), str(ROOT / "tools" / "pretrain.py")]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_cli_sigterm_then_resume_matches_uninterrupted_run(tmp_path, processes):
    env = _env(ACCELERATE_USE_CPU="1") if processes > 1 else _env()
    workers = ["--set", "data.num_workers=1"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    proc = subprocess.run(_launcher(processes) + CLI_ARGS + workers + ["--output", str(full)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    child = subprocess.Popen(_launcher(processes) + CLI_ARGS + workers + ["--output", str(stopped)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)  # its own process group, like a scheduler's job
    try:
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None:
            if (stopped / "checkpoints" / "step_00000007" / "meta.json").exists():
                break
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.5))
        os.killpg(child.pid, signal.SIGTERM)  # every process of the job, as schedulers do
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode != 0, "the run finished before it could be stopped"
    if processes == 1:
        assert child.returncode == 128 + signal.SIGTERM
        assert "Traceback" not in err, err[-3000:]
    # (with 2 processes the torch elastic launcher, which gets the SIGTERM too, prints its own
    # SignalException traceback after our processes exited; our processes print one line)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "SIGTERM received" in lines[0] and "--resume" in lines[0] and str(stopped / "checkpoints") in lines[0]
    last = ck.find_last_complete(stopped)
    step = ck.checkpoint_step(last)
    assert 7 <= step < 40 and f"stopped after step {step} of 40" in lines[0]
    assert not (stopped / "encoder.safetensors").exists()

    proc = subprocess.run(_launcher(processes) + CLI_ARGS + workers + ["--output", str(stopped), "--resume"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step {step} of 40" in proc.stdout
    for name in ("checkpoints/step_00000040/model.safetensors", "encoder.safetensors",
                 "context_encoder.safetensors"):
        a, _ = ck.load_tensors(full / name)
        b, _ = ck.load_tensors(stopped / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert losses(stopped) == losses(full)
