"""Cross-view self-distillation on pooled tokens (DINO / iBOT's [CLS] term), an optional addition
to MIM-JEPA (``objective.dino_weight``).

Masked latent prediction alone learns features that linear probes read well but kNN does not:
nothing asks two crops of one image to land near each other. This term does. The student is the
context encoder's mean visible token of the masked view, through :class:`ProjectionHead`; the
teacher is the EMA target encoder's mean token of ANOTHER crop of the same image, through an EMA
copy of the head. The loss is the cross-entropy between the teacher's centred, sharpened
distribution over ``prototypes`` and the student's (Caron et al. 2021): centring stops one
prototype from winning, sharpening stops the uniform solution.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .ema import update_ema

__all__ = ["ProjectionHead", "SelfDistillation", "distillation_loss"]


class ProjectionHead(nn.Module):
    """DINO's head, scaled down: MLP -> L2-normalised bottleneck -> cosine logits over prototypes."""

    def __init__(self, in_dim: int, prototypes: int, hidden_dim: int = 256, bottleneck_dim: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Linear(bottleneck_dim, prototypes, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        w = F.normalize(self.prototypes.weight, dim=-1)  # weight-normalised prototypes (cosine logits)
        return z @ w.t()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                      student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Mean over rows of ``H(softmax((teacher - center) / teacher_temp), softmax(student / student_temp))``.

    The teacher side carries no gradient. Rows of ``student_logits`` and ``teacher_logits`` pair up.
    """
    teacher = F.softmax((teacher_logits.detach().float() - center) / teacher_temp, dim=-1)
    log_student = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher * log_student).sum(-1).mean()


class SelfDistillation(nn.Module):
    """The student head (trained), its EMA teacher copy and the teacher's running centre."""

    def __init__(self, in_dim: int, prototypes: int, student_temp: float, teacher_temp: float,
                 center_momentum: float):
        super().__init__()
        self.head = ProjectionHead(in_dim, prototypes)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, prototypes))
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.center_momentum = float(center_momentum)

    def forward(self, student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> torch.Tensor:
        """The loss for pooled student features ``[B, D]`` and pooled teacher features ``[B, D]``;
        updates the centre from this batch's teacher logits when training."""
        with torch.no_grad():
            teacher_logits = self.teacher_head(teacher_pooled.float())
        loss = distillation_loss(self.head(student_pooled), teacher_logits, self.center,
                                 self.student_temp, self.teacher_temp)
        if self.training:
            self._update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher_logits: torch.Tensor) -> None:
        batch_center = teacher_logits.float().sum(0, keepdim=True)
        count = torch.tensor(float(teacher_logits.shape[0]), device=batch_center.device)
        if dist.is_available() and dist.is_initialized():  # one centre for every process
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center / count, alpha=1.0 - m)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_ema(self.teacher_head, self.head, momentum)
