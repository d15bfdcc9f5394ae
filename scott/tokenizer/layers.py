"""Layers of a tokenizer stack and the builders of the named stacks.

A stack is an ``nn.ModuleList`` of the layer modules below. Each layer knows:

* ``dense(x)``: its dense computation on an NCHW (or channels-last) tensor, without masking;
* ``out_size(h, w)``: its output resolution;
* ``halo``: ``(before, after)`` input rows/columns needed around an output tile's footprint.

The masked meaning of a stack is fixed once (see :mod:`scott.tokenizer.backends.dense`): the input
is masked, and every layer's output is re-masked at its own resolution. Backends may compute that
meaning however they like, but they read parameters only from these modules (``nn.Conv2d``
layout), so a checkpoint moves between backends unchanged.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Conv",
    "Act",
    "MaxPool",
    "Blur",
    "build_stack",
    "stack_from_description",
    "STACKS",
]


class Conv(nn.Conv2d):
    """A 2-D convolution with odd kernel and 'same'-style padding (``k // 2``), or a patchify
    convolution (kernel == stride, no padding). Parameters keep ``nn.Conv2d``'s layout."""

    kind = "conv"

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = False,
                 init: str = "kaiming"):
        if kernel == stride and kernel > 1:
            padding = 0
        elif kernel % 2 == 1:
            padding = kernel // 2
        else:
            raise ValueError(
                f"Conv kernel must be odd (same padding) or equal to the stride (patchify); "
                f"got kernel={kernel}, stride={stride}")
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=bias)
        if init == "kaiming":
            nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    @property
    def k(self) -> int:
        return self.kernel_size[0]

    @property
    def s(self) -> int:
        return self.stride[0]

    @property
    def p(self) -> int:
        return self.padding[0]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (h + 2 * self.p - self.k) // self.s + 1, (w + 2 * self.p - self.k) // self.s + 1

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, k={self.k}, s={self.s}, bias={self.bias is not None}"


class Act(nn.Module):
    """Element-wise activation with f(0) == 0 (relu or gelu), so masked zeros stay zero.
    ``dense`` is element-wise, so backends apply it to activations of any layout."""

    kind = "act"

    def __init__(self, name: str = "relu"):
        super().__init__()
        if name not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {name!r}")
        self.name = name
        self.s = 1

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.name == "relu" else F.gelu(x)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    def extra_repr(self) -> str:
        return self.name


class MaxPool(nn.Module):
    """Max-pool, kernel 2, stride 1, zero-padded by one row/column at the bottom/right so the
    resolution is kept. Zeros (padding, masked sites) take part in the max like any value."""

    kind = "maxpool"

    def __init__(self):
        super().__init__()
        self.s = 1

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1)), kernel_size=2, stride=1)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w


class Blur(nn.Module):
    """Depthwise 3x3 binomial blur ([1,2,1] x [1,2,1] / 16), zero padding 1, stride 2 (or 1).

    The filter is a fixed, non-persistent buffer: it is not part of any checkpoint."""

    kind = "blur"

    def __init__(self, stride: int = 2):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"Blur stride must be 1 or 2, got {stride}")
        self.s = stride
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("taps", taps / taps.sum(), persistent=False)

    def kernel(self, channels: int, dtype: torch.dtype) -> torch.Tensor:
        """The depthwise ``[channels, 1, 3, 3]`` filter (an expanded view), shared by backends."""
        t = self.taps.to(dtype)
        return (t[:, None] * t[None, :]).expand(channels, 1, 3, 3)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, self.kernel(c, x.dtype), None, self.s, 1, 1, c)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (h - 1) // self.s + 1, (w - 1) // self.s + 1

    def extra_repr(self) -> str:
        return f"s={self.s}"


def _max_blur(stride: int = 2) -> list[nn.Module]:
    return [MaxPool(), Blur(stride)]


def scott_stack(in_chans: int, embed_dim: int, patch_size: int, hidden_dim: int = 64) -> list[nn.Module]:
    """The paper's stack: 2 x [7x7 stride-2 conv (no bias) -> ReLU -> MaxBlurPool(2)], stride 16."""
    if patch_size != 16:
        raise ValueError(f"stack 'scott' has a total stride of 16; got patch_size={patch_size} "
                         f"(use stack='small' for patch 4 or 8)")
    return [Conv(in_chans, hidden_dim, 7, 2), Act("relu"), *_max_blur(),
            Conv(hidden_dim, embed_dim, 7, 2), Act("relu"), *_max_blur()]


def small_stack(in_chans: int, embed_dim: int, patch_size: int, hidden_dim: int = 64) -> list[nn.Module]:
    """SCOTT's shape for 28-64 px images: 2 x [3x3 conv -> ReLU -> MaxBlurPool(2)], the convs'
    strides chosen so the total stride equals the patch size (4, 8 or 16)."""
    strides = {4: (1, 1), 8: (2, 1), 16: (2, 2)}
    if patch_size not in strides:
        raise ValueError(f"stack 'small' supports patch_size 4, 8 or 16; got {patch_size}")
    s1, s2 = strides[patch_size]
    return [Conv(in_chans, hidden_dim, 3, s1), Act("relu"), *_max_blur(),
            Conv(hidden_dim, embed_dim, 3, s2), Act("relu"), *_max_blur()]


def patchify_stack(in_chans: int, embed_dim: int, patch_size: int, hidden_dim: int = 64) -> list[nn.Module]:
    """Plain ViT patch embedding: one linear map per patch (conv kernel = stride = patch, bias)."""
    conv = Conv(in_chans, embed_dim, patch_size, patch_size, bias=True, init="default")
    return [conv]


STACKS = {"scott": scott_stack, "small": small_stack, "patchify": patchify_stack}


def stack_from_description(layers: Sequence, in_chans: int, embed_dim: int) -> list[nn.Module]:
    """Build a custom stack from a list of layer descriptions.

    Each item is a layer module, a string (``"relu"``, ``"gelu"``, ``"maxpool"``, ``"blur"``,
    ``"maxblurpool"``) or a dict such as ``{"conv": {"out": 64, "kernel": 7, "stride": 2}}``
    (``out`` may be omitted on the last conv, which then outputs ``embed_dim``)
    or ``{"blur": {"stride": 1}}``. The last conv's output must be ``embed_dim``.
    """
    mods: list[nn.Module] = []
    ch = in_chans
    items = list(layers)
    conv_positions = [i for i, it in enumerate(items) if _is_conv(it)]
    if not conv_positions:
        raise ValueError("a custom stack needs at least one conv layer")
    for i, item in enumerate(items):
        if isinstance(item, nn.Module):
            mod = item
        elif isinstance(item, str):
            name = item.lower()
            if name in ("relu", "gelu"):
                mod = Act(name)
            elif name == "maxpool":
                mod = MaxPool()
            elif name == "blur":
                mod = Blur(2)
            elif name == "maxblurpool":
                mods.extend(_max_blur())
                continue
            else:
                raise ValueError(f"unknown layer {item!r}; expected relu, gelu, maxpool, blur, "
                                 f"maxblurpool or a {{'conv': {{...}}}} dict")
        elif isinstance(item, dict) and len(item) == 1:
            (name, args), = item.items()
            args = dict(args or {})
            if name == "conv":
                out = args.pop("out", embed_dim if i == conv_positions[-1] else None)
                if out is None:
                    raise ValueError(f"custom stack layer {i}: conv needs 'out' channels")
                mod = Conv(ch, int(out), int(args.pop("kernel", 3)), int(args.pop("stride", 1)),
                           bias=bool(args.pop("bias", False)))
            elif name == "blur":
                mod = Blur(int(args.pop("stride", 2)))
            elif name in ("relu", "gelu"):
                mod = Act(name)
            else:
                raise ValueError(f"unknown layer {name!r} in custom stack item {i}")
            if args:
                raise ValueError(f"custom stack layer {i} ({name}): unknown arguments {sorted(args)}")
        else:
            raise ValueError(f"custom stack item {i} must be a module, a string or a one-key dict; got {item!r}")
        if isinstance(mod, Conv):
            if mod.in_channels != ch:
                raise ValueError(f"custom stack layer {i}: conv expects {mod.in_channels} input "
                                 f"channels but receives {ch}")
            ch = mod.out_channels
        mods.append(mod)
    if ch != embed_dim:
        raise ValueError(f"custom stack ends with {ch} channels; embed_dim is {embed_dim}")
    return mods


def _is_conv(item) -> bool:
    return isinstance(item, Conv) or (isinstance(item, dict) and "conv" in item)


def build_stack(stack, in_chans: int, embed_dim: int, patch_size: int, hidden_dim: int = 64) -> nn.ModuleList:
    """Return the layers of a named stack (``scott``, ``small``, ``patchify``) or a custom list."""
    if isinstance(stack, str):
        if stack not in STACKS:
            raise ValueError(f"unknown stack {stack!r}; choose one of {sorted(STACKS)} or pass a list of layers")
        layers = STACKS[stack](in_chans, embed_dim, patch_size, hidden_dim)
    elif isinstance(stack, Iterable):
        layers = stack_from_description(stack, in_chans, embed_dim)
    else:
        raise TypeError(f"stack must be a name or a list of layers, got {type(stack).__name__}")
    total = 1
    for layer in layers:
        total *= layer.s
    if total != patch_size:
        raise ValueError(f"the stack's total stride is {total} but patch_size is {patch_size}")
    return nn.ModuleList(layers)


def layer_sizes(layers: Sequence[nn.Module], h: int, w: int) -> list[tuple[int, int]]:
    """Output resolution of every layer for an ``h x w`` input."""
    sizes = []
    for layer in layers:
        h, w = layer.out_size(h, w)
        sizes.append((h, w))
    return sizes
