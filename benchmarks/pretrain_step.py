"""Images/s of one MIM-JEPA training step: the paper's compute path vs ours, side by side.

    python benchmarks/pretrain_step.py                       # 224 px, ViT-S/16, batch 8
    python benchmarks/pretrain_step.py --depth 2 --reps 3    # quick, smaller check
    python benchmarks/pretrain_step.py --profile             # also: top ops of one step each
    OMP_WAIT_POLICY=PASSIVE python benchmarks/pretrain_step.py   # on a loaded, shared machine

One step = forward (context encoder on the masked view, predictor, EMA target encoder on the
full view, loss on the target patches) + backward + AdamW step + EMA update of the target.
Both paths are built from ``recipes/flowers.yaml`` through the library (``load_recipe``,
``build_objective``, ``build_mask_generator`` / ``masks_for_step``, ``param_groups``,
``update_target``) with the same weights, images and masks:

* paper:  ``model.backend=dense``, ``model.context_tokens=all`` (SparK-style dense masked
  tokenizer; the context encoder runs all N positions, masked ones as mask tokens);
* ours:   ``model.backend=auto``, ``model.context_tokens=visible`` (sparse tokenizer on the
  visible patches only; the context encoder runs only the visible tokens).

The two paths alternate within every repetition (who goes first rotates), after one warm-up
step each (``--warmup``); the median is reported. The FLOP-based expectation counts multiply-adds of the
matrix products (tokenizer convolutions, transformer linears and attention) with backward =
2x forward; the sparse tokenizer is counted at the visible fraction (halos ignored), so it is
an upper bound for the speed-up. The last line is the headline ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from scott.config import load_recipe
from scott.masks import build_mask_generator, masks_for_step
from scott.objectives import build_objective

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "flowers.yaml"
PATHS = {  # name -> (model.backend, model.context_tokens)
    "paper": ("dense", "all"),
    "ours": ("auto", "visible"),
}
EMA_MOMENTUM = 0.996


# ----------------------------------------------------------------------------- FLOP model
def _block_macs(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Multiply-adds of one pre-norm transformer block's forward on ``tokens`` tokens."""
    linears = tokens * dim * dim * (4 + 2 * mlp_ratio)  # qkv + proj + fc1 + fc2
    attention = 2 * tokens * tokens * dim  # q k^T and attn v
    return linears + attention


def _tokenizer_macs(model: dict) -> float:
    """Multiply-adds of the dense ``scott`` stack's forward for one image (two 7x7 stride-2 convs)."""
    s, c, h, d = model["img_size"], model["in_chans"], model["hidden_dim"], model["embed_dim"]
    return (s // 2) ** 2 * h * c * 49 + (s // 8) ** 2 * d * h * 49


def expected_macs(model: dict, num_visible: int, sparse: bool, visible_tokens: bool) -> float:
    """Multiply-adds of one training step per image (fwd + 2x for bwd of trainable parts)."""
    n = (model["img_size"] // model["patch_size"]) ** 2
    d, r = model["embed_dim"], model["mlp_ratio"]
    tok = _tokenizer_macs(model)
    ctx_tok = tok * (num_visible / n if sparse else 1.0)
    ctx_blocks = model["depth"] * _block_macs(num_visible if visible_tokens else n, d, r)
    pd = model["predictor_dim"] or d
    pred = model["predictor_depth"] * _block_macs(n, pd, r)  # both paths: N positions
    target = tok + model["depth"] * _block_macs(n, d, r)  # forward only, full image
    return 3 * (ctx_tok + ctx_blocks + pred) + target


# ----------------------------------------------------------------------------- measurement
def build_path(backend: str, context_tokens: str, overrides: list[str]):
    """``(recipe, objective, optimiser)`` for one compute path."""
    recipe = load_recipe(RECIPE, overrides=[*overrides, f"model.backend={backend}",
                                            f"model.context_tokens={context_tokens}"],
                         check_data=False)
    objective = build_objective(recipe).train()
    opt = torch.optim.AdamW(objective.param_groups(recipe["optim"]["weight_decay"]),
                            lr=recipe["optim"]["lr"], betas=tuple(recipe["optim"]["betas"]))
    return recipe, objective, opt


def train_step(objective, opt, images_ctx, images_tgt, masks) -> float:
    """One full training step; returns wall ms."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss, _ = objective(images_ctx, images_tgt, masks)
    loss.backward()
    opt.step()
    objective.update_target(EMA_MOMENTUM)
    return (time.perf_counter() - start) * 1e3


def profile_step(console: Console, name: str, objective, opt, batch, rows: int = 12) -> None:
    """Print the ops that take the most CPU time in one step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(objective, opt, *batch)
    console.print(f"[bold]profile: {name}[/bold]")
    console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--depth", type=int, default=12, help="encoder depth (12 = ViT-S)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="profile one extra step of each path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=140)
    load_start = os.getloadavg()
    overrides = [f"model.img_size={args.img_size}", f"model.depth={args.depth}",
                 "model.embed_dim=384", "model.num_heads=6", "model.predictor_depth=3",
                 "mask.kind=blockwise", "mask.ratio=0.6", f"optim.batch_size={args.batch}",
                 f"train.seed={args.seed}"]

    built = {}
    for name, (backend, ctx) in PATHS.items():
        torch.manual_seed(args.seed)
        built[name] = build_path(backend, ctx, overrides)
    recipe, first, _ = built["paper"]
    for _, objective, _ in built.values():  # same weights everywhere
        objective.load_state_dict(first.state_dict())
    model = recipe["model"]
    grid = (model["img_size"] // model["patch_size"],) * 2
    mask_gen = build_mask_generator(recipe["mask"], grid)

    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, model["in_chans"], model["img_size"], model["img_size"])
    images_ctx = torch.randn(shape, generator=gen)
    images_tgt = images_ctx + 0.1 * torch.randn(shape, generator=gen)  # the jittered view
    masks = [masks_for_step(mask_gen, args.batch, args.seed, step) for step in range(args.reps + 1)]
    num_visible = masks[0].num_visible

    console.print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, interop "
                  f"{torch.get_num_interop_threads()}, os.cpu_count {os.cpu_count()}, "
                  f"cpu {platform.processor() or platform.machine()}, python {platform.python_version()}")
    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_"))}
    console.print(f"OpenMP/MKL env: {omp or 'none set'} (on a shared, loaded machine "
                  "OMP_WAIT_POLICY=PASSIVE matters a lot, see docs/benchmarks.md)")
    console.print(f"load average at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f} "
                  "(1/5/15 min; other processes share these cores)")
    console.print(f"recipe {RECIPE.name} + {' '.join(overrides)}; {args.img_size} px, patch "
                  f"{model['patch_size']}, D {model['embed_dim']}, depth {model['depth']}, heads "
                  f"{model['num_heads']}, predictor depth {model['predictor_depth']}, {mask_gen.kind} "
                  f"mask ratio {recipe['mask']['ratio']} ({num_visible}/{grid[0] * grid[1]} visible)")
    ours_obj = built["ours"][1]
    picks = ours_obj.context_encoder.tokenizer.pick_backend(images_ctx, masks[0].visible)
    console.print(f"ours: tokenizer backend auto -> {picks}")

    names = list(built)
    times = {n: [] for n in names}
    for _ in range(args.warmup):  # warm-up (also allocates the AdamW state)
        for n in names:
            train_step(built[n][1], built[n][2], images_ctx, images_tgt, masks[0])
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(train_step(built[n][1], built[n][2], images_ctx, images_tgt, masks[r + 1]))
    load_end = os.getloadavg()

    ms = {n: statistics.median(t) for n, t in times.items()}
    base = names[0]
    macs = {n: expected_macs(model, num_visible, sparse=PATHS[n][0] != "dense",
                             visible_tokens=PATHS[n][1] == "visible") for n in names}
    table = Table(title=f"MIM-JEPA training step (fwd + bwd + AdamW + EMA), batch {args.batch}, "
                        f"median of {args.reps} interleaved reps")
    for col in ("path", "backend / context tokens", "ms/step", "images/s", "ratio", "GMAC/image", "FLOP ratio", "all reps (ms)"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for n in names:
        table.add_row(n, "%s / %s" % PATHS[n], f"{ms[n]:.0f}", f"{args.batch * 1e3 / ms[n]:.2f}", f"{ms[base] / ms[n]:.2f}x",
                      f"{macs[n] / 1e9:.2f}", f"{macs[base] / macs[n]:.2f}x",
                      " ".join(f"{t:.0f}" for t in times[n]))
    table.caption = (f"torch threads {torch.get_num_threads()}; load average at end {load_end[0]:.2f}; "
                     "FLOP ratio = expectation from multiply-adds (sparse tokenizer at the visible "
                     "fraction, halos ignored)")
    console.print(table)
    if args.profile:
        for n in names:
            profile_step(console, n, built[n][1], built[n][2], (images_ctx, images_tgt, masks[0]))
    print(f"ours vs paper compute path: {ms[base] / ms[names[1]]:.2f}x")


if __name__ == "__main__":
    main()
