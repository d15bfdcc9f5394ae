"""Load exported encoders and extract frozen features for evaluation.

Public API:
    load_encoder(path_or_run_dir, which=None, device=None, backend=None) -> Encoder (eval mode)
    encoder_file(path_or_run_dir, which=None)   -> Path of the safetensors file
    resolve_which(path_or_run_dir, which=None)  -> "target" | "context": the encoder a path means
    extract_features(encoder, dataset, pool="avg", ...) -> (features, labels)
    PixelEncoder(in_chans, eval_transform_spec)  raw-pixel "encoder" (baseline)
    file_digest(path)                            sha256 of a file (feature-cache key)
    cached_features(cache_dir, key, compute)     safetensors feature cache
    feature_cache_key(encoder_path, split, pool) -> str

Loading never unpickles: weights come from safetensors, the architecture from the JSON
metadata written by ``scott.checkpoint.export_encoder`` ("model" = the recipe's model section,
"eval_transform" = the evaluation transform spec).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from PIL import Image

__all__ = [
    "ENCODER_FILES",
    "encoder_file",
    "resolve_which",
    "load_encoder",
    "extract_features",
    "PixelEncoder",
    "file_digest",
    "feature_cache_key",
    "cached_features",
    "encoder_in_chans",
    "EvalView",
    "resolve_transform",
]

ENCODER_FILES = {"target": "encoder.safetensors", "context": "context_encoder.safetensors"}


# ----------------------------------------------------------------------------- loading
def resolve_which(path_or_run_dir: str | Path, which: str | None = None) -> str:
    """Which encoder ``path_or_run_dir`` stands for: ``"target"`` (EMA) or ``"context"``.

    A run folder: ``which`` when given, else its recipe's ``train.export_encoder``, the encoder
    its ``export/`` carries (``target`` when the folder has no ``recipe.yaml``). An encoder file:
    the encoder it is, as its export recorded (``extra.which``), whatever ``which`` says; ``which``
    (or ``target``) for a file that recorded none. Every tool's ``--which`` default is this one.
    """
    if which is not None and which not in ENCODER_FILES:
        raise ValueError(f"which must be one of {sorted(ENCODER_FILES)}, got {which!r}")
    path = Path(path_or_run_dir)
    if path.is_file():
        recorded = _recorded_which(path)
        return recorded or which or "target"
    if which is not None:
        return which
    recipe = path / "recipe.yaml"
    if not recipe.is_file():
        return "target"
    from scott.config import load_recipe

    return str(load_recipe(recipe, check_data=False)["train"]["export_encoder"])


def _recorded_which(path: Path) -> str | None:
    """The ``which`` an encoder file's metadata records (None if unreadable or absent)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            extra = json.loads((fh.metadata() or {}).get("extra", "{}"))
    except (SafetensorError, OSError, ValueError):  # unreadable: loading the file reports it
        return None
    value = extra.get("which") if isinstance(extra, dict) else None
    return value if value in ENCODER_FILES else None


def encoder_file(path_or_run_dir: str | Path, which: str | None = None) -> Path:
    """The safetensors file for ``which`` encoder of a run folder (or ``path`` itself if a file);
    ``which=None`` means :func:`resolve_which`'s default (the run's ``train.export_encoder``)."""
    which = resolve_which(path_or_run_dir, which)
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / ENCODER_FILES[which]
    if not path.is_file():
        raise FileNotFoundError(f"encoder file not found: {path}")
    return path


def _read_export(path: Path) -> tuple[dict, dict, dict | None]:
    """(state_dict, model_cfg, eval_transform_spec) of an exported encoder; ValueError if unusable."""
    from safetensors import SafetensorError

    from scott.checkpoint import CheckpointError, load_encoder_file

    try:
        state, model_cfg, spec, _extra = load_encoder_file(path)
    except (SafetensorError, CheckpointError, OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a readable scott encoder export (safetensors with 'model' and "
            f"'eval_transform' metadata): {exc}"
        ) from None
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{path}: metadata 'model' is not a mapping")
    return state, model_cfg, spec


def load_encoder(
    path_or_run_dir: str | Path,
    which: str | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Rebuild an exported encoder from safetensors + metadata; returned in eval mode.

    ``path_or_run_dir`` is a run folder (``encoder.safetensors`` for ``which="target"``,
    ``context_encoder.safetensors`` for ``"context"``, the run's ``train.export_encoder`` for
    ``None``: :func:`resolve_which`) or a safetensors file. ``backend``
    overrides the tokenizer backend stored in the metadata. The encoder gets two attributes:
    ``eval_transform_spec`` (the stored evaluation transform) and ``model_cfg``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt file, foreign safetensors file, missing metadata or weights that do
            not match the architecture.
    """
    path = encoder_file(path_or_run_dir, which)
    state, model_cfg, spec = _read_export(path)  # validates the file before anything is built
    from scott.models import build_encoder

    from scott.config import as_section

    model = as_section("model", model_cfg, source=f"{path} (model metadata)")
    encoder = build_encoder(model, backend=backend, eval_transform_spec=spec, source_path=str(path))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match the architecture in its metadata: {exc}") from None
    if device is not None:
        encoder.to(device)
    return encoder.eval()


def encoder_in_chans(encoder: nn.Module) -> int | None:
    """Number of input channels an encoder expects (from its model_cfg or tokenizer), if known."""
    cfg = getattr(encoder, "model_cfg", None) or {}
    if "in_chans" in cfg:
        return int(cfg["in_chans"])
    for owner in (encoder, getattr(encoder, "tokenizer", None)):
        value = getattr(owner, "in_chans", None)
        if isinstance(value, int):
            return value
    return None


class PixelEncoder(nn.Module):
    """Raw-pixel baseline: one "token" holding the flattened (normalised) image.

    ``forward(images)`` -> [B, 1, C*H*W], so average pooling gives the flattened pixels.
    """

    def __init__(self, in_chans: int, eval_transform_spec: dict | None):
        super().__init__()
        self.in_chans = in_chans
        self.eval_transform_spec = eval_transform_spec
        self.model_cfg = {"in_chans": in_chans}

    def forward(self, images: torch.Tensor, visible=None, context_tokens: str = "all") -> torch.Tensor:
        return images.flatten(1).unsqueeze(1)


# ----------------------------------------------------------------------------- extraction
def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        t = image.detach().cpu()
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.is_floating_point():
            t = t.clamp(0, 1)
        return to_pil_image(t)
    raise TypeError(f"dataset items must be PIL images or tensors, got {type(image).__name__}")


def _match_channels(x: torch.Tensor, in_chans: int | None) -> torch.Tensor:
    """Grey <-> RGB on a [C, H, W] tensor so it fits the encoder."""
    if in_chans is None or x.shape[0] == in_chans:
        return x
    if x.shape[0] == 1:
        return x.expand(in_chans, -1, -1).contiguous()
    if in_chans == 1:
        return x.mean(dim=0, keepdim=True)
    raise ValueError(f"cannot feed {x.shape[0]}-channel images to a {in_chans}-channel encoder")


class EvalView(torch.utils.data.Dataset):
    """(image, label) dataset seen through the evaluation transform (colour mode matched)."""

    def __init__(self, dataset, transform: Callable, in_chans: int | None, convert_pil: bool):
        self.dataset, self.transform, self.in_chans, self.convert_pil = dataset, transform, in_chans, convert_pil

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        if self.convert_pil:
            image = _to_pil(image)
            if self.in_chans in (1, 3):
                image = image.convert("L" if self.in_chans == 1 else "RGB")
        x = self.transform(image)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the evaluation transform must return a tensor, got {type(x).__name__}")
        return _match_channels(x, self.in_chans), int(label)


def resolve_transform(encoder: nn.Module, transform: Callable | None,
                      transform_spec: Mapping | None = None) -> tuple[Callable, bool]:
    """(transform, convert_to_pil): an explicit transform as-is, else the transform made from
    ``transform_spec``, else from the encoder's stored spec."""
    if transform is not None:
        return transform, False
    spec = transform_spec if transform_spec is not None else getattr(encoder, "eval_transform_spec", None)
    if spec is None:
        raise ValueError("the encoder has no eval_transform_spec; pass transform= explicitly")
    from scott.data.transforms import transform_from_spec

    return transform_from_spec(spec), True


def _model_device(module: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset,
    pool: str | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    transform: Callable | None = None,
    num_workers: int = 0,
    progress: bool = True,
    description: str = "features",
    transform_spec: Mapping | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of a map-style ``(image, label)`` dataset.

    Images (PIL or tensors) go through ``transform``, else the evaluation transform described by
    ``transform_spec``, else the encoder's stored evaluation transform (grey images are converted
    to the encoder's colour mode). The encoder is
    put in eval mode and run under ``torch.no_grad`` on full images (``visible=None``).

    Returns ``(features, labels)``: features ``[N, D]`` for ``pool="avg"`` (mean over tokens),
    ``[N, K*K*D]`` for ``pool="gridK"`` (means over a K x K grid of regions, concatenated) or
    ``[N, T, D]`` for ``pool="tokens"``, float32 on the CPU; labels ``[N]`` long. ``pool=None``
    uses the encoder's ``global_pool`` (``model.global_pool`` of its recipe; ``avg`` if absent).
    """
    from scott.models.encoder import GLOBAL_POOLS

    pool = pool or getattr(encoder, "global_pool", "avg")
    if pool not in (*GLOBAL_POOLS, "tokens"):
        raise ValueError(f"pool must be one of {(*GLOBAL_POOLS, 'tokens')}, got {pool!r}")
    if len(dataset) == 0:
        raise ValueError("cannot extract features of an empty dataset")
    fn, convert_pil = resolve_transform(encoder, transform, transform_spec)
    view = EvalView(dataset, fn, encoder_in_chans(encoder), convert_pil)
    loader = torch.utils.data.DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = _model_device(encoder, device)
    encoder.to(device)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        with _progress(progress, description, len(dataset)) as advance:
            for images, y in loader:
                tokens = encoder(images.to(device), None, "all")
                out = tokens if pool == "tokens" else _pooled(encoder, tokens, images, pool)
                feats.append(out.float().cpu())
                labels.append(y.long())
                advance(images.shape[0])
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def _pooled(encoder: nn.Module, tokens: torch.Tensor, images: torch.Tensor, pool: str) -> torch.Tensor:
    """One feature vector per image; a single-token "encoder" (raw pixels) is its token."""
    from scott.models.encoder import pool_tokens

    if tokens.shape[1] == 1 or pool == "avg":
        return tokens.mean(dim=1)
    patch = int(getattr(encoder, "patch_size"))
    return pool_tokens(tokens, (images.shape[-2] // patch, images.shape[-1] // patch), pool)


class _progress:
    """Rich progress bar context yielding ``advance(n)``; silent when disabled."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------- caching
def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def feature_cache_key(encoder_path: str | Path, split: str, pool: str, extra: Sequence[str] = ()) -> str:
    """Cache key: encoder file hash + split tag + pool (+ optional extra tags, e.g. dataset name)."""
    safe = [str(s).replace("/", "_").replace(" ", "_") for s in (split, pool, *extra)]
    return "_".join([file_digest(encoder_path)[:20], *safe])


def cached_features(
    cache_dir: str | Path | None,
    key: str,
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``compute()``'s (features, labels), stored as ``cache_dir/key.safetensors``.

    A cached file is reused when present; an unreadable cache file is recomputed. ``cache_dir``
    None disables caching.
    """
    if cache_dir is None:
        return compute()
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        try:
            data = load_file(str(path))
            return data["features"], data["labels"]
        except (SafetensorError, KeyError, OSError):
            pass
    feats, labels = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp), metadata={"key": key})
    tmp.replace(path)
    return feats, labels
