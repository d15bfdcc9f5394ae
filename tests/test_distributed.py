"""Multi-process (CPU, gloo) training equals single-process training on the same global batch."""

from __future__ import annotations

import socket
import tempfile

import torch

from scott import checkpoint as ck
from scott.train import PretrainRun
from train_helpers import tiny_components, tiny_recipe

GLOBAL_BATCH = 8


def _one_step(recipe, out_dir, accelerator=None) -> tuple[dict, dict]:
    """Gradients after the backward of step 0 and parameters after its optimiser step (float64)."""
    torch.set_num_threads(1)
    run = PretrainRun(recipe, out_dir, accelerator=accelerator, components=tiny_components(recipe, dtype=torch.float64))
    sched = run.schedule(0)
    run._apply_schedule(sched)
    loss, _ = run.accumulate_gradients(0, run.make_loader(0))
    grads = {n: p.grad.detach().clone() for n, p in run.objective.named_parameters() if p.grad is not None}
    run.optimizer_step(0, loss, sched["momentum"])
    params = {n: p.detach().clone() for n, p in run.objective.named_parameters()}
    return grads, params


def _worker(out_dir):
    """Body of each of the 2 processes started by :func:`_launch_cpu`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # forked from pytest: forget its single-process state
    acc = Accelerator()
    assert acc.num_processes == 2
    recipe = tiny_recipe(optim={"batch_size": GLOBAL_BATCH, "accum_steps": 1})
    grads, params = _one_step(recipe, f"{out_dir}/run2", acc)
    if acc.is_main_process:
        ck.save_tensors(f"{out_dir}/grads.safetensors", grads)
        ck.save_tensors(f"{out_dir}/params.safetensors", params)
    acc.wait_for_everyone()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_cpu(fn, args, num_processes: int) -> None:
    """accelerate.debug_launcher with a free port (its fixed 29500 collides with parallel runs)."""
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with tempfile.NamedTemporaryFile() as rdv, patch_environment(
            world_size=num_processes, master_addr="127.0.0.1", master_port=str(_free_port()),
            accelerate_mixed_precision="no", accelerate_debug_rdv_file=rdv.name, accelerate_use_cpu="yes",
            gloo_socket_ifname="lo"):
        start_processes(PrepareForLaunch(fn, debug=True), args=args, nprocs=num_processes, start_method="fork")


def test_two_processes_match_one_process_with_accumulation(tmp_path):
    from accelerate.state import AcceleratorState

    tiny_components(tiny_recipe())  # warm lazy imports (e.g. backend probing) once, before forking
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before forking: the workers inherit one intra-op thread each
    try:
        _launch_cpu(_worker, (str(tmp_path),), num_processes=2)
    finally:
        torch.set_num_threads(threads)
    grads2, _ = ck.load_tensors(tmp_path / "grads.safetensors")
    params2, _ = ck.load_tensors(tmp_path / "params.safetensors")

    # one process, same global batch of 8 split into 2 accumulated micro-batches of 4
    AcceleratorState._reset_state(True)
    recipe = tiny_recipe(optim={"batch_size": GLOBAL_BATCH, "accum_steps": 2})
    grads1, params1 = _one_step(recipe, tmp_path / "run1")
    assert set(grads1) == set(grads2) and len(grads1) > 10
    worst = max((grads1[k] - grads2[k]).abs().max().item() for k in grads1)
    scale = max(grads1[k].abs().max().item() for k in grads1)
    assert scale > 1e-4          # real gradients, not zeros
    assert worst < 1e-10, worst  # float64: identical up to summation order
    worst_p = max((params1[k] - params2[k]).abs().max().item() for k in params1)
    assert worst_p < 1e-10, worst_p

    # and the check can fail: one process on only the first micro-batch gives other gradients
    AcceleratorState._reset_state(True)
    half = tiny_recipe(optim={"batch_size": GLOBAL_BATCH // 2, "accum_steps": 1})
    grads_half, _ = _one_step(half, tmp_path / "run_half")
    assert max((grads_half[k] - grads2[k]).abs().max().item() for k in grads1) > 1e-6
