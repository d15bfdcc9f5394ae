"""Image transforms: the evaluation transform (with a JSON description) and the pretraining
two-view transform, whose randomness comes only from an explicit ``torch.Generator``.

Evaluation: convert channels to ``in_chans``, resize the shorter side to ``resize`` (bicubic),
center-crop ``img_size``, to tensor, normalise. ``resize`` is ``img_size`` for small images
(<= 64 px, e.g. 28 px Fashion-MNIST) and ``round(img_size / 0.875)`` otherwise (256 for 224).
Normalisation: ImageNet mean/std for 3 channels, 0.5/0.5 for 1 channel. The description
(:func:`eval_transform_spec`) is stored with exported encoders; :func:`transform_from_spec`
rebuilds the exact transform.

Pretraining (``data.augment``):

* ``paper``: RandomResizedCrop(img_size, scale=data.crop_scale, ratio 3/4-4/3, bicubic) and
  horizontal flip (p 0.5), shared by both views; then, drawn per view, with p 0.6 the colour
  block: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, random order)
  with p 0.8, grayscale with p 0.1, Gaussian blur (kernel 9, sigma 0.1-2) with p 0.3;
* ``light``: the shared crop + flip only;
* ``none``: the evaluation geometry (resize + center crop) only.

With ``objective.target_view: jitter`` the target view's colour block is drawn independently
of the context view's; with ``same`` the two views are identical. With ``objective.target_shift:
s`` (pixels, default 0) the target view is then translated by an offset drawn uniformly from
{-s..s} x {-s..s}, edges replicated (:func:`translate_replicate`): the target tokens at a grid
position describe content up to s pixels away, which asks the context encoder for features that
tolerate small displacements. Colour operations work on 1-
and 3-channel images (saturation, hue and grayscale leave 1-channel images unchanged).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from scott.data import colour_ops
from scott.data.datasets import convert_channels

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "TwoViewTransform",
    "PretrainDataset",
    "build_pretrain_transform",
    "eval_transform",
    "eval_transform_spec",
    "norm_stats",
    "translate_replicate",
    "transform_from_spec",
    "view_seed",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SMALL_IMAGE = 64  # images up to this size are resized, not resized-and-cropped
_CROP_RATIO = 0.875
_SPEC_VERSION = 1

# paper augment set (method facts, section 1)
_COLOUR_BLOCK_P = 0.6
_JITTER_P, _JITTER = 0.8, (0.4, 0.4, 0.2, 0.1)
_GRAYSCALE_P = 0.1
_BLUR_P, _BLUR_KERNEL, _BLUR_SIGMA = 0.3, 9, (0.1, 2.0)


def norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) used for ``in_chans`` channels: ImageNet statistics for RGB, 0.5/0.5 for grey."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_chans == 1:
        return (0.5,), (0.5,)
    raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")


def _resize_size(img_size: int) -> int:
    return img_size if img_size <= _SMALL_IMAGE else int(round(img_size / _CROP_RATIO))


# ---------------------------------------------------------------------------------------------
# Evaluation transform
# ---------------------------------------------------------------------------------------------


class EvalTransform:
    """Deterministic evaluation transform: PIL image -> normalised float tensor [C, S, S]."""

    def __init__(self, img_size: int, in_chans: int, mean, std, resize: int | None = None):
        self.img_size, self.in_chans = int(img_size), int(in_chans)
        self.resize = int(resize) if resize is not None else _resize_size(self.img_size)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values, got {self.mean} / {self.std}")

    def geometry(self, img: Image.Image) -> Image.Image:
        img = convert_channels(img, self.in_chans)
        img = TF.resize(img, self.resize, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(img, [self.img_size, self.img_size])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(self.geometry(img)), self.mean, self.std)

    @property
    def spec(self) -> dict:
        """JSON-able description; :func:`transform_from_spec` rebuilds this transform."""
        return {
            "version": _SPEC_VERSION,
            "kind": "resize_center_crop",
            "img_size": self.img_size,
            "resize": self.resize,
            "interpolation": "bicubic",
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __repr__(self) -> str:
        return f"EvalTransform({self.spec})"


def eval_transform(img_size: int, in_chans: int, mean=None, std=None) -> EvalTransform:
    """Evaluation transform for ``img_size`` px, ``in_chans`` channels (default stats: norm_stats)."""
    default_mean, default_std = norm_stats(in_chans)
    return EvalTransform(img_size, in_chans, mean or default_mean, std or default_std)


def eval_transform_spec(model_cfg: dict) -> dict:
    """JSON-able description of the evaluation transform of a recipe's ``model`` section."""
    return eval_transform(model_cfg["img_size"], model_cfg["in_chans"]).spec


def transform_from_spec(spec: dict) -> EvalTransform:
    """Rebuild the evaluation transform described by ``spec`` (from :func:`eval_transform_spec`)."""
    if spec.get("kind") != "resize_center_crop" or spec.get("version") != _SPEC_VERSION:
        raise ValueError(f"unsupported evaluation transform spec: {spec}")
    if spec.get("interpolation", "bicubic") != "bicubic":
        raise ValueError(f"unsupported interpolation {spec['interpolation']!r}")
    return EvalTransform(spec["img_size"], spec["in_chans"], spec["mean"], spec["std"], spec["resize"])


# ---------------------------------------------------------------------------------------------
# Pretraining two-view transform
# ---------------------------------------------------------------------------------------------


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * _rand(g)


def _randint(g: torch.Generator, high: int) -> int:
    """Integer in [0, high)."""
    return int(torch.randint(high, (), generator=g))


def random_crop_box(width: int, height: int, scale, ratio, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect ``ratio``.

    Tries 10 random boxes; falls back to the largest centred box with a valid aspect ratio.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, height - h + 1), _randint(g, width - w + 1), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TwoViewTransform:
    """PIL image + generator -> (context view, target view), normalised tensors [C, S, S].

    With ``extra_view`` a third view follows: another crop of the same image with its own flip
    and colours (the cross-view global target of ``objective.global_view: crop`` and the
    self-distillation teacher's view of ``objective.dino_weight``).
    """

    def __init__(self, img_size: int, in_chans: int, crop_scale=(0.2, 1.0), augment: str = "paper",
                 target_view: str = "jitter", mean=None, std=None, extra_view: bool = False,
                 target_shift: int = 0):
        if augment not in ("paper", "light", "none"):
            raise ValueError(f"augment must be paper, light or none, got {augment!r}")
        if target_view not in ("same", "jitter"):
            raise ValueError(f"target_view must be same or jitter, got {target_view!r}")
        self.eval = eval_transform(img_size, in_chans, mean, std)
        self.img_size, self.in_chans = int(img_size), int(in_chans)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.augment, self.target_view = augment, target_view
        self.target_shift = int(target_shift)
        if not 0 <= 2 * self.target_shift < self.img_size:
            raise ValueError(f"target_shift must be in [0, img_size / 2), got {target_shift}")
        self.extra_view = bool(extra_view)  # a third view: its own crop, flip and colours
        self.blur_kernel = min(_BLUR_KERNEL, self.img_size if self.img_size % 2 else self.img_size - 1)
        self._blur_cache: dict = {}  # the blur's reflect-tap matrices per side length
        self._mean = torch.tensor(self.eval.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.eval.std).view(-1, 1, 1)

    def _geometry(self, img: Image.Image, g: torch.Generator) -> torch.Tensor:
        img = convert_channels(img, self.in_chans)
        if self.augment == "none":
            return TF.to_tensor(self.eval.geometry(img))
        top, left, h, w = random_crop_box(img.width, img.height, self.crop_scale, (3 / 4, 4 / 3), g)
        img = TF.resized_crop(img, top, left, h, w, [self.img_size, self.img_size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        if _rand(g) < 0.5:
            img = TF.hflip(img)
        return TF.to_tensor(img)

    def _colour(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The paper's colour block on a [C, H, W] tensor in [0, 1] (C = 1 or 3)."""
        if _rand(g) >= _COLOUR_BLOCK_P:
            return x
        if _rand(g) < _JITTER_P:
            b, c, s, h = _JITTER
            factors = (_uniform(g, 1 - b, 1 + b), _uniform(g, 1 - c, 1 + c), _uniform(g, 1 - s, 1 + s), _uniform(g, -h, h))
            ops = (colour_ops.adjust_brightness, colour_ops.adjust_contrast,
                   colour_ops.adjust_saturation, colour_ops.adjust_hue)
            for i in torch.randperm(4, generator=g).tolist():
                x = ops[i](x, factors[i])
        if _rand(g) < _GRAYSCALE_P and x.shape[0] == 3:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if _rand(g) < _BLUR_P:
            sigma = _uniform(g, *_BLUR_SIGMA)
            x = colour_ops.gaussian_blur(x, self.blur_kernel, sigma, self._blur_cache)
        return x.clamp(0.0, 1.0)

    def __call__(self, img: Image.Image, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        base = self._geometry(img, g)
        if self.augment != "paper":
            context = target = base
        else:
            context = self._colour(base.clone(), g)
            target = self._colour(base.clone(), g) if self.target_view == "jitter" else context
        if self.target_shift:  # drawn after the colours, so the views without it are unchanged
            s = self.target_shift
            dy, dx = _randint(g, 2 * s + 1) - s, _randint(g, 2 * s + 1) - s
            target = translate_replicate(target, dy, dx)
        normalize = lambda t: t.sub(self._mean).div_(self._std)  # noqa: E731  (TF.normalize's arithmetic)
        context = normalize(context)
        views = (context, normalize(target) if target is not context else context.clone())
        if self.extra_view:  # drawn after the first two, so they are the same with or without it
            other = self._geometry(img, g)
            views += (normalize(self._colour(other, g) if self.augment == "paper" else other),)
        return views

    def __repr__(self) -> str:
        return (f"TwoViewTransform(img_size={self.img_size}, in_chans={self.in_chans}, crop_scale={self.crop_scale}, "
                f"augment={self.augment!r}, target_view={self.target_view!r}, target_shift={self.target_shift})")


def build_pretrain_transform(recipe: dict) -> TwoViewTransform:
    """The two-view transform a recipe asks for (normalisation = its evaluation transform's)."""
    model = recipe["model"]
    spec = eval_transform_spec(model)
    return TwoViewTransform(
        model["img_size"], model["in_chans"], recipe["data"]["crop_scale"], recipe["data"]["augment"],
        recipe["objective"]["target_view"], spec["mean"], spec["std"],
        extra_view=needs_extra_view(recipe["objective"]), target_shift=recipe["objective"]["target_shift"],
    )


def translate_replicate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``[C, H, W]`` image whose pixel (i, j) is ``x``'s (i + dy, j + dx), coordinates clamped
    to the image (edges replicated). A new tensor; ``(0, 0)`` gives a copy."""
    _, h, w = x.shape
    rows = (torch.arange(h) + dy).clamp_(0, h - 1)
    cols = (torch.arange(w) + dx).clamp_(0, w - 1)
    return x[:, rows][:, :, cols]


def needs_extra_view(objective: dict) -> bool:
    """Whether the objective section asks for a third view (another crop) of each image."""
    return ((objective["global_weight"] > 0 and objective["global_view"] == "crop")
            or objective["dino_weight"] > 0)


def view_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit RNG seed from (seed, epoch, index)."""
    words = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class PretrainDataset(torch.utils.data.Dataset):
    """Two augmented views of each image of ``base``, reproducible from (seed, epoch, index).

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` = epoch 0) returns
    ``(view_context, view_target)``; the RNG is a fresh ``torch.Generator`` seeded with
    :func:`view_seed`, so a resumed run draws exactly the same views. ``base`` items are
    ``(PIL image, label)`` with no transform of its own.
    """

    def __init__(self, base, two_view_transform: Callable, seed: int = 0):
        if getattr(base, "transform", None) is not None:
            raise ValueError("PretrainDataset needs a base dataset without its own transform")
        self.base, self.transform, self.seed = base, two_view_transform, int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            epoch, index = key
        else:
            epoch, index = 0, key
        epoch, index = int(epoch), int(index)
        if index < 0:
            index += len(self)
        g = torch.Generator().manual_seed(view_seed(self.seed, epoch, index))
        item = self.base[index]
        img = item[0] if isinstance(item, tuple) else item
        return self.transform(img, g)
