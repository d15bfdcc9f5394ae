"""End-to-end fine-tuning of an exported encoder + linear head on a labelled train split.

The validation split is carved from the labelled train split (``split_train_val``); the model is
trained on the remaining fit part, the epoch with the best validation top-1 is kept, and the test
split is evaluated once with those weights. Runs on Hugging Face Accelerate (CPU, one or several
GPUs); AdamW, linear warm-up + cosine lr, optional layer-wise lr decay.

Public API:
    FinetuneClassifier(encoder, num_classes, global_pool=None)
                                                  ScottViT (the timm model) around encoder:
                                                  encoder -> pooled tokens -> LayerNorm -> Linear
    encoder_layer_id(name, depth)                 layer index of a parameter (for layer decay)
    param_groups(model, weight_decay, layer_decay) AdamW groups with per-group ``lr_scale``
    seeded_init(seed)                             context: the head (or a random encoder) is
                                                  initialised from ``seed``, not from whatever
                                                  the process drew before; the global RNG is kept
    FlipView(dataset)                             random horizontal flips on a tensor dataset
    pooled_features(model, dataset, batch_size)   the frozen model's pooled features, labels
    fit_head(model, features, labels, ...)        train fc_norm + head on frozen features
                                                  (the "LP" of LP-FT) -> per-epoch losses
    fold_standardisation(linear, mean, std)       linear(x) := linear((x - mean) / std)
    finetune(model, fit, val, test, ...)          -> dict of results (``probe_epochs``: LP-FT)
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
import torch.nn as nn

from scott.eval.knn import topk_accuracy
from scott.eval.protocol import mean_per_class_accuracy
from scott.models.timm_family import ScottViT
from scott.optim_groups import adamw
from scott.optim_groups import param_groups as _param_groups
from scott.schedules import warmup_cosine

__all__ = ["FinetuneClassifier", "encoder_layer_id", "param_groups", "seeded_init", "FlipView", "pooled_features",
           "fold_standardisation", "fit_head", "finetune"]


class FinetuneClassifier(ScottViT):
    """The timm model :class:`~scott.models.timm_family.ScottViT` around ``encoder``: encoder
    (all tokens of full images) -> ``global_pool`` -> LayerNorm -> Linear
    (``timm.create_model("scott_vit_*")`` builds the same class; state-dict keys ``encoder.*``,
    ``fc_norm.*``, ``head.*``). ``global_pool=None`` pools as the encoder's own ``global_pool``
    (the recipe's ``model.global_pool``, what the probes read): on the demo's 28 px images the
    flat head fine-tunes 3-5 validation points above the average-pooled one (docs/results.md)."""

    def __init__(self, encoder: nn.Module, num_classes: int, global_pool: str | None = None, fc_norm: bool = True):
        super().__init__(num_classes=num_classes, global_pool=global_pool, encoder=encoder, fc_norm=fc_norm)


def encoder_layer_id(name: str, depth: int) -> int:
    """0 for the tokenizer / embeddings, i + 1 for ``blocks.i``, depth + 1 for the rest (norms, head)."""
    parts = name.split(".")
    if parts[0] == "encoder":
        parts = parts[1:]
    if parts and parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    if parts and parts[0] in ("tokenizer", "mask_token", "pos_embed"):
        return 0
    return depth + 1


def param_groups(model: ScottViT, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups by the project's one decay rule (``scott.optim_groups.param_groups``) with
    ``lr_scale = layer_decay ** (depth + 1 - layer_id)`` (1.0 everywhere when ``layer_decay`` is 1)."""
    depth = len(getattr(model.encoder, "blocks", []))
    return _param_groups(model, weight_decay, layer_of=lambda name: encoder_layer_id(name, depth),
                         layer_decay=layer_decay, top_layer=depth + 1)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build models inside this block to initialise them from ``seed`` alone (the CPU RNG is
    restored afterwards), so a classifier head is the same whatever ran earlier in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


class FlipView(torch.utils.data.Dataset):
    """Horizontal flip with probability ``p`` of ``(tensor [C, H, W], label)`` items (training only)."""

    def __init__(self, dataset, p: float = 0.5):
        self.dataset, self.p = dataset, p

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        if self.p > 0 and float(torch.rand(())) < self.p:
            x = x.flip(-1)
        return x, y


@torch.no_grad()
def _evaluate(model: nn.Module, loader, accelerator) -> dict:
    model.eval()
    scores, labels = [], []
    for images, y in loader:
        logits = model(images)
        logits, y = accelerator.gather_for_metrics((logits, y))
        scores.append(logits.float().cpu())
        labels.append(y.cpu())
    s, y = torch.cat(scores), torch.cat(labels).long()
    top1, top5 = topk_accuracy(s, y, (1, 5))
    return {"top1": top1, "top5": top5, "mean_per_class": mean_per_class_accuracy(s.argmax(1), y)}


@torch.no_grad()
def pooled_features(model: ScottViT, dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, F], labels [N])``: ``model``'s pooled tokens (what ``fc_norm`` receives)
    of every item of ``dataset`` in order, on the model's device, the model in eval mode; its
    train/eval state is kept. Features come back on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            images = images.to(device)
            grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
            feats.append(model.pool(model.forward_features(images), grid_size=grid).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def fold_standardisation(linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rewrite ``linear`` in place so that ``linear(x)`` equals its old ``linear((x - mean) / std)``."""
    w = linear.weight / std
    linear.bias.sub_(w @ mean)
    linear.weight.copy_(w)


def fit_head(model: ScottViT, features: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
             batch_size: int = 64, weight_decay: float = 0.05, label_smoothing: float = 0.1,
             seed: int = 0) -> list[float]:
    """Train ``model.fc_norm`` and ``model.head`` alone on frozen pooled ``features`` (LP-FT's
    linear-probe stage, Kumar et al. 2022: a head fitted before the encoder moves, so the first
    fine-tuning steps do not spend the pretrained features on a random head). AdamW at ``lr``
    with a cosine decay to 0 (weight decay by the project's rule: not on 1-D parameters), the
    fine-tune's loss; the batches are shuffled by ``seed``.

    A model without ``fc_norm`` (``fc_norm=False``: the head reads the pooled features) is fitted
    as the linear probe is: on the features standardised per dimension (mean and standard
    deviation of ``features``), and the standardisation is then folded into the head
    (:func:`fold_standardisation`), so the model computes the same function on raw features.
    Returns the mean training loss of each epoch. The encoder is not touched."""
    if epochs < 1:
        raise ValueError(f"fit_head needs epochs >= 1, got {epochs}")
    device = model.head.weight.device
    x, y = features.to(device).float(), labels.to(device)
    standardise = isinstance(model.fc_norm, nn.Identity)
    if standardise:
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        x = (x - mean) / std
    groups = _param_groups({"fc_norm": model.fc_norm, "head": model.head}, weight_decay)  # the one decay rule
    optimizer = adamw(groups, lr=lr)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    per_epoch = max(1, -(-n // batch_size))
    total, step, losses = epochs * per_epoch, 0, []
    for part in (model.fc_norm, model.head_drop, model.head):
        part.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        running = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, total, lr)
            loss = loss_fn(model.head(model.head_drop(model.fc_norm(x[idx]))), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * len(idx)
            step += 1
        losses.append(running / n)
    if standardise:
        fold_standardisation(model.head, mean, std)
    return losses


def finetune(
    model: ScottViT,
    fit,
    val,
    test,
    epochs: int = 10,
    lr: float = 1e-3,
    min_lr: float = 1e-6,
    warmup_epochs: int = 1,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    layer_decay: float = 1.0,
    label_smoothing: float = 0.1,
    seed: int = 0,
    accelerator=None,
    num_workers: int = 0,
    log: Callable[[str], None] = print,
    probe_epochs: int = 0,
    probe_lr: float = 1e-3,
) -> dict:
    """Fine-tune on ``fit``, pick the epoch with the best ``val`` top-1, evaluate ``test`` once.

    ``fit`` / ``val`` / ``test`` are datasets of ``(tensor image, label)`` (already transformed);
    ``test=None`` is validation only (choosing hyper-parameters): ``test`` is None in the result.
    ``lr`` is the peak lr for a batch of ``batch_size`` per optimiser step. ``probe_epochs`` > 0
    first fits the head alone on the frozen encoder's pooled features of ``fit``
    (:func:`fit_head` at ``probe_lr``: LP-FT) and scores that model on ``val`` as epoch 0, a
    candidate like every fine-tuning epoch. Returns a dict with ``best_epoch`` (0: the fitted
    head, encoder unchanged), ``val`` (metrics of the chosen epoch), ``test``, the per-epoch
    ``history`` and ``probe_losses`` (the head stage's per-epoch loss; empty without it).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    set_seed(seed)
    probe_losses: list[float] = []
    if probe_epochs > 0:  # LP-FT: the head first, on the frozen encoder's features
        model.to(acc.device)
        features, labels = pooled_features(model, fit, batch_size=max(batch_size, 256))
        probe_losses = fit_head(model, features, labels, probe_epochs, probe_lr, batch_size=batch_size,
                                weight_decay=weight_decay, label_smoothing=label_smoothing, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    fit_loader = torch.utils.data.DataLoader(fit, batch_size=batch_size, shuffle=True, generator=gen,
                                             num_workers=num_workers, drop_last=len(fit) > batch_size)
    val_loader = torch.utils.data.DataLoader(val, batch_size=batch_size, num_workers=num_workers)
    test_loader = (None if test is None else
                   torch.utils.data.DataLoader(test, batch_size=batch_size, num_workers=num_workers))
    optimizer = adamw(param_groups(model, weight_decay, layer_decay), lr=lr)
    model, optimizer, fit_loader, val_loader, *tests = acc.prepare(
        model, optimizer, fit_loader, val_loader, *([] if test_loader is None else [test_loader]))
    test_loader = tests[0] if tests else None
    steps_per_epoch = len(fit_loader)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    history, best_state, best = [], None, None
    if probe_epochs > 0:
        metrics = _evaluate(model, val_loader, acc)
        history.append({"epoch": 0, "train_loss": probe_losses[-1], **{f"val_{k}": v for k, v in metrics.items()}})
        log(f"head on the frozen encoder ({probe_epochs} epochs): loss {probe_losses[-1]:.4f}, "
            f"val top-1 {100 * metrics['top1']:.2f} %")
        best = {"epoch": 0, "val": metrics}
        best_state = copy.deepcopy({k: v.detach().cpu() for k, v in acc.unwrap_model(model).state_dict().items()})
    step = 0
    for epoch in range(epochs):
        model.train()
        running, seen = 0.0, 0
        for images, labels in fit_loader:
            current = warmup_cosine(step, total, lr, warmup, start=lr / max(warmup, 1), floor=min_lr)
            for group in optimizer.param_groups:
                group["lr"] = current * group.get("lr_scale", 1.0)
            loss = loss_fn(model(images), labels.long())
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            optimizer.step()
            running += float(loss.detach()) * labels.shape[0]
            seen += labels.shape[0]
            step += 1
        metrics = _evaluate(model, val_loader, acc)
        history.append({"epoch": epoch + 1, "train_loss": running / max(1, seen),
                        **{f"val_{k}": v for k, v in metrics.items()}})
        log(f"epoch {epoch + 1}/{epochs}: loss {running / max(1, seen):.4f}, val top-1 {100 * metrics['top1']:.2f} %")
        if best is None or metrics["top1"] > best["val"]["top1"]:
            best = {"epoch": epoch + 1, "val": metrics}
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in acc.unwrap_model(model).state_dict().items()})
    acc.unwrap_model(model).load_state_dict(best_state)
    # the one look at the test split
    test_metrics = None if test_loader is None else _evaluate(model, test_loader, acc)
    return {"best_epoch": best["epoch"], "val": best["val"], "test": test_metrics, "history": history,
            "probe_epochs": int(probe_epochs), "probe_lr": float(probe_lr) if probe_epochs > 0 else None,
            "probe_losses": probe_losses,
            "n_fit": len(fit), "n_val": len(val), "n_test": 0 if test is None else len(test)}
