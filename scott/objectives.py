"""Self-supervised objectives: MIM-JEPA (latent targets) and pixel regression (MAE/SimMIM style).

Both share the same pipeline: the context encoder sees the masked image (``visible`` patches
only), the predictor fills in the masked positions, and the loss is computed on the TARGET
patches only. The masks are an explicit argument of ``forward``::

    loss, stats = objective(images_ctx, images_tgt, masks)   # masks: MaskBatch or visible [B, gh, gw]

A plain ``visible`` tensor means ``target = ~visible``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import as_section
from .ema import update_ema
from .self_distillation import SelfDistillation
from .decorrelation import center_by_position, covariance_term, variance_term
from .masks import MaskBatch
from .optim_groups import param_groups
from .models import build_encoder, build_predictor

__all__ = ["MIMJEPA", "PixelObjective", "build_objective", "masked_loss", "patchify",
           "normalise_patches", "LOSSES"]

LOSSES = ("smooth_l1", "l2")


def masked_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Mean per-element loss over the tokens where ``weight [B, Q]`` (bool) is True.

    ``pred`` and ``target`` are ``[B, Q, C]``. Tokens outside ``weight`` contribute nothing
    (neither to the value nor to the gradient). ``smooth_l1`` uses beta = 1; ``l2`` is the mean
    squared error.
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    elif kind == "l2":
        per = F.mse_loss(pred, target, reduction="none")
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    per_token = per.mean(dim=-1)
    w = weight.to(per_token.dtype)
    per_token = torch.where(weight, per_token, torch.zeros_like(per_token))
    return per_token.sum() / w.sum().clamp(min=1.0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, P*P*C]`` patches in row-major order (pixel order y, x, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation to zero mean and unit variance (MAE's ``norm_pix_loss``)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


def _as_masks(masks) -> MaskBatch:
    if isinstance(masks, MaskBatch):
        return masks
    if isinstance(masks, torch.Tensor):
        return MaskBatch(masks, ~masks)
    raise TypeError(f"masks must be a MaskBatch or a bool visible tensor, got {type(masks).__name__}")


def _indices(mask_flat: torch.Tensor) -> torch.Tensor:
    """Row-major indices ``[B, K]`` of the True entries of ``mask_flat [B, N]`` (same K per row)."""
    b = mask_flat.shape[0]
    return mask_flat.nonzero()[:, 1].reshape(b, -1)


class _MaskedPrediction(nn.Module):
    """Context encoder + predictor; subclasses define the regression targets."""

    def __init__(self, model_cfg, objective_cfg, predictor_out: int | None = None):
        super().__init__()
        model = as_section("model", model_cfg)
        objective = as_section("objective", objective_cfg)
        self.context_tokens = model.context_tokens
        self.loss_kind = objective.loss
        self.num_masks = objective.num_masks
        self.global_weight = objective.global_weight
        self.global_view = objective.global_view
        self.var_weight = objective.var_weight
        self.cov_weight = objective.cov_weight
        self.decorrelation_center = objective.decorrelation_center
        self.model_cfg = model
        self.context_encoder = build_encoder(model)
        self.predictor = build_predictor(model, self.context_encoder.grid_size, out_dim=predictor_out)
        # data2vec 2.0's global term: the mean of the context encoder's visible tokens, through
        # a linear head, regresses the mean of the image's target tokens. Built only when used,
        # so recipes without it keep their exact state dict.
        self.global_head = (nn.Linear(self.context_encoder.embed_dim, self.predictor.out_dim)
                            if self.global_weight > 0 else None)
        if self.global_head is not None:
            nn.init.trunc_normal_(self.global_head.weight, std=0.02)
            nn.init.zeros_(self.global_head.bias)
        # DINO-style cross-view self-distillation of the pooled tokens (MIM-JEPA only; built only
        # when used, so other recipes keep their exact state dict)
        self.dino_weight = objective.dino_weight
        self.distill = None
        if self.dino_weight > 0:
            self.distill = SelfDistillation(self.context_encoder.embed_dim, objective.dino_prototypes,
                                            objective.dino_student_temp, objective.dino_teacher_temp,
                                            objective.dino_center_momentum)

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules = {"context_encoder": self.context_encoder, "predictor": self.predictor}
        if self.global_head is not None:
            modules["global_head"] = self.global_head
        if self.distill is not None:
            modules["dino_head"] = self.distill.head
        return modules

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups of the trainable modules (``scott.optim_groups.param_groups``)."""
        return param_groups(self.trainable_modules(), weight_decay)

    def update_target(self, momentum: float) -> None:
        """EMA update of the target encoder and the teacher head (no-op for objectives without one)."""

    def export_encoder(self) -> nn.Module:
        """The encoder to save for evaluation."""
        return self.context_encoder

    def predict(self, images_ctx: torch.Tensor, masks: MaskBatch):
        """``(predictions [B, Q, out], query_positions [B, Q] | None, weight [B, Q] bool,
        context_mean [B, D], visible_tokens [M, D], visible_positions [M])``.

        ``all`` mode predicts every position (``query_positions=None``, Q = N); ``visible`` mode
        predicts every non-visible position. ``weight`` marks the target patches among the queries.
        ``context_mean`` is the mean of the visible context tokens (the global terms' input);
        ``visible_tokens`` are the context encoder's visible tokens of the whole batch, one row each
        (the variance / covariance terms' input), and ``visible_positions`` each row's grid position.
        """
        visible = masks.visible
        b = visible.shape[0]
        target_flat = masks.target.reshape(b, -1)
        if self.context_tokens == "all":
            ctx = self.context_encoder(images_ctx, visible, context_tokens="all")
            keep = visible.reshape(b, -1, 1).to(ctx.dtype)
            mean = (ctx * keep).sum(1) / keep.sum(1).clamp(min=1)
            rows = visible.reshape(b, -1)
            return self.predictor(ctx), None, target_flat, mean, ctx[rows], rows.nonzero()[:, 1]
        ctx, ctx_pos = self.context_encoder(images_ctx, visible, context_tokens="visible", return_positions=True)
        query_pos = _indices(~visible.reshape(b, -1))
        pred = self.predictor(ctx, ctx_pos, query_pos)
        return (pred, query_pos, target_flat.gather(1, query_pos), ctx.mean(1), ctx.flatten(0, 1),
                ctx_pos.flatten())

    @staticmethod
    def _select(tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None:
            return tokens
        return tokens.gather(1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    def targets(self, images_ctx: torch.Tensor, images_tgt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images_ctx: torch.Tensor, images_tgt: torch.Tensor, masks,
                images_global: torch.Tensor | None = None):
        """``(loss, stats)`` for a batch; ``masks`` is a :class:`MaskBatch` or a visible tensor.

        ``images_global`` (optional) is a third view of each image (another crop): its mean
        target token is what the global head regresses (``objective.global_view: crop``) and what
        the self-distillation teacher sees (``objective.dino_weight``, required there).

        ``stats`` holds detached scalars: ``loss``, ``num_visible`` and ``num_target`` (patches
        per image), ``pred_std`` / ``target_std`` (mean per-channel std over all predicted
        tokens; a collapsing representation drives ``target_std`` to 0), ``target_abs`` and,
        with self-distillation, ``dino_loss``.
        """
        masks = _as_masks(masks)
        b, m = images_ctx.shape[0], self.num_masks
        if masks.visible.shape[0] != b * m:
            raise ValueError(f"{masks.visible.shape[0]} masks for {b} images; objective.num_masks={m} "
                             f"needs {b * m} (masks of image i at rows i*{m} .. i*{m}+{m - 1})")
        with torch.no_grad():
            full_target = self.targets(images_ctx, images_tgt)      # one target pass per image
        if m > 1:  # several context masks per image share that one target pass (data2vec 2.0)
            images_ctx = images_ctx.repeat_interleave(m, dim=0)
            full_target = full_target.repeat_interleave(m, dim=0)
        pred, query_pos, weight, ctx_mean, ctx_tokens, ctx_positions = self.predict(images_ctx, masks)
        target = self._select(full_target, query_pos)
        loss = masked_loss(pred, target, weight, self.loss_kind)
        extra_stats = {}
        if (self.var_weight > 0 or self.cov_weight > 0) and self.decorrelation_center == "position":
            ctx_tokens = center_by_position(ctx_tokens, ctx_positions, masks.visible[0].numel())
        if self.var_weight > 0:  # VICReg's terms on the visible context tokens (C-JEPA)
            var = variance_term(ctx_tokens)
            loss = loss + self.var_weight * var
            extra_stats["var_term"] = var.detach()
        if self.cov_weight > 0:
            cov = covariance_term(ctx_tokens)
            loss = loss + self.cov_weight * cov
            extra_stats["cov_term"] = cov.detach()
        if self.global_head is not None or self.distill is not None:
            other_view = None  # the target encoder's tokens of the third view, computed once
            if images_global is not None:
                with torch.no_grad():
                    other_view = self.targets(images_global, images_global).float()
                other_view = other_view.repeat_interleave(m, dim=0)
            if self.global_head is not None:
                cross = self.global_view == "crop" and other_view is not None
                global_target = (other_view if cross else full_target).float().mean(1)
                global_target = F.layer_norm(global_target, global_target.shape[-1:])
                pooled = self.global_head(ctx_mean)
                ones = torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device)
                global_loss = masked_loss(pooled.unsqueeze(1), global_target.unsqueeze(1), ones, self.loss_kind)
                loss = loss + self.global_weight * global_loss
            if self.distill is not None:
                if other_view is None:
                    raise ValueError("objective.dino_weight needs a third view (another crop) of each image")
                dino = self.distill(ctx_mean, other_view.mean(1))
                loss = loss + self.dino_weight * dino
                extra_stats["dino_loss"] = dino.detach()
        with torch.no_grad():
            sel = weight.unsqueeze(-1)
            stats = {
                "loss": loss.detach(),
                "num_visible": float(masks.num_visible),
                "num_target": weight.float().sum(1).mean(),
                "pred_std": pred.float().flatten(0, 1).std(dim=0).mean(),
                "target_std": target.float().flatten(0, 1).std(dim=0).mean(),
                "target_abs": (target.float().abs() * sel).sum() / (sel.sum() * target.shape[-1]).clamp(min=1),
                **extra_stats,
            }
        return loss, stats


class MIMJEPA(_MaskedPrediction):
    """MIM-JEPA: predict the EMA target encoder's (LayerNorm-ed) features of the target patches.

    The target encoder is a copy of the context encoder with the ``dense`` tokenizer backend; it
    sees the full ``images_tgt``, never receives gradients and always runs in eval mode.
    """

    def __init__(self, model_cfg, objective_cfg):
        super().__init__(model_cfg, objective_cfg)
        objective = as_section("objective", objective_cfg)
        self.center_targets = objective.center_targets
        self.target_norm = objective.target_norm
        self.target_layers = objective.target_layers
        depth = len(self.context_encoder.blocks)
        if self.target_layers < 1 or (self.target_layers > 1 and self.target_layers > depth):
            raise ValueError(f"objective.target_layers must be 1 or in [2, model.depth={depth}], "
                             f"got {self.target_layers}")
        self.target_encoder = build_encoder(self.model_cfg, backend="dense")
        self.target_encoder.load_state_dict(self.context_encoder.state_dict())
        self.target_encoder.requires_grad_(False)
        self.target_encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.target_encoder.eval()
        return self

    @torch.no_grad()
    def targets(self, images_ctx, images_tgt):
        """LayerNorm-ed target tokens ``[B, N, D]``: of the final output (``target_layers=1``), or
        the average of the last ``target_layers`` blocks (data2vec 2.0), each layer normalised by
        :meth:`_norm_layer` first;
        with ``center_targets`` the batch mean of each position is removed first."""
        if self.target_layers == 1:
            feats = self.target_encoder(images_tgt)
            targets = F.layer_norm(self._norm_layer(feats.float()), (feats.shape[-1],))
        else:
            _, blocks = self.target_encoder(images_tgt, return_blocks=True)
            layers = [self._norm_layer(x.float()) for x in blocks[-self.target_layers:]]
            mean = torch.stack(layers).mean(0)
            targets = F.layer_norm(mean, mean.shape[-1:])
        if self.center_targets:
            # Remove what every image has at a position (the part a predictor can guess from its
            # positional query alone): subtract the batch mean per position, normalise again.
            targets = targets - targets.mean(dim=0, keepdim=True)
            targets = F.layer_norm(targets, targets.shape[-1:])
        return targets

    def _norm_layer(self, x: torch.Tensor) -> torch.Tensor:
        """One target layer ``[B, N, D]`` normalised as ``objective.target_norm`` says: ``layer``
        (each token over its channels) or ``instance`` (each channel over the image's tokens,
        data2vec 2.0's choice: what all patches of an image share is removed)."""
        if self.target_norm == "instance":
            return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.layer_norm(x, x.shape[-1:])

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        update_ema(self.target_encoder, self.context_encoder, momentum)
        if self.distill is not None:
            self.distill.update_teacher(momentum)

    def export_encoder(self) -> nn.Module:
        return self.target_encoder


class PixelObjective(_MaskedPrediction):
    """Pixel regression of the masked patches (MAE / SimMIM style) with the same encoder and
    predictor. Targets are the patches of ``images_ctx`` (the unmasked context view),
    per-patch normalised when ``norm_pix``; ``images_tgt`` is ignored."""

    def __init__(self, model_cfg, objective_cfg):
        model = as_section("model", model_cfg)
        super().__init__(model, objective_cfg, predictor_out=model.patch_size ** 2 * model.in_chans)
        self.norm_pix = as_section("objective", objective_cfg).norm_pix

    @torch.no_grad()
    def targets(self, images_ctx, images_tgt):
        patches = patchify(images_ctx.float(), self.context_encoder.patch_size)
        return normalise_patches(patches) if self.norm_pix else patches


OBJECTIVES = {"mimjepa": MIMJEPA, "pixel": PixelObjective}


def build_objective(recipe: dict) -> nn.Module:
    """The objective named by ``recipe["objective"]["name"]`` built from the ``model`` section."""
    objective = as_section("objective", recipe["objective"] if "objective" in recipe else {})
    return OBJECTIVES[objective.name](recipe["model"], objective)
