"""``scott.Tokenizer``: images + an explicit patch visibility mask -> ViT tokens."""
from __future__ import annotations

import functools
import importlib
from typing import Sequence

import torch
import torch.nn as nn

from .layers import build_stack, layer_sizes

__all__ = ["Tokenizer", "BACKENDS", "available_backends", "choose_backend"]

BACKENDS = ("dense", "tiles", "spconv")

# Above this visible fraction the dense backend is the fastest on CPU (measured in
# benchmarks/tokenizer.py: at 100 % visible dense wins, at <= 60 % tiles wins).
DENSE_ABOVE = 0.8


def _backend_module(name: str):
    return importlib.import_module(f"scott.tokenizer.backends.{name if name != 'spconv' else 'spconv_backend'}")


@functools.cache
def backend_available(name: str) -> tuple[bool, str]:
    """``(available, reason_if_not)`` for one backend; probed once per process (importing
    spconv takes seconds, so a backend is only probed when it is named or considered)."""
    try:
        return _backend_module(name).available()
    except ImportError as exc:  # a backend module that cannot import is unavailable
        return False, str(exc)


def available_backends() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason_if_not)}`` for every backend."""
    return {name: backend_available(name) for name in BACKENDS}


def _to_pair(v) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v}")
    return v


MASKING_MODES = ("sparse", "leaky")
OUTPUT_FORMATS = ("NLC", "NCHW", "NHWC")
#: Backends whose CUDA path is not bit-reproducible (spconv's implicit GEMM, ``index_add_``).
NONDETERMINISTIC_ON_CUDA = ("spconv", "tiles")


def choose_backend(requested: str, device_type: str, visible_fraction: float | None,
                   deterministic: bool = False) -> str:
    """The backend for one call: ``requested`` unless it is ``auto``.

    ``auto``: ``dense`` for full images (``visible_fraction`` None) or mostly visible ones, else
    ``spconv`` on CUDA (when installed) and ``tiles`` elsewhere. With torch's deterministic
    algorithms on (``train.deterministic``) CUDA runs use ``dense``, and asking for a backend of
    :data:`NONDETERMINISTIC_ON_CUDA` there is an error.
    """
    cuda_exact = deterministic and device_type == "cuda"
    if requested != "auto":
        if cuda_exact and requested in NONDETERMINISTIC_ON_CUDA:
            raise RuntimeError(f"backend {requested!r} is not deterministic on CUDA; with train.deterministic "
                               "use model.backend auto or dense")
        return requested
    if visible_fraction is None or visible_fraction > DENSE_ABOVE or cuda_exact:
        return "dense"
    if device_type == "cuda" and backend_available("spconv")[0]:
        return "spconv"
    return "tiles" if backend_available("tiles")[0] else "dense"


class Tokenizer(nn.Module):
    """Convolutional tokenizer that computes tokens of the VISIBLE patches only.

    Args:
        embed_dim: token width D.
        patch_size: total stride P of the stack; one token per P x P patch.
        in_chans: image channels.
        stack: ``"scott"`` (the paper's), ``"small"`` (28-64 px images, patch 4/8/16),
            ``"patchify"`` (plain ViT linear patch embedding) or a list of layer descriptions
            (see :func:`scott.tokenizer.layers.stack_from_description`).
        backend: ``"auto"``, ``"dense"``, ``"tiles"`` or ``"spconv"``.
        masking: ``"sparse"`` (default: the one masked meaning, computed by ``backend``) or
            ``"leaky"``, the ablation the paper argues against: a plain dense conv of the
            zero-masked image without re-masking between layers (``backend`` is then unused
            for masked inputs).
        img_size: optional default image size (needed for ``num_patches`` / ``grid_size`` and by
            timm); forward accepts any size divisible by ``patch_size``.
        hidden_dim: width of the hidden conv of the named stacks.
        output_fmt: ``"NLC"`` (default, ``[B, N, D]``), ``"NCHW"`` (``[B, D, gh, gw]``) or
            ``"NHWC"`` (``[B, gh, gw, D]``, what timm's ``dynamic_img_size`` asks for).
        strict_img_size: if true, ``forward`` accepts only ``img_size`` images (timm
            ``PatchEmbed``'s check); by default any size divisible by ``patch_size`` is accepted.
        **kwargs: timm ``embed_layer`` keywords (``bias``, ``dynamic_img_pad``, ``device``,
            ``dtype``, ...) are accepted.

    timm conventions: ``img_size``, ``grid_size``, ``num_patches``, ``feat_ratio()``,
    ``dynamic_feat_size()`` and ``set_input_size(img_size, patch_size)`` behave like those of
    timm's ``PatchEmbed`` (a new patch size is possible only for the ``patchify`` stack, whose
    weights are resampled as timm resamples its patch projection).

    ``forward(images [B, C, H, W], visible [B, H/P, W/P] bool or None) -> [B, N, D]``: N patches in
    row-major order; masked positions are exactly zero and a visible token depends only on
    visible pixels.
    """

    def __init__(self, embed_dim: int = 384, patch_size: int = 16, in_chans: int = 3,
                 stack: str | Sequence = "scott", backend: str = "auto", img_size=None,
                 hidden_dim: int = 64, output_fmt: str | None = "NLC", masking: str = "sparse",
                 strict_img_size: bool = False, **kwargs):
        super().__init__()
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        if kwargs.pop("dynamic_img_pad", False):
            raise ValueError("Tokenizer does not pad images; use an image size divisible by the patch size")
        kwargs.pop("bias", None)  # timm passes bias for its linear patch embed; stacks define their own
        kwargs.pop("flatten", None)
        kwargs.pop("norm_layer", None)
        if kwargs:
            raise TypeError(f"Tokenizer got unexpected arguments {sorted(kwargs)}")
        if isinstance(patch_size, (tuple, list)):
            if len(set(patch_size)) != 1:
                raise ValueError(f"patch_size must be square, got {patch_size}")
            patch_size = patch_size[0]
        output_fmt = "NLC" if output_fmt is None else str(getattr(output_fmt, "value", output_fmt))
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
        if masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {MASKING_MODES}, got {masking!r}")
        self.masking = masking
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.output_fmt = output_fmt
        self.strict_img_size = bool(strict_img_size)
        self.stack_name = stack if isinstance(stack, str) else "custom"
        self.layers = build_stack(stack, self.in_chans, self.embed_dim, self.patch_size, hidden_dim)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        self.backend = backend  # validated by the setter
        self.last_backend: str | None = None
        self.img_size = _to_pair(img_size)
        if self.img_size is not None:
            self._check_size(*self.img_size)

    # ----------------------------------------------------------------------- timm conventions
    @property
    def grid_size(self) -> tuple[int, int] | None:
        if self.img_size is None:
            return None
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_patches(self) -> int | None:
        g = self.grid_size
        return None if g is None else g[0] * g[1]

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size if as_scalar else (self.patch_size, self.patch_size)

    def dynamic_feat_size(self, img_size) -> tuple[int, int]:
        return img_size[0] // self.patch_size, img_size[1] // self.patch_size

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """New nominal image size (and, for the ``patchify`` stack only, patch size), as timm's
        ``PatchEmbed.set_input_size``: ``img_size``/``grid_size``/``num_patches`` follow; the
        parameters of a conv stack do not depend on the image size, so they are unchanged."""
        size = _to_pair(img_size) if img_size is not None else self.img_size
        if patch_size is not None:
            new_patch = _to_pair(patch_size)
            if new_patch[0] != new_patch[1]:
                raise ValueError(f"patch_size must be square, got {patch_size}")
            if new_patch[0] != self.patch_size:
                if size is not None and (size[0] % new_patch[0] or size[1] % new_patch[0]):
                    raise ValueError(f"image size {size[0]}x{size[1]} is not divisible by the patch size "
                                     f"{new_patch[0]}")
                self._resample_patch(new_patch[0])
        if size is not None:
            self._check_size(*size)
        self.img_size = size

    def _resample_patch(self, new: int) -> None:
        """Resize the one patchify conv to ``new`` x ``new`` patches (timm's pseudo-inverse resampling)."""
        if self.stack_name != "patchify" or len(self.layers) != 1:
            raise ValueError(f"the patch size of a '{self.stack_name}' stack is fixed by its strides; "
                             "only the 'patchify' stack can change patch size")
        from timm.layers import resample_patch_embed

        from .layers import Conv

        old = self.layers[0]
        conv = Conv(old.in_channels, old.out_channels, new, new, bias=old.bias is not None, init="default")
        conv = conv.to(device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(resample_patch_embed(old.weight, [new, new]))
            if old.bias is not None:
                conv.bias.copy_(old.bias)
        conv.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            conv.bias.requires_grad_(old.bias.requires_grad)
        conv.train(old.training)
        self.layers[0] = conv
        self.patch_size = new

    # ----------------------------------------------------------------------- backend choice
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name != "auto":
            if name not in BACKENDS:
                raise ValueError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
            ok, why = backend_available(name)
            if not ok:
                raise RuntimeError(f"backend {name!r} is not available: {why}")
        self._backend = name

    def pick_backend(self, images: torch.Tensor, visible: torch.Tensor | None) -> str:
        """The backend ``forward`` will use for these inputs (resolves ``auto``)."""
        frac = None
        if self._backend == "auto" and visible is not None:
            frac = float(visible.float().mean()) if visible.numel() else 0.0
        return choose_backend(self._backend, images.device.type, frac, torch.are_deterministic_algorithms_enabled())

    # ----------------------------------------------------------------------- forward
    def _check_size(self, h: int, w: int) -> None:
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {self.patch_size}")
        gh, gw = h // self.patch_size, w // self.patch_size
        for (lh, lw) in layer_sizes(self.layers, h, w):
            if lh % gh or lw % gw:
                raise ValueError(f"stack produces a {lh}x{lw} map from {h}x{w} images, not a multiple "
                                 f"of the {gh}x{gw} patch grid")

    def check_inputs(self, images: torch.Tensor, visible: torch.Tensor | None) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W]; got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        if c != self.in_chans:
            raise ValueError(f"expected images with {self.in_chans} channels [B, {self.in_chans}, H, W]; "
                             f"got shape {tuple(images.shape)}")
        self._check_size(h, w)
        if self.strict_img_size and self.img_size is not None and (h, w) != self.img_size:
            raise ValueError(f"image size {h}x{w} does not match the model's {self.img_size[0]}x{self.img_size[1]} "
                             "(strict_img_size; timm: create the model with dynamic_img_size=True)")
        if visible is not None:
            expected = (b, h // self.patch_size, w // self.patch_size)
            if visible.dtype != torch.bool:
                raise ValueError(f"visible must be a bool tensor of shape {list(expected)}; got dtype {visible.dtype}")
            if tuple(visible.shape) != expected:
                raise ValueError(f"visible must have shape {list(expected)} (batch, H/P, W/P); "
                                 f"got {list(visible.shape)}")
            if visible.device != images.device:
                raise ValueError(f"visible is on {visible.device} but images are on {images.device}")

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(images, visible)
        if self.masking == "leaky" and visible is not None:
            self.last_backend = "dense (leaky)"
            out = _backend_module("dense").run_leaky(self.layers, images, visible)
        else:
            name = self.pick_backend(images, visible)
            self.last_backend = name
            out = _backend_module(name).run(self.layers, images, visible)  # [B, D, gh, gw]
        if self.output_fmt == "NCHW":
            return out.contiguous()
        if self.output_fmt == "NHWC":
            return out.permute(0, 2, 3, 1).contiguous()
        return out.flatten(2).transpose(1, 2).contiguous()

    def extra_repr(self) -> str:
        backend = self._backend
        if backend == "auto":
            backend = f"auto (last picked: {self.last_backend or 'none yet'})"
        leaky = ", masking=leaky" if self.masking == "leaky" else ""
        return (f"stack={self.stack_name}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
                f"in_chans={self.in_chans}, backend={backend}{leaky}")
