"""Forward+backward time of the SCOTT tokenizer per backend, measured side by side.

    python benchmarks/tokenizer.py                 # batch 32 and 8, 25/40/100 % visible
    python benchmarks/tokenizer.py --quick         # batch 8 only, fewer reps
    python benchmarks/tokenizer.py --device cuda   # adds spconv when it is available
    python benchmarks/tokenizer.py --recipe recipes/fashion_mnist_cpu.yaml --batch 64   # a recipe's stack

The paper's stack (224 px, 3 -> 64 -> 384 channels), or with ``--recipe`` the tokenizer of a
recipe's ``model`` section, runs on paper-style block masks (random rectangles until the visible
fraction is reached, the same count in every image). Backends are
interleaved within each repetition (warm-up first) and the median is reported, with each
backend's ratio to dense in its fastest layout (channels-last on CPU). The last line is the
headline: tiles vs dense at 40 % visible (batch 32 when measured).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from scott.masks import BlockwiseMask
from scott.tokenizer import Tokenizer, available_backends
from scott.tokenizer.backends import dense, tiles

#: the paper's stack at 224 px, measured unless ``--recipe`` names another tokenizer
PAPER = {"tokenizer": "scott", "img_size": 224, "patch_size": 16, "embed_dim": 384, "in_chans": 3,
         "hidden_dim": 64}


def stack_from_recipe(path: str) -> dict:
    """The tokenizer settings (keys of :data:`PAPER`) of a recipe's ``model`` section."""
    from scott.config import load_recipe

    model = load_recipe(path, check_data=False)["model"]
    return {key: model[key] for key in PAPER}


def block_masks(batch: int, grid: int, fraction: float, seed: int) -> torch.Tensor:
    """``[batch, grid, grid]`` visible masks: block masks with ``fraction`` of patches visible."""
    if fraction >= 1.0:
        return torch.ones(batch, grid, grid, dtype=torch.bool)
    gen = BlockwiseMask((grid, grid), ratio=1.0 - fraction)
    return gen.batch(batch, torch.Generator().manual_seed(seed)).visible


def _runners(tok: Tokenizer, device: torch.device) -> dict:
    """Backend name -> function(images, visible) -> tokens [B, N, D]."""
    def tokens(out):
        return out.flatten(2).transpose(1, 2).contiguous()

    def auto(images, visible):
        tok.backend = "auto"
        return tok(images, visible)

    runners = {
        "dense NCHW": lambda im, v: tokens(dense.run(tok.layers, im, v, channels_last=False)),
        "dense CL": lambda im, v: tokens(dense.run(tok.layers, im, v, channels_last=True)),
        "tiles": lambda im, v: tokens(tiles.run(tok.layers, im, v)),
        "auto": auto,
    }
    if device.type == "cuda" and available_backends()["spconv"][0]:
        from scott.tokenizer.backends import spconv_backend
        runners["spconv"] = lambda im, v: tokens(spconv_backend.run(tok.layers, im, v))
    return runners


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn, tok, images, visible, weights, device) -> float:
    tok.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    out = fn(images, visible)
    (out * weights).sum().backward()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def measure(batch: int, fraction: float, reps: int, device: torch.device, tok: Tokenizer, stack: dict,
            seed: int = 0) -> tuple[dict[str, float], str]:
    """Median fwd+bwd ms per backend for one (batch, visible fraction); also auto's choice."""
    gen = torch.Generator().manual_seed(seed)
    size, grid = stack["img_size"], stack["img_size"] // stack["patch_size"]
    images = torch.randn(batch, stack["in_chans"], size, size, generator=gen).to(device)
    visible = block_masks(batch, grid, fraction, seed).to(device)
    weights = torch.randn(batch, grid ** 2, stack["embed_dim"], generator=gen).to(device)
    runners = _runners(tok, device)
    names = list(runners)
    times = {n: [] for n in names}
    for n in names:  # warm-up
        _step(runners[n], tok, images, visible, weights, device)
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for n in order:
            times[n].append(_step(runners[n], tok, images, visible, weights, device))
    tok.backend = "auto"
    return {n: statistics.median(t) for n, t in times.items()}, tok.pick_backend(images, visible)


def header(device: torch.device, stack: dict) -> list[str]:
    malloc = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    lines = [
        f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
        f"interop threads {torch.get_num_interop_threads()}, os.cpu_count {os.cpu_count()}",
        f"cpu {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.2f} (other processes share these cores)",
        f"allocator env: {malloc or 'none set (glibc defaults)'}",
        f"stack {stack['tokenizer']}, {stack['img_size']} px, patch {stack['patch_size']}, "
        f"{stack['in_chans']} -> {stack['hidden_dim']} -> {stack['embed_dim']} channels, block masks, fwd+bwd "
        f"(images without grad), median ms",
    ]
    if device.type == "cuda":
        lines.append(f"gpu {torch.cuda.get_device_name(device)}")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--visible", type=float, nargs="+", default=[0.25, 0.4, 1.0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="batch 8 only, 3 reps")
    ap.add_argument("--recipe", default=None,
                    help="measure this recipe's tokenizer (model section) instead of the paper's 224 px stack")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every backend (default: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.reps = [8], 3
    device = torch.device(args.device)
    stack = stack_from_recipe(args.recipe) if args.recipe else dict(PAPER)
    console = Console()
    for line in header(device, stack):
        console.print(line)
    torch.manual_seed(0)
    tok = Tokenizer(embed_dim=stack["embed_dim"], patch_size=stack["patch_size"], in_chans=stack["in_chans"],
                    stack=stack["tokenizer"], hidden_dim=stack["hidden_dim"]).to(device)
    results = {}
    for batch in args.batch:
        for frac in args.visible:
            results[(batch, frac)] = measure(batch, frac, args.reps, device, tok, stack)
    base = "dense CL" if device.type == "cpu" else "dense NCHW"
    names = list(next(iter(results.values()))[0])
    table = Table(title=f"tokenizer fwd+bwd, median of {args.reps} (ratio = {base} ms / backend ms)")
    table.add_column("batch", justify="right")
    table.add_column("visible", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("auto picks")
    table.caption = "load average after the run: %.2f" % os.getloadavg()[0]
    for (batch, frac), (ms, pick) in results.items():
        cells = [f"{ms[n]:.1f} ({ms[base] / ms[n]:.2f}x)" for n in names]
        table.add_row(str(batch), f"{frac:.0%}", *cells, pick)
    console.print(table)
    head_batch = 32 if (32, 0.4) in results else args.batch[0]
    if (head_batch, 0.4) in results:
        ms = results[(head_batch, 0.4)][0]
        print(f"tiles vs dense at 40% visible: {ms[base] / ms['tiles']:.2f}x")


if __name__ == "__main__":
    main()
