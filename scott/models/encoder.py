"""ViT encoder over SCOTT tokens: tokenizer + fixed sin-cos positions + transformer blocks."""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import Block

from ..tokenizer import Tokenizer, gather_visible
from .pos_embed import sincos_2d

__all__ = ["Encoder", "build_encoder", "encoder_kwargs", "ARCH_KEYS", "CONTEXT_MODES", "GLOBAL_POOLS",
           "pool_tokens", "init_transformer_", "touch"]

CONTEXT_MODES = ("all", "visible")
#: How patch tokens become one feature vector: ``avg`` (mean over tokens, I-JEPA's), ``gridK``
#: (means over a K x K grid of overlapping regions, concatenated: K*K*D, keeps coarse layout) or
#: ``flat`` (every token, concatenated: N*D, keeps the whole layout; for small patch grids).
GLOBAL_POOLS = ("avg", "grid2", "grid3", "flat")


def pool_tokens(tokens: torch.Tensor, grid_size, pool: str = "avg") -> torch.Tensor:
    """``[B, N, D]`` tokens of a ``grid_size = (gh, gw)`` patch grid -> ``[B, F]`` features."""
    if pool == "avg":
        return tokens.mean(dim=1)
    if pool == "flat":
        return tokens.flatten(1)
    if pool not in GLOBAL_POOLS:
        raise ValueError(f"pool must be one of {GLOBAL_POOLS}, got {pool!r}")
    k = int(pool[4:])
    b, n, d = tokens.shape
    gh, gw = int(grid_size[0]), int(grid_size[1])
    if gh * gw != n:
        raise ValueError(f"{n} tokens do not fill a {gh}x{gw} grid")
    grid = tokens.transpose(1, 2).reshape(b, d, gh, gw)
    return F.adaptive_avg_pool2d(grid, (min(k, gh), min(k, gw))).flatten(1)


def init_transformer_(blocks: nn.ModuleList, *extra: nn.Module) -> None:
    """ViT initialisation: truncated-normal(0.02) linears, unit LayerNorms, and the output
    projections of block ``i`` (1-based) scaled by ``1 / sqrt(2 i)`` for a stable residual stream."""
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    for module in (blocks, *extra):
        module.apply(_init)
    with torch.no_grad():
        for i, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * i))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))


def touch(x: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """``x`` plus an exact zero that depends on ``param``.

    Used when a forward pass does not need ``param`` (e.g. the mask token in ``visible`` mode):
    the parameter then gets a zero gradient instead of none, which distributed data parallel
    training requires of every trainable parameter.
    """
    if torch.is_grad_enabled() and param.requires_grad:
        return x + param.flatten()[0].to(x.dtype) * 0.0
    return x


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float = 0.0) -> nn.ModuleList:
    """``depth`` pre-norm transformer blocks (timm ``Block``, qkv bias, LayerNorm eps 1e-6);
    stochastic depth rising linearly from 0 to ``drop_path_rate`` (0: none, the default)."""
    norm = partial(nn.LayerNorm, eps=1e-6)
    rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
    return nn.ModuleList([Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm,
                                drop_path=rate) for rate in rates])


#: Encoder arguments that fix what its parameters mean (an export loads only into an encoder that
#: agrees on all of them); ``img_size``, ``in_chans``, ``backend`` and ``global_pool`` do not.
ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "tokenizer", "hidden_dim",
             "token_norm", "tokenizer_masking")


class Encoder(nn.Module):
    """Tokenizer + fixed 2-D sin-cos positions + ViT blocks + final LayerNorm (no CLS token).

    ``forward(images, visible=None, context_tokens="all")``:

    * ``visible=None``: the full image, ``[B, N, D]``.
    * ``context_tokens="all"``: every position; the tokens of masked patches are replaced by the
      learnable ``mask_token`` (plus their position), ``[B, N, D]``.
    * ``context_tokens="visible"``: only the visible tokens in row-major order, ``[B, Nv, D]``
      (every image must have the same visible count). ``return_positions=True`` also returns
      their patch indices ``[B, Nv]``.
    * ``return_blocks=True`` also returns the list of every block's output ``[B, N*, D]``
      (residual stream before the final norm), last element last.

    The tokenizer backend can be switched at any time through :attr:`backend` (parameters do
    not depend on it); the target encoder of MIM-JEPA uses ``"dense"`` for full images.
    Positions are computed for the grid of every input, so any image size divisible by the patch
    size works; ``set_input_size`` changes the nominal size (``grid_size``, ``num_patches``).
    ``arch`` holds the construction arguments (recipe ``model`` vocabulary). The timm classifier
    around it is :class:`scott.models.timm_family.ScottViT`.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, tokenizer: str = "scott",
                 backend: str = "auto", hidden_dim: int = 64, token_norm: bool = True,
                 tokenizer_masking: str = "sparse", global_pool: str = "avg", drop_path_rate: float = 0.0,
                 model_cfg=None, eval_transform_spec: dict | None = None, source_path: str | None = None):
        super().__init__()
        # Metadata, set here (by build_encoder / scott.eval.load_encoder), never patched on later:
        # the recipe's model section, the evaluation transform and the file it was loaded from.
        self.model_cfg = model_cfg
        self.eval_transform_spec = dict(eval_transform_spec) if eval_transform_spec is not None else None
        self.source_path = source_path
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        self.global_pool = global_pool
        self.embed_dim = int(embed_dim)
        self.tokenizer = Tokenizer(embed_dim=embed_dim, patch_size=patch_size, in_chans=in_chans,
                                   stack=tokenizer, backend=backend, img_size=img_size,
                                   hidden_dim=hidden_dim, masking=tokenizer_masking)
        # Parameter-free LayerNorm of every token before the positions are added. Without it the
        # conv tokens (norm ~1) are dwarfed by the sin-cos positions (norm sqrt(D/2)) and MIM-JEPA
        # targets become almost purely positional (measured on the demo: 98 % of the target
        # variance was position), a shortcut that stops the encoder learning content.
        # LayerNorm of a masked (all-zero) token is exactly zero, so nothing leaks.
        self.token_norm = bool(token_norm)
        self.grid_size = tuple(self.tokenizer.grid_size)
        self.num_patches = self.tokenizer.num_patches
        self.patch_size = self.tokenizer.patch_size
        self.in_chans = self.tokenizer.in_chans
        self.register_buffer("pos_embed", sincos_2d(*self.grid_size, self.embed_dim)[None], persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.blocks = make_blocks(self.embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)
        self.grad_checkpointing = False
        self.arch = {"img_size": img_size, "patch_size": self.patch_size, "in_chans": self.in_chans,
                     "embed_dim": self.embed_dim, "depth": int(depth), "num_heads": int(num_heads),
                     "mlp_ratio": float(mlp_ratio), "tokenizer": tokenizer, "hidden_dim": int(hidden_dim),
                     "token_norm": self.token_norm, "tokenizer_masking": tokenizer_masking}
        self.norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        init_transformer_(self.blocks, self.norm)

    # ------------------------------------------------------------------ backend
    @property
    def backend(self) -> str:
        """The tokenizer backend (``auto``, ``dense``, ``tiles`` or ``spconv``)."""
        return self.tokenizer.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.tokenizer.backend = name

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides 1-D ones and biases (timm's convention,
        read by ``scott.optim_groups``): the mask token."""
        return {"mask_token"}

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """New nominal image size (and patch size, ``patchify`` stack only): ``grid_size``,
        ``num_patches`` and the cached positions follow (timm's ``set_input_size``)."""
        self.tokenizer.set_input_size(img_size=img_size, patch_size=patch_size)
        self.patch_size = self.tokenizer.patch_size
        self.grid_size = tuple(self.tokenizer.grid_size)
        self.num_patches = self.tokenizer.num_patches
        self.arch.update(img_size=list(self.tokenizer.img_size), patch_size=self.patch_size)
        self.pos_embed = sincos_2d(*self.grid_size, self.embed_dim)[None].to(self.pos_embed.device)

    # ------------------------------------------------------------------ forward
    def positions_for(self, images: torch.Tensor) -> torch.Tensor:
        """Sin-cos positions ``[1, N, D]`` for the patch grid of ``images``."""
        gh, gw = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        if (gh, gw) == self.grid_size:
            return self.pos_embed
        return sincos_2d(gh, gw, self.embed_dim)[None].to(self.pos_embed.device)

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None,
                context_tokens: str = "all", return_positions: bool = False, return_blocks: bool = False):
        if context_tokens not in CONTEXT_MODES:
            raise ValueError(f"context_tokens must be one of {CONTEXT_MODES}, got {context_tokens!r}")
        tokens = self.tokenizer(images, visible)                    # [B, N, D], masked = 0
        if self.token_norm:
            tokens = F.layer_norm(tokens, tokens.shape[-1:])
        pos = self.positions_for(images).to(tokens.dtype)
        b, n, _ = tokens.shape
        if visible is None:
            x = tokens + pos
            positions = torch.arange(n, device=tokens.device).expand(b, n)
        elif context_tokens == "all":
            keep = visible.reshape(b, n, 1)
            x = torch.where(keep, tokens, self.mask_token.to(tokens.dtype)) + pos
            positions = torch.arange(n, device=tokens.device).expand(b, n)
        else:
            x, positions = gather_visible(tokens, visible)
            x = x + pos[0][positions]
        if visible is None or context_tokens == "visible":
            x = touch(x, self.mask_token)
        blocks = []
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            blocks.append(x)
        x = self.norm(x)
        out = (x, positions) if return_positions else x
        if return_blocks:  # the residual stream after every block, before the final norm
            return (*out, blocks) if return_positions else (out, blocks)
        return out

    def pool(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``tokens`` of full ``images`` pooled as :attr:`global_pool` says."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return pool_tokens(tokens, grid, self.global_pool)

    @torch.no_grad()
    def forward_features_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled patch tokens of full images (``global_pool``), ``[B, F]`` (for evaluation)."""
        return self.pool(self.forward(images), images)


def encoder_kwargs(model_cfg) -> dict:
    """:class:`Encoder` keyword arguments from a recipe's ``model`` section (a typed section or a
    mapping, completed from the schema by ``scott.config.as_section``)."""
    from scott.config import as_section

    m = as_section("model", model_cfg)
    return dict(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
                depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, tokenizer=m.tokenizer,
                backend=m.backend, hidden_dim=m.hidden_dim, token_norm=m.token_norm,
                tokenizer_masking=m.tokenizer_masking, global_pool=m.global_pool)


def build_encoder(model_cfg, backend: str | None = None, eval_transform_spec: dict | None = None,
                  source_path: str | None = None) -> Encoder:
    """Encoder from the recipe's ``model`` section; ``backend`` overrides ``model.backend``.

    The encoder carries its metadata: ``model_cfg`` (the typed section, backend included),
    ``eval_transform_spec`` (given, else the section's default evaluation transform) and
    ``source_path`` (the file it was loaded from, if any).
    """
    from scott.config import as_section
    from scott.data.transforms import eval_transform_spec as default_spec

    model = as_section("model", model_cfg)
    if backend:
        model = as_section("model", {**model, "backend": backend})
    spec = eval_transform_spec if eval_transform_spec is not None else default_spec(model)
    return Encoder(**encoder_kwargs(model), model_cfg=model, eval_transform_spec=spec, source_path=source_path)
