"""The scott ViT family as timm models: ``timm.create_model("scott_vit_small", num_classes=37)``.

``import scott`` registers eight models with timm (``timm.list_models("scott_*")``):

=====================  =========  ==========================  =================================
name                   tokenizer  D / depth / heads            input (``pretrained_cfg``)
=====================  =========  ==========================  =================================
scott_vit_cpu          small      192 / 6 / 3 (size ``cpu``)   1 x 28 x 28, patch 4, hidden 32
scott_vit_tiny         scott      192 / 12 / 3                 3 x 224 x 224, patch 16
scott_vit_small        scott      384 / 12 / 6                 3 x 224 x 224, patch 16
scott_vit_base         scott      768 / 12 / 12                3 x 224 x 224, patch 16
scott_vit_*_patchify   patchify   as above                     as above (plain ViT baseline)
=====================  =========  ==========================  =================================

The widths are the recipes' ``model.size`` presets (``scott.config.SIZE_PRESETS``); the ``cpu``
geometry is ``recipes/fashion_mnist.yaml``'s. Any :class:`ScottViT` argument can be passed to
``create_model`` (``embed_dim=128, depth=4, num_heads=4`` for the demo recipe's encoder);
:func:`model_args_from_export` reads them from an export.

Every model is a :class:`ScottViT`: the project's one :class:`~scott.models.encoder.Encoder` plus
a classifier (pool -> LayerNorm -> dropout -> Linear), with timm's conventions. An exported
``encoder.safetensors`` loads through timm's own pretrained machinery::

    model = timm.create_model("scott_vit_small", pretrained=True, num_classes=37,
                              pretrained_cfg_overlay=dict(file="runs/pets/encoder.safetensors"))

:func:`checkpoint_filter_fn` then checks the export's sha256 and that its ``model`` metadata
agrees with the model on every parameter-defining argument (``ARCH_KEYS``), prefixes the keys
with ``encoder.``, keeps the freshly initialised classifier, and records the export's evaluation
transform (size, channels, mean/std, crop) in ``model.pretrained_cfg`` so that
``timm.data.resolve_data_config(model=model)`` reproduces it. A state dict of a whole ScottViT
(e.g. a timm fine-tuning checkpoint) passes through unchanged.

The masked path is explicit: ``forward_features(x, visible=mask)``. (Using the tokenizer as
``embed_layer`` of timm's own ``VisionTransformer`` cannot pass a mask; see docs/tokenizer.md.)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..config import SIZE_PRESETS
from ..tokenizer.layers import Conv
from .encoder import ARCH_KEYS, GLOBAL_POOLS, Encoder, encoder_kwargs, pool_tokens

__all__ = ["ScottViT", "checkpoint_filter_fn", "model_args_from_export", "data_cfg_from_spec", "POOLS",
           "FAMILY"]

#: Pools of the classifier: the encoder's (``GLOBAL_POOLS``) and ``""`` (no pooling, timm's
#: convention: ``forward_head`` maps every token).
POOLS = (*GLOBAL_POOLS, "")

#: size -> (tokenizer stack of the SCOTT variant, img_size, patch_size, in_chans, hidden_dim)
_GEOMETRY = {
    "cpu": ("small", 28, 4, 1, 32),
    "tiny": ("scott", 224, 16, 3, 64),
    "small": ("scott", 224, 16, 3, 64),
    "base": ("scott", 224, 16, 3, 64),
}


def _family() -> dict[str, dict]:
    out = {}
    for size, (stack, img, patch, chans, hidden) in _GEOMETRY.items():
        dim, depth, heads = SIZE_PRESETS[size]
        base = dict(img_size=img, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth,
                    num_heads=heads, mlp_ratio=4.0, hidden_dim=hidden)
        out[f"scott_vit_{size}"] = dict(base, tokenizer=stack)
        out[f"scott_vit_{size}_patchify"] = dict(base, tokenizer="patchify")
    return out


#: registered name -> its :class:`ScottViT` arguments
FAMILY: dict[str, dict] = _family()


def data_cfg_from_spec(spec: dict) -> dict:
    """timm data-config entries (``input_size``, ``mean``, ``std``, ``crop_pct``,
    ``interpolation``, ``crop_mode``) of a scott evaluation transform spec."""
    size = int(spec["img_size"])
    return dict(input_size=(int(spec["in_chans"]), size, size), mean=tuple(spec["mean"]), std=tuple(spec["std"]),
                crop_pct=size / float(spec["resize"]), interpolation=spec.get("interpolation", "bicubic"),
                crop_mode="center")


def _cfg(img_size: int, in_chans: int, first_conv: str | None = "encoder.tokenizer.layers.0", **kwargs) -> dict:
    from scott.data.transforms import eval_transform

    return {
        "url": "",
        "num_classes": 0,  # exports carry no classifier
        "pool_size": None,
        "fixed_input_size": False,  # sin-cos positions are computed for every grid
        **data_cfg_from_spec(eval_transform(img_size, in_chans).spec),
        "first_conv": first_conv,
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg(a["img_size"], a["in_chans"]) for name, a in FAMILY.items()})


def _head(width: int, num_classes: int) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(width, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


class ScottViT(nn.Module):
    """Encoder -> pool (``global_pool``) -> LayerNorm -> dropout -> Linear, with timm's API.

    Args are the :class:`~scott.models.encoder.Encoder`'s (recipe ``model`` names) plus
    ``num_classes`` (0: no head, ``forward`` returns pooled features), ``global_pool`` (one of
    :data:`POOLS`; default: the encoder's, ``avg``), ``drop_rate`` (before the head),
    ``drop_path_rate`` (stochastic depth of the blocks), ``fc_norm`` (LayerNorm after pooling),
    ``dynamic_img_size`` (default True: any size divisible by the patch size; False: only
    ``img_size``, like timm's strict patch embedding). ``encoder=`` wraps an existing encoder
    instead of building one (its architecture arguments are then the encoder's).

    timm conventions: ``forward_features(x, visible=None, context_tokens="all") -> [B, N, D]``
    (the encoder's tokens; ``visible`` is the explicit patch mask), ``forward_head(x,
    pre_logits=False)``, ``reset_classifier(num_classes, global_pool=None)``, ``get_classifier()``,
    ``no_weight_decay()``, ``group_matcher()``, ``set_grad_checkpointing()``,
    ``set_input_size(img_size, patch_size)``, ``num_features``, ``num_classes``,
    ``pretrained_cfg``/``default_cfg``.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str | None = None, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, tokenizer="scott", backend: str = "auto", hidden_dim: int = 64,
                 token_norm: bool = True, tokenizer_masking: str = "sparse", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, fc_norm: bool = True, dynamic_img_size: bool = True,
                 encoder: Encoder | None = None):
        super().__init__()
        if global_pool is not None and global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        if encoder is None:
            encoder = Encoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                              depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, tokenizer=tokenizer,
                              backend=backend, hidden_dim=hidden_dim, token_norm=token_norm,
                              tokenizer_masking=tokenizer_masking,
                              global_pool=global_pool if global_pool in GLOBAL_POOLS else "avg",
                              drop_path_rate=drop_path_rate)
        elif drop_path_rate:
            raise ValueError("drop_path_rate applies only when ScottViT builds its encoder")
        self.encoder = encoder
        self.global_pool = encoder.global_pool if global_pool is None else global_pool
        self.embed_dim = encoder.embed_dim
        self.in_chans = encoder.in_chans
        self.patch_size = encoder.patch_size
        self.dynamic_img_size = bool(dynamic_img_size)
        self.num_prefix_tokens = 0  # no class / register tokens
        self.has_class_token = False
        self.num_classes = int(num_classes)
        self.num_features = self.head_hidden_size = self._pooled_width(self.global_pool, encoder.grid_size)
        self.use_fc_norm = bool(fc_norm)
        self.fc_norm = nn.LayerNorm(self.num_features) if self.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = _head(self.num_features, self.num_classes)
        spec = getattr(encoder, "eval_transform_spec", None)
        first = encoder.tokenizer.layers[0]
        first_conv = "encoder.tokenizer.layers.0" if isinstance(first, Conv) else None
        cfg = _cfg(encoder.tokenizer.img_size[0], self.in_chans, first_conv=first_conv)
        if spec:
            cfg.update(data_cfg_from_spec(spec))
        self.pretrained_cfg = self.default_cfg = cfg  # build_model_with_cfg replaces it with the registered one

    @classmethod
    def from_encoder(cls, encoder: Encoder, num_classes: int, global_pool: str | None = None, **kwargs) -> "ScottViT":
        """Classifier around an existing (e.g. loaded) encoder; pools with its ``global_pool``
        unless ``global_pool`` is given."""
        return cls(num_classes=num_classes, global_pool=global_pool, encoder=encoder, **kwargs)

    # ------------------------------------------------------------------ widths and sizes
    def _pooled_width(self, pool: str, grid) -> int:
        d = self.encoder.embed_dim
        if pool in ("avg", ""):
            return d
        gh, gw = int(grid[0]), int(grid[1])
        if pool == "flat":
            return gh * gw * d
        k = int(pool[4:])
        return min(k, gh) * min(k, gw) * d

    def _grid_for(self, n: int):
        if n == self.encoder.num_patches:
            return self.encoder.grid_size
        side = math.isqrt(n)
        if side * side == n:
            return side, side
        raise ValueError(f"{n} tokens: pass grid_size= to forward_head for global_pool {self.global_pool!r}")

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """New nominal input size (timm convention): the tokenizer's ``img_size``/``grid_size``,
        the cached positions and the model's input traits follow. ``patch_size`` can change only
        for the ``patchify`` tokenizer. A pool whose width depends on the grid (``flat``) refuses
        a new grid: ``reset_classifier(n, global_pool="avg")`` first."""
        tok = self.encoder.tokenizer
        size = img_size if img_size is not None else tok.img_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = self.patch_size if patch_size is None else (patch_size if isinstance(patch_size, int) else patch_size[0])
        new_grid = (size[0] // patch, size[1] // patch)
        if self._pooled_width(self.global_pool, new_grid) != self.num_features:
            raise ValueError(f"global_pool {self.global_pool!r} gives {self.num_features} features on the "
                             f"{self.encoder.grid_size} grid but not on {new_grid}; "
                             "reset_classifier(num_classes, global_pool='avg') first")
        self.encoder.set_input_size(img_size=img_size, patch_size=patch_size)
        self.patch_size = self.encoder.patch_size
        try:
            from timm.models._input import update_model_input_size
        except ImportError:  # older timm: no input traits to update
            return
        update_model_input_size(self, self.encoder.tokenizer.img_size)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory keeps out of weight decay: the mask token (the
        positions are fixed sin-cos buffers, not parameters)."""
        return {"encoder.mask_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise lr decay, the same as scott's ``encoder_layer_id``:
        tokenizer + mask token, each block, then final norms and head together."""
        return dict(stem=r"^encoder\.(?:tokenizer|mask_token)",
                    blocks=r"^encoder\.blocks\.(\d+)", head=r"^encoder\.norm|^fc_norm|^head")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for ``num_classes`` (0: none); a new ``global_pool`` also resets ``fc_norm``
        when it changes the feature width."""
        ref = next(iter(self.encoder.parameters()))
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
            width = self._pooled_width(global_pool, self.encoder.grid_size)
            if width != self.num_features:
                self.num_features = self.head_hidden_size = width
                norm = nn.LayerNorm(width) if self.use_fc_norm else nn.Identity()
                self.fc_norm = norm.to(device=ref.device, dtype=ref.dtype).train(self.training)
        self.num_classes = int(num_classes)
        self.head = _head(self.num_features, self.num_classes).to(device=ref.device, dtype=ref.dtype)
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor, visible: torch.Tensor | None = None,
                         context_tokens: str = "all") -> torch.Tensor:
        """The encoder's tokens ``[B, N, D]`` (``context_tokens="visible"``: ``[B, Nv, D]``)."""
        if not self.dynamic_img_size:
            size = self.encoder.tokenizer.img_size
            if tuple(x.shape[-2:]) != tuple(size):
                raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {tuple(size)} "
                                 "(dynamic_img_size=False); use set_input_size or dynamic_img_size=True")
        return self.encoder(x, visible, context_tokens)

    def pool(self, x: torch.Tensor, pool_type: str | None = None, grid_size=None) -> torch.Tensor:
        """Tokens ``[B, N, D]`` -> ``[B, F]`` with ``pool_type`` (default :attr:`global_pool`)."""
        pool = self.global_pool if pool_type is None else pool_type
        if pool == "":
            return x
        if pool == "avg":
            return x.mean(dim=1)
        return pool_tokens(x, grid_size or self._grid_for(x.shape[1]), pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, grid_size=None) -> torch.Tensor:
        """Pool -> fc_norm -> dropout (``pre_logits``: stop here) -> head."""
        x = self.head_drop(self.fc_norm(self.pool(x, grid_size=grid_size)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return self.forward_head(self.forward_features(x), grid_size=grid)


# ---------------------------------------------------------------------------------------- loading
def _same(a, b) -> bool:
    norm = lambda v: json.dumps(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)  # noqa: E731
    return norm(a) == norm(b)


def _check_export(state_dict: dict, model: ScottViT, path: str) -> None:
    """sha256 and architecture checks of a scott export; updates ``model.pretrained_cfg`` with its
    evaluation transform. Files without scott metadata are left to the strict load."""
    from safetensors import safe_open

    from scott.checkpoint import ENCODER_FORMAT, encoder_digest
    from scott.hub import WEIGHTS_FORMAT

    with safe_open(path, "pt") as fh:
        metadata = dict(fh.metadata() or {})
    if metadata.get("format") not in (ENCODER_FORMAT, WEIGHTS_FORMAT):  # encoder.safetensors, scott.hub folder
        return
    expected = metadata.get("sha256")
    if expected is not None and encoder_digest(state_dict, metadata) != expected:
        raise ValueError(f"{path}: damaged file: its content no longer matches the sha256 recorded when it was "
                         "exported; copy it again from its source or re-export it")
    exported = encoder_kwargs(json.loads(metadata["model"]))
    arch = getattr(model.encoder, "arch", {})
    wrong = {k: (exported[k], arch.get(k)) for k in ARCH_KEYS if not _same(exported[k], arch.get(k))}
    if wrong:
        diff = ", ".join(f"{k}: export {e!r}, model {m!r}" for k, (e, m) in wrong.items())
        raise ValueError(f"{path} does not fit this model ({diff}); create it with the export's arguments: "
                         "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), "
                         "**scott.models.timm_family.model_args_from_export(path))")
    spec = json.loads(metadata.get("eval_transform", "null"))
    cfg = getattr(model, "pretrained_cfg", None)
    if spec and isinstance(cfg, dict):
        cfg.update(data_cfg_from_spec(spec))  # timm reads the source's input_size / mean / std from here


def checkpoint_filter_fn(state_dict: dict, model: ScottViT) -> dict:
    """Map an exported encoder (``encoder.safetensors``: the Encoder's keys) to ``model``'s state
    dict: keys prefixed with ``encoder.``, ``fc_norm``/``head`` kept as initialised. The export is
    verified first (sha256, architecture; see the module docstring). A ScottViT state dict (keys
    already under ``encoder.``) is returned unchanged, its head's class count recorded in
    ``model.pretrained_cfg["num_classes"]`` (timm keeps the head when ``num_classes`` agrees)."""
    cfg = getattr(model, "pretrained_cfg", None)
    folder = (cfg or {}).get("file")
    if folder and Path(folder, "model.safetensors").is_file():  # timm "local-dir:FOLDER": a scott.hub folder
        _check_export(state_dict, model, str(Path(folder, "model.safetensors")))
    if any(k.startswith("encoder.") for k in state_dict):
        if isinstance(cfg, dict):  # the source's head decides whether timm keeps it
            head = state_dict.get("head.weight")
            cfg["num_classes"] = int(head.shape[0]) if head is not None else 0
        return state_dict
    path = (cfg or {}).get("file")
    if path and str(path).endswith(".safetensors"):
        _check_export(state_dict, model, str(path))
    out = {f"encoder.{k}": v for k, v in state_dict.items()}
    for k, v in model.state_dict().items():
        if not k.startswith("encoder."):
            out.setdefault(k, v)
    return out


def model_args_from_export(path_or_run_dir: str | Path, which: str = "target") -> dict:
    """:class:`ScottViT` arguments of an export (run folder or safetensors file), for
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), **args)``:
    the architecture, image size, channels and ``global_pool`` of its ``model`` metadata."""
    from scott.checkpoint import load_encoder_file
    from scott.eval.features import encoder_file

    _state, model_cfg, _spec, _extra = load_encoder_file(encoder_file(path_or_run_dir, which))
    args = encoder_kwargs(model_cfg)
    args.pop("backend")
    return args


def _create(variant: str, pretrained: bool = False, **kwargs) -> ScottViT:
    return build_model_with_cfg(ScottViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **dict(FAMILY[variant], **kwargs))


@register_model
def scott_vit_cpu(pretrained: bool = False, **kwargs) -> ScottViT:
    """SCOTT ViT, size ``cpu`` (D 192, depth 6, 3 heads), ``small`` stack, 28 px grey, patch 4."""
    return _create("scott_vit_cpu", pretrained, **kwargs)


@register_model
def scott_vit_tiny(pretrained: bool = False, **kwargs) -> ScottViT:
    """SCOTT ViT-Ti/16 (D 192, depth 12, 3 heads), the paper's stack, 224 px RGB."""
    return _create("scott_vit_tiny", pretrained, **kwargs)


@register_model
def scott_vit_small(pretrained: bool = False, **kwargs) -> ScottViT:
    """SCOTT ViT-S/16 (D 384, depth 12, 6 heads), the paper's stack, 224 px RGB."""
    return _create("scott_vit_small", pretrained, **kwargs)


@register_model
def scott_vit_base(pretrained: bool = False, **kwargs) -> ScottViT:
    """SCOTT ViT-B/16 (D 768, depth 12, 12 heads), the paper's stack, 224 px RGB."""
    return _create("scott_vit_base", pretrained, **kwargs)


@register_model
def scott_vit_cpu_patchify(pretrained: bool = False, **kwargs) -> ScottViT:
    """Size ``cpu`` with the plain linear patch embedding (28 px grey, patch 4)."""
    return _create("scott_vit_cpu_patchify", pretrained, **kwargs)


@register_model
def scott_vit_tiny_patchify(pretrained: bool = False, **kwargs) -> ScottViT:
    """ViT-Ti/16 with the plain linear patch embedding (the encoder of the patchify baseline)."""
    return _create("scott_vit_tiny_patchify", pretrained, **kwargs)


@register_model
def scott_vit_small_patchify(pretrained: bool = False, **kwargs) -> ScottViT:
    """ViT-S/16 with the plain linear patch embedding."""
    return _create("scott_vit_small_patchify", pretrained, **kwargs)


@register_model
def scott_vit_base_patchify(pretrained: bool = False, **kwargs) -> ScottViT:
    """ViT-B/16 with the plain linear patch embedding."""
    return _create("scott_vit_base_patchify", pretrained, **kwargs)
