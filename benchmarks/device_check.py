"""One-shot CUDA check of the spconv tokenizer backend, for a session with a lent NVIDIA GPU.

    # here: bash tools/pack_spconv_for_device.sh   (-> device_carry/spconv_site.tar.xz, ~42 MiB)
    # there (carry ["device_carry/spconv_site.tar.xz"]):
    mkdir -p /tmp/spsite && tar -xJf device_carry/spconv_site.tar.xz -C /tmp/spsite && \
      PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/spsite:$PWD python3 benchmarks/device_check.py --out $OUT/device_check.json

Needs only the repository, torch (with CUDA) and spconv/cumm on PYTHONPATH. It runs two parts
and prints a table for each, then one final JSON line (also written to ``--out``):

1. exactness: the spconv backend (implicit GEMM and Native) against the dense reference on CUDA,
   forward and gradients w.r.t. the input and every weight, for the scott / small (grey,
   non-square) / patchify / custom (1x1 conv, biases) stacks with edge-case masks (an image with
   no visible patch, a single visible patch, all visible). Errors are max |a - b| / max |b|
   against dense float64; dense float32 is measured the same way for scale. TF32 is switched off
   for this part. Also float64 (Native) and autocast float16 / bfloat16 (spconv runs float16).
2. timing: forward + backward of the scott stack (224 px, D 384, hidden 64), batch 32 and 64,
   25 / 40 / 100 % visible (paper-style block masks), dense NCHW / channels-last, tiles, spconv
   implicit GEMM and Native; CUDA-event medians, backends interleaved, with peak memory. TF32
   settings are the library defaults (dense float32 convs may use TF32 through cuDNN; spconv
   does not).

A time budget (``--budget-s``) skips the remaining timing rows when spent.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scott.masks import BlockwiseMask  # noqa: E402
from scott.tokenizer.backends import dense, tiles  # noqa: E402
from scott.tokenizer.backends import spconv_backend as spb  # noqa: E402
from scott.tokenizer.layers import build_stack  # noqa: E402

F32_TOL = 1e-5  # the lead's float32 tolerance between backends (relative to max |reference|)


# --------------------------------------------------------------------------- helpers
def block_masks(batch: int, gh: int, gw: int, fraction: float, seed: int) -> torch.Tensor:
    """``[batch, gh, gw]`` paper-style block masks with ``fraction`` of patches visible."""
    if fraction >= 1.0:
        return torch.ones(batch, gh, gw, dtype=torch.bool)
    return BlockwiseMask((gh, gw), ratio=1.0 - fraction).batch(
        batch, torch.Generator().manual_seed(seed)).visible


def edge_case_masks(batch: int, gh: int, gw: int, seed: int) -> torch.Tensor:
    """Image 0: nothing visible; 1: one patch; 2: all; the rest: 40 % block masks."""
    vis = block_masks(batch, gh, gw, 0.4, seed) if gh * gw >= 100 else \
        torch.rand(batch, gh, gw, generator=torch.Generator().manual_seed(seed)) < 0.4
    vis[0] = False
    if batch > 1:
        vis[1] = False
        vis[1, gh // 2, gw - 1] = True
    if batch > 2:
        vis[2] = True
    return vis


def fwd_bwd(run, layers, images, visible, upstream, autocast_dtype=None):
    """Output, d images and d params (params in ``layers.parameters()`` order)."""
    x = images.clone().requires_grad_()
    layers.zero_grad(set_to_none=True)
    if autocast_dtype is None:
        out = run(layers, x, visible)
    else:
        with torch.autocast("cuda", dtype=autocast_dtype):
            out = run(layers, x, visible)
    (out.to(upstream.dtype) * upstream).sum().backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for p in layers.parameters()]
    return out.detach(), x.grad.detach().clone(), grads


def errors(got, ref) -> dict:
    """max abs / max rel (to max |ref|) of forward, d input and the worst weight gradient."""
    def pair(a, b):
        a, b = a.double(), b.double()
        d = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(b.abs().max()) if b.numel() else 0.0
        return d, d / scale if scale > 0 else d

    fa, fr = pair(got[0], ref[0])
    xa, xr = pair(got[1], ref[1])
    wp = [pair(a, b) for a, b in zip(got[2], ref[2])]
    wa = max((w[0] for w in wp), default=0.0)
    wr = max((w[1] for w in wp), default=0.0)
    return {"fwd_abs": fa, "fwd_rel": fr, "dx_abs": xa, "dx_rel": xr, "dw_abs": wa, "dw_rel": wr,
            "max_rel": max(fr, xr, wr)}


def spconv_runner(algo: str):
    return lambda layers, x, v: spb.run(layers, x, v, algo=algo)


# --------------------------------------------------------------------------- part 1
def exactness_cases(small: bool = False):
    """(name, stack, in_chans, embed_dim, patch, H, W, batch); ``small`` for the CPU dry run."""
    custom = [{"conv": {"out": 16, "kernel": 1, "bias": True}}, "relu",
              {"conv": {"out": 32, "kernel": 3, "stride": 2, "bias": True}}, "gelu", "maxblurpool",
              {"conv": {"kernel": 1, "bias": True}}]
    if small:
        return [("scott 64x48", "scott", 3, 16, 16, 64, 48, 3), ("custom 1x1 +bias", custom, 3, 8, 4, 16, 16, 3)]
    return [
        ("scott 224 D384", "scott", 3, 384, 16, 224, 224, 4),
        ("scott 160x96", "scott", 3, 64, 16, 160, 96, 3),
        ("small p8 grey 32x48", "small", 1, 64, 8, 32, 48, 4),
        ("small p4 28x28", "small", 3, 64, 4, 28, 28, 3),
        ("patchify p16 +bias", "patchify", 3, 384, 16, 224, 224, 3),
        ("custom 1x1 +bias", custom, 3, 48, 4, 32, 32, 3),
    ]


def check_exactness(device, small: bool = False) -> list[dict]:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for i, (name, stack, c, d, p, h, w, b) in enumerate(exactness_cases(small)):
        torch.manual_seed(100 + i)
        layers64 = build_stack(stack, c, d, p, 64 if stack == "scott" else 16).to(device, torch.float64)
        for m in layers64.modules():
            if getattr(m, "bias", None) is not None:
                torch.nn.init.normal_(m.bias, std=0.1)
        layers32 = build_stack(stack, c, d, p, 64 if stack == "scott" else 16).to(device)
        layers32.load_state_dict({k: v.float() for k, v in layers64.state_dict().items()})
        images = torch.randn(b, c, h, w, device=device, dtype=torch.float64)
        visible = edge_case_masks(b, h // p, w // p, seed=i).to(device)
        upstream = torch.randn(b, d, h // p, w // p, device=device, dtype=torch.float64)
        truth = fwd_bwd(lambda l, x, v: dense.run(l, x, v, channels_last=False), layers64, images,
                        visible, upstream)
        variants = [
            ("dense f32 (scale)", layers32, lambda l, x, v: dense.run(l, x, v, channels_last=False), torch.float32, None),
            ("spconv implicit_gemm f32", layers32, spconv_runner("implicit_gemm"), torch.float32, None),
            ("spconv native f32", layers32, spconv_runner("native"), torch.float32, None),
            ("spconv native f64", layers64, spconv_runner("native"), torch.float64, None),
            ("spconv autocast f16", layers32, spconv_runner("auto"), torch.float32, torch.float16),
            ("spconv autocast bf16", layers32, spconv_runner("auto"), torch.float32, torch.bfloat16),
        ]
        for vname, layers, run, dtype, ac in variants:
            row = {"case": name, "variant": vname}
            try:
                got = fwd_bwd(run, layers, images.to(dtype), visible, upstream.to(dtype), ac)
                row.update(errors(got, truth))
                hidden = ~visible[:, None].expand_as(got[0])
                row["masked_exact_zero"] = bool((got[0][hidden] == 0).all())
                row["out_dtype"] = str(got[0].dtype).replace("torch.", "")
                tol = 1e-10 if dtype == torch.float64 else (F32_TOL if ac is None else 5e-2)
                row["tol"] = tol
                row["ok"] = bool(row["max_rel"] <= tol and row["masked_exact_zero"])
            except Exception as exc:  # record and go on: one failure must not hide the rest
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                row["ok"] = False
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- part 2
def timing_runners():
    return {
        "dense NCHW": lambda l, x, v: dense.run(l, x, v, channels_last=False),
        "dense CL": lambda l, x, v: dense.run(l, x, v, channels_last=True),
        "tiles": tiles.run,
        "spconv igemm": spconv_runner("implicit_gemm"),
        "spconv native": spconv_runner("native"),
    }


class _Timer:
    """CUDA events on a GPU, perf_counter elsewhere (the CPU dry run); milliseconds."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        self.sync()
        if self.cuda:
            self._a, self._b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._b.record()
            self.sync()
            return self._a.elapsed_time(self._b)
        return (time.perf_counter() - self._t) * 1000.0


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def time_stack(device, batches, fractions, reps, warmup, deadline, img=224) -> list[dict]:
    torch.backends.cudnn.allow_tf32 = True  # library defaults for timing
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    layers = build_stack("scott", 3, 384, 16, 64).to(device)
    timer = _Timer(device)
    grid = img // 16
    runners = timing_runners()
    rows = []
    for batch in batches:
        images = torch.randn(batch, 3, img, img, device=device)
        for frac in fractions:
            if time.monotonic() > deadline:
                rows.append({"batch": batch, "visible": frac, "skipped": "time budget spent"})
                continue
            visible = block_masks(batch, grid, grid, frac, seed=batch).to(device)
            real_frac = float(visible.float().mean())
            times = {k: [] for k in runners}
            peak = {}
            failed = {}
            for rep in range(warmup + reps):
                for name, run in runners.items():
                    if name in failed:
                        continue
                    layers.zero_grad(set_to_none=True)
                    if rep == warmup:
                        _reset_peak(device)
                    try:
                        timer.start()
                        out = run(layers, images, visible)
                        out.sum().backward()
                        ms = timer.stop()
                    except Exception as exc:
                        failed[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        continue
                    if rep >= warmup:
                        times[name].append(ms)
                    if rep == warmup:
                        peak[name] = _peak_mib(device)
                    del out
            dense_ms = statistics.median(times["dense NCHW"]) if times["dense NCHW"] else float("nan")
            for name in runners:
                row = {"batch": batch, "visible": round(real_frac, 3), "backend": name}
                if name in failed:
                    row["error"] = failed[name]
                else:
                    ms = statistics.median(times[name])
                    row.update({"median_ms": round(ms, 3), "vs_dense_nchw": round(dense_ms / ms, 3),
                                "peak_mib": round(peak.get(name, float("nan")), 1)})
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- report
def print_tables(card: str, exact: list[dict], timing: list[dict], img: int = 224) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        for r in exact + timing:
            print(r)
        return
    con = Console(width=160)
    t = Table(title=f"spconv backend exactness on {card} (max rel error vs dense float64)")
    for col in ("case", "variant", "fwd_rel", "dx_rel", "dw_rel", "zeros", "dtype", "ok"):
        t.add_column(col)
    for r in exact:
        if "error" in r:
            t.add_row(r["case"], r["variant"], r["error"][:60], "", "", "", "", "FAIL")
        else:
            t.add_row(r["case"], r["variant"], f"{r['fwd_rel']:.2e}", f"{r['dx_rel']:.2e}",
                      f"{r['dw_rel']:.2e}", str(r["masked_exact_zero"]), r["out_dtype"],
                      "ok" if r["ok"] else "FAIL")
    con.print(t)
    t = Table(title=f"scott stack fwd+bwd on {card}: {img} px, D 384 (median ms)")
    for col in ("batch", "visible", "backend", "median ms", "x vs dense NCHW", "peak MiB"):
        t.add_column(col)
    for r in timing:
        if "skipped" in r:
            t.add_row(str(r["batch"]), str(r["visible"]), "-", r["skipped"], "", "")
        elif "error" in r:
            t.add_row(str(r["batch"]), f"{r['visible']:.2f}", r["backend"], r["error"][:60], "", "")
        else:
            t.add_row(str(r["batch"]), f"{r['visible']:.2f}", r["backend"], f"{r['median_ms']:.2f}",
                      f"{r['vs_dense_nchw']:.2f}", f"{r['peak_mib']:.0f}")
    con.print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--visible", type=float, nargs="+", default=[0.25, 0.4, 1.0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop timing after this many seconds")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    ap.add_argument("--device", default="cuda", help="'cpu' for a dry run of this script's code")
    ap.add_argument("--img", type=int, default=224, help="image size of the timing part")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA is not available"}))
        return 2
    ok, why = spb.available()
    on_gpu = device.type == "cuda"
    card = torch.cuda.get_device_name(device) if on_gpu else "CPU (dry run)"
    info = {"card": card, "capability": list(torch.cuda.get_device_capability(device)) if on_gpu else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "spconv_available": ok,
            "spconv_reason": why}
    try:
        import spconv
        info["spconv"] = getattr(spconv, "__version__", "?")
    except Exception as exc:  # reported, not fatal: dense/tiles still get timed
        info["spconv"] = f"not importable: {exc}"
    print(f"device: {card}  torch {torch.__version__} (CUDA {torch.version.cuda})  spconv: {info['spconv']}",
          flush=True)
    exact = check_exactness(device, small=not on_gpu) if ok else []
    info["exactness_s"] = round(time.monotonic() - t0, 1)
    timing = [] if args.skip_timing else time_stack(device, args.batches, args.visible, args.reps,
                                                    args.warmup, t0 + args.budget_s, args.img)
    info["total_s"] = round(time.monotonic() - t0, 1)
    print_tables(card, exact, timing, args.img)
    result = {"device_check": info, "all_exact": bool(exact) and all(r["ok"] for r in exact),
              "exactness": exact, "timing": timing}
    line = json.dumps(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
