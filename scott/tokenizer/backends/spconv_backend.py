"""spconv backend: the tokenizer stack on ``spconv`` SparseConvTensors of the visible sites.

Meaning (the same as :mod:`scott.tokenizer.backends.dense`): masked sites are zeros at every
layer. Here the masked sites are simply absent. At every resolution the active sites are exactly
the pixels of the visible patches; they are kept as rows of a feature matrix ``[N, C]`` in
row-major ``(batch, y, x)`` order, together with a dense row map ``[B, h, w] -> row or -1``.

Per layer kind:

* conv, stride 1, kernel > 1: ``spconv`` submanifold conv (outputs at the input sites);
* conv, stride > 1 (odd kernel with ``k // 2`` padding, or patchify kernel == stride): ``spconv``
  regular sparse conv, then only the output sites inside visible patches are kept (a gather
  through a row map of spconv's output indices; those sites are always among spconv's outputs
  because the centre tap of each lies in its own, visible, patch);
* conv with a 1x1 kernel (any stride): a plain matmul on the gathered rows (spconv's 1x1
  submanifold path is wrong upstream, it reads the weight as ``[in, out]``);
* bias: added after the kept sites are selected, so only at kept sites;
* activation: element-wise on the rows (f(0) == 0, masked sites stay zero);
* max-pool (k2 s1, zero pad bottom/right) and binomial blur (depthwise, pad 1): exact
  index-based gathers on the rows (spconv has no depthwise conv, and its max-pool computes
  ReLU(max)); a missing neighbour reads an appended zero row.

Weights are the Tokenizer's own ``nn.Conv2d`` parameters, permuted every call to spconv's
``[out, kh, kw, in]`` layout (differentiably) and passed to a throw-away spconv module built on the
``meta`` device through :func:`torch.func.functional_call`.

Devices, algorithms and dtypes:

* CUDA: ``ConvAlgo.MaskImplicitGemm`` by default (``algo="native"`` picks the gather-GEMM-scatter
  path); float64 always uses ``Native`` (implicit GEMM has no float64 kernels). bfloat16 tensors
  are computed in float32 and cast back (spconv has no bf16). Under CUDA autocast spconv's own
  ``custom_fwd`` casts its conv inputs to float16 (whatever the autocast dtype), so the output is
  float16.
* CPU: only with a CUDA wheel (``spconv-cu12x``), whose CPU path is serial and exact, using
  ``ConvAlgo.Native``; float16/bfloat16 are computed in float32 and cast back. The CPU-only wheel
  ``spconv`` is refused (its backward needs CUDA and its CPU scatter-add races under OpenMP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from ..masks_util import mask_at

__all__ = ["available", "run", "ALGOS"]

ALGOS = ("auto", "native", "implicit_gemm")


def _import_spconv():
    """Import spconv lazily: ``(spconv.pytorch, SparseConvolution, ConvAlgo, cpu_only_build)``."""
    import spconv.pytorch as sp  # optional dependency
    from spconv.pytorch.conv import SparseConvolution
    from spconv.core import ConvAlgo
    from spconv.cppconstants import CPU_ONLY_BUILD
    return sp, SparseConvolution, ConvAlgo, bool(CPU_ONLY_BUILD)


def available() -> tuple[bool, str]:
    """``(True, "")`` when a usable spconv is importable, else ``(False, reason)``."""
    try:
        _, _, _, cpu_only = _import_spconv()
    except Exception as exc:  # ImportError, or a broken binary extension (OSError, ...)
        return False, (f"spconv is not importable ({type(exc).__name__}: {exc}); install a CUDA "
                       f"wheel, e.g. pip install 'scott[cu126]', or use backend='tiles'")
    if cpu_only:
        return False, ("the CPU-only 'spconv' wheel is installed: its backward needs CUDA and its "
                       "CPU scatter-add races; install spconv-cu12x instead or use backend='tiles'")
    return True, ""


# --------------------------------------------------------------------------- active sites
@dataclass
class Sites:
    """The active sites at one resolution: pixels of the visible patches, row-major.

    ``idx``: contiguous int32 ``[N, 3]`` ``(batch, y, x)`` (spconv's index layout);
    ``rowmap``: int64 ``[B, h, w]``, the feature row of each site or -1.
    """

    idx: torch.Tensor
    rowmap: torch.Tensor

    @property
    def n(self) -> int:
        return self.idx.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.rowmap.shape[1], self.rowmap.shape[2]

    def coords(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(b, y, x)`` as int64 vectors."""
        c = self.idx.long()
        return c[:, 0], c[:, 1], c[:, 2]


def sites_at(visible: torch.Tensor, h: int, w: int) -> Sites:
    """Active sites of an ``h x w`` map: every pixel of a visible patch."""
    m = mask_at(visible, h, w)[:, 0]
    # nonzero() may come back column-major; spconv reads raw memory, so force a contiguous copy.
    idx = torch.nonzero(m).to(torch.int32).contiguous()
    rowmap = torch.full(m.shape, -1, dtype=torch.long, device=m.device)
    rowmap[m] = torch.arange(idx.shape[0], device=m.device)
    return Sites(idx, rowmap)


def _neighbour_rows(sites_in: Sites, b: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                    pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Rows of the input sites at ``(b, y, x)`` (coordinates in the padded map), with every
    missing or padded site sent to row ``N`` (the appended zero row)."""
    padded = nnf.pad(sites_in.rowmap, pad, value=-1)
    rows = padded[b, y, x]
    return torch.where(rows < 0, torch.full_like(rows, sites_in.n), rows)


def packed(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides, size-1 dimensions included.

    ``Tensor.contiguous()`` is a no-op for e.g. a ``[out, k, k, 1]`` permuted weight whose size-1
    dimension keeps a non-standard stride, and spconv hands raw pointers to its kernels; copy
    whenever any stride differs from the row-major one (defensive, cheap)."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    if tuple(reversed(expected)) == t.stride():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _with_zero_row(feats: torch.Tensor) -> torch.Tensor:
    return torch.cat([feats, feats.new_zeros(1, feats.shape[1])], 0)


# --------------------------------------------------------------------------- layers
def _conv(layer, feats: torch.Tensor, sites_in: Sites, sites_out: Sites, batch: int,
          algo) -> torch.Tensor:
    """One Conv layer from ``sites_in`` rows to ``sites_out`` rows (bias at kept sites only)."""
    k, s = layer.k, layer.s
    weight = layer.weight
    if sites_in.n == 0:
        # Nothing visible in the whole batch: an empty product keeps the autograd graph (zero
        # gradients, like the dense reference) without calling spconv on zero points.
        out = torch.mm(feats, weight[:, :, k // 2, k // 2].to(feats.dtype).t())
    elif k == 1:
        # 1x1 conv of any stride: output (y, x) reads input (s*y, s*x), in the same patch.
        b, y, x = sites_out.coords()
        rows = sites_in.rowmap[b, y * s, x * s]
        out = torch.mm(feats.index_select(0, rows), weight[:, :, 0, 0].to(feats.dtype).t())
    else:
        out = _spconv_conv(layer, feats, sites_in, sites_out, batch, algo)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out


def _spconv_conv(layer, feats: torch.Tensor, sites_in: Sites, sites_out: Sites, batch: int,
                 algo) -> torch.Tensor:
    sp, conv_cls, _, _ = _import_spconv()
    k, s, p = layer.k, layer.s, layer.p
    subm = s == 1
    with torch.device("meta"):
        module = conv_cls(2, layer.in_channels, layer.out_channels, k, s, p,
                                      subm=subm, bias=False, algo=algo)
    module.train()  # spconv's eval path of implicit GEMM bypasses autograd
    weight = packed(layer.weight.to(feats.dtype).permute(0, 2, 3, 1))  # [out, kh, kw, in]
    x = sp.SparseConvTensor(packed(feats), sites_in.idx, list(sites_in.size), batch)
    y = torch.func.functional_call(module, {"weight": weight}, (x,))
    if subm:
        return y.features  # submanifold: output rows are the input sites, same order
    # Regular sparse conv: spconv's outputs are every site its windows touch, in its own order.
    # Keep the sites inside visible patches, in our row-major order.
    out_idx = y.indices.long()
    h, w = sites_out.size
    omap = torch.full((batch, h, w), -1, dtype=torch.long, device=feats.device)
    omap[out_idx[:, 0], out_idx[:, 1], out_idx[:, 2]] = torch.arange(out_idx.shape[0], device=feats.device)
    b, yy, xx = sites_out.coords()
    rows = omap[b, yy, xx]
    if rows.device.type == "cpu" and bool((rows < 0).any()):
        raise AssertionError("spconv did not produce every visible output site")  # cannot happen
    return y.features.index_select(0, rows)


def _maxpool(feats: torch.Tensor, sites: Sites) -> torch.Tensor:
    """Max over the 2x2 window starting at each site (zero pad bottom/right; masked = 0).

    Taken in the window's row-major order, keeping the FIRST maximum (strict ``>``), like
    ``max_pool2d``, so gradients go to the same element on ties."""
    fz = _with_zero_row(feats)
    b, y, x = sites.coords()
    out = feats
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        cand = fz.index_select(0, _neighbour_rows(sites, b, y + dy, x + dx, (0, 1, 0, 1)))
        out = torch.where(cand > out, cand, out)
    return out


def _blur(layer, feats: torch.Tensor, sites_in: Sites, sites_out: Sites) -> torch.Tensor:
    """Depthwise 3x3 binomial blur, zero padding 1, stride ``layer.s``, at the output sites."""
    fz = _with_zero_row(feats)
    taps = layer.taps.to(device=feats.device, dtype=feats.dtype)
    b, y, x = sites_out.coords()
    s = layer.s
    out = None
    for dy in range(3):
        for dx in range(3):
            rows = _neighbour_rows(sites_in, b, y * s + dy, x * s + dx, (1, 1, 1, 1))
            term = fz.index_select(0, rows) * (taps[dy] * taps[dx])
            out = term if out is None else out + term
    return out


def _act(layer, feats: torch.Tensor) -> torch.Tensor:
    return layer.dense(feats)  # element-wise, shape-agnostic


# --------------------------------------------------------------------------- run
def _resolve_algo(algo: str | None, device: torch.device, dtype: torch.dtype):
    _, _, conv_algo, _ = _import_spconv()
    algo = "auto" if algo is None else algo
    if algo not in ALGOS:
        raise ValueError(f"spconv algo must be one of {ALGOS}, got {algo!r}")
    if device.type != "cuda" or dtype == torch.float64:
        if algo == "implicit_gemm":
            raise ValueError("spconv's implicit GEMM needs CUDA and float16/float32; use algo='native'")
        return conv_algo.Native
    if algo == "native":
        return conv_algo.Native
    return conv_algo.MaskImplicitGemm


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.bfloat16 or (dtype == torch.float16 and device.type == "cpu"):
        return torch.float32
    return dtype


def run(layers, images: torch.Tensor, visible: torch.Tensor | None,
        algo: str | None = None) -> torch.Tensor:
    """Return ``[B, D, gh, gw]`` tokens; masked positions exactly zero.

    ``algo``: ``"auto"`` (default: implicit GEMM on CUDA, Native on CPU or for float64),
    ``"native"`` or ``"implicit_gemm"``.
    """
    ok, why = available()
    if not ok:
        raise RuntimeError(f"spconv backend unavailable: {why}")
    batch, _, h, w = images.shape
    if visible is None:
        stride = 1
        for layer in layers:
            stride *= layer.s
        visible = torch.ones(batch, h // stride, w // stride, dtype=torch.bool, device=images.device)
    out_dtype = images.dtype
    dtype = _compute_dtype(images.dtype, images.device)
    conv_algo = _resolve_algo(algo, images.device, dtype)

    sites = sites_at(visible, h, w)
    feats = images.permute(0, 2, 3, 1)[sites.rowmap >= 0].to(dtype)  # [N, C], row-major sites
    for layer in layers:
        kind = layer.kind
        if kind == "act":
            feats = _act(layer, feats)
        elif kind == "maxpool":
            feats = _maxpool(feats, sites)
        else:
            new_sites = sites_at(visible, *layer.out_size(*sites.size))
            if kind == "conv":
                feats = _conv(layer, feats, sites, new_sites, batch, conv_algo)
            elif kind == "blur":
                feats = _blur(layer, feats, sites, new_sites)
            else:
                raise ValueError(f"spconv backend: unknown layer kind {kind!r}")
            sites = new_sites
    return _to_grid(feats, sites, batch).to(feats.dtype if out_dtype == dtype else out_dtype)


def _to_grid(feats: torch.Tensor, sites: Sites, batch: int) -> torch.Tensor:
    """Scatter the final rows into zeros ``[B, D, h, w]``."""
    h, w = sites.size
    b, y, x = sites.coords()
    flat = (b * h + y) * w + x
    grid = feats.new_zeros(batch * h * w, feats.shape[1]).index_copy(0, flat, feats)
    return grid.view(batch, h, w, -1).permute(0, 3, 1, 2)
