"""Cross-view self-distillation (``objective.dino_weight``): the loss, the centre, the teacher
head's EMA, and how it joins MIM-JEPA."""
import math

import pytest
import torch

from scott.data.transforms import build_pretrain_transform
from scott.self_distillation import ProjectionHead, SelfDistillation, distillation_loss
from test_objective_levers import _masks, _objective  # the same tiny MIM-JEPA and masks

def test_loss_is_the_cross_entropy_of_the_sharpened_centred_teacher():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.2, 0.1, 0.0]])
    center = torch.tensor([[0.1, 0.0, 0.0]])
    p = torch.softmax((t - center) / 0.5, -1)
    expected = -(p * torch.log_softmax(s / 0.1, -1)).sum()
    assert math.isclose(float(distillation_loss(s, t, center, 0.1, 0.5)), float(expected), rel_tol=1e-6)
    # a student that puts all its mass where the teacher does costs the teacher's entropy only
    one_hot = torch.tensor([[0.0, 0.0, 50.0]])
    assert float(distillation_loss(one_hot * 10, one_hot, torch.zeros(1, 3), 1.0, 0.01)) < 1e-4


def test_teacher_side_gets_no_gradient():
    s = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    distillation_loss(s, t, torch.zeros(1, 8), 0.1, 0.04).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_center_is_an_ema_of_the_teacher_logits_and_only_moves_in_training():
    torch.manual_seed(0)
    sd = SelfDistillation(8, prototypes=5, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    sd.eval()
    sd(a, b)
    assert torch.equal(sd.center, torch.zeros(1, 5))
    sd.train()
    sd(a, b)
    expected = 0.1 * sd.teacher_head(b).mean(0, keepdim=True)
    assert torch.allclose(sd.center, expected, atol=1e-6)


def test_head_gives_cosine_logits_bounded_by_one():
    head = ProjectionHead(8, prototypes=7)
    logits = head(torch.randn(10, 8) * 100)
    assert logits.shape == (10, 7) and float(logits.detach().abs().max()) <= 1.0 + 1e-5


def test_teacher_head_follows_the_student_head_by_ema():
    obj = _objective(dino_weight=1.0)
    head, teacher = obj.distill.head, obj.distill.teacher_head
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), teacher.parameters()))
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    obj.update_target(0.75)
    for p, q, t0 in zip(head.parameters(), teacher.parameters(), before):
        assert torch.allclose(q, 0.75 * t0 + 0.25 * p, atol=1e-6)


def test_term_adds_to_the_masked_loss_with_its_weight():
    obj = _objective(dino_weight=0.5)
    x, m, other = torch.randn(4, 1, 16, 16), _masks(4), torch.randn(4, 1, 16, 16)
    obj.eval()  # keep the centre fixed across the two calls
    total, stats = obj(x, x, m, other)
    obj.dino_weight = 0.0
    masked_only, _ = obj(x, x, m, other)
    ctx_mean = obj.context_encoder(x, m.visible, context_tokens="visible").mean(1)
    teacher = obj.targets(other, other).mean(1)
    expected = distillation_loss(obj.distill.head(ctx_mean), obj.distill.teacher_head(teacher),
                                 obj.distill.center, 0.1, 0.04)
    assert torch.allclose(total - masked_only, 0.5 * expected, atol=1e-5)
    assert torch.allclose(stats["dino_loss"], expected, atol=1e-5)


def test_gradient_reaches_the_context_encoder_and_head_but_not_the_teacher():
    obj = _objective(dino_weight=1.0)
    x, m, other = torch.randn(4, 1, 16, 16), _masks(4), torch.randn(4, 1, 16, 16)
    loss, _ = obj(x, x, m, other)
    loss.backward()
    assert all(p.grad is not None for p in obj.distill.head.parameters())
    assert all(p.grad is None for p in obj.distill.teacher_head.parameters())
    assert all(p.grad is None for p in obj.target_encoder.parameters())
    assert "dino_head" in obj.trainable_modules()


def test_needs_the_other_view():
    obj = _objective(dino_weight=1.0)
    with pytest.raises(ValueError, match="third view"):
        obj(torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), _masks(2))


def test_off_by_default_with_the_old_state_dict():
    plain = _objective()
    assert plain.distill is None
    assert not any(k.startswith("distill") for k in plain.state_dict())
    assert any(k.startswith("distill.center") for k in _objective(dino_weight=1.0).state_dict())


def test_recipe_asks_for_the_third_view_and_validates_the_keys():
    from scott.config import RecipeError, resolve_recipe

    recipe = resolve_recipe({"objective": {"dino_weight": 1.0}}, source="<t>", check_data=False)
    assert build_pretrain_transform(recipe).extra_view
    plain = resolve_recipe({}, source="<t>", check_data=False)
    assert not build_pretrain_transform(plain).extra_view
    with pytest.raises(RecipeError, match="objective.dino_weight"):
        resolve_recipe({"objective": {"name": "pixel", "dino_weight": 1.0}}, source="<t>", check_data=False)
    with pytest.raises(RecipeError, match="objective.dino_teacher_temp"):
        resolve_recipe({"objective": {"dino_teacher_temp": 0}}, source="<t>", check_data=False)
    with pytest.raises(RecipeError, match="objective.dino_center_momentum"):
        resolve_recipe({"objective": {"dino_center_momentum": 1.0}}, source="<t>", check_data=False)
