"""One weight-decay rule for pretraining and fine-tuning, driven by no_weight_decay()."""
import torch
import torch.nn as nn

from scott.models import build_encoder
from scott.optim_groups import no_weight_decay_names, param_groups

TINY = {"tokenizer": "small", "backend": "dense", "img_size": 16, "patch_size": 4, "in_chans": 1,
        "embed_dim": 32, "depth": 2, "num_heads": 2, "hidden_dim": 8}


class _Listed(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(4, 3))
        self.proj = nn.Linear(3, 3)

    def no_weight_decay(self):
        return {"table"}


def test_rule_skips_1d_biases_and_listed_names_at_any_depth():
    model = nn.Sequential(_Listed(), nn.LayerNorm(3))
    assert no_weight_decay_names(model) == {"0.table"}
    groups = param_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["apply_wd"] for p in g["params"]}
    assert decayed == {id(model[0].proj.weight)}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_pretraining_and_finetuning_agree_on_what_decays():
    from scott.eval.finetune import FinetuneClassifier
    from scott.eval.finetune import param_groups as finetune_groups
    from scott.objectives import build_objective

    torch.manual_seed(0)
    objective = build_objective({"model": dict(TINY), "objective": {"name": "mimjepa"}})
    pre = {id(p) for g in objective.param_groups(0.04) if g["apply_wd"] for p in g["params"]}
    enc = objective.context_encoder
    assert id(enc.mask_token) not in pre and id(enc.blocks[0].attn.qkv.weight) in pre
    model = FinetuneClassifier(build_encoder(TINY), num_classes=3)
    fine = {n for g in finetune_groups(model, 0.05, 0.5) if g["weight_decay"] > 0
            for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    expected = {f"encoder.{n}" for n, p in enc.named_parameters() if id(p) in pre} | {"head.weight"}
    assert fine == expected


def test_layer_decay_scales():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = param_groups(model, 0.1, layer_of=lambda name: int(name.split(".")[0]), layer_decay=0.5, top_layer=1)
    assert [(g["layer"], g["apply_wd"], g["lr_scale"]) for g in groups] == [
        (0, True, 0.5), (0, False, 0.5), (1, True, 1.0), (1, False, 1.0)]


def test_adamw_is_fused_on_one_cpu_device_and_matches_the_loop():
    from scott.optim_groups import adamw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    twin = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    fused = adamw(param_groups(model, 0.05), lr=1e-2, betas=(0.9, 0.95))
    loop = torch.optim.AdamW(param_groups(twin, 0.05), lr=1e-2, betas=(0.9, 0.95))
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    start = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 6)
    for _ in range(5):
        for net, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b, a0 in zip(model.parameters(), twin.parameters(), start):
        assert float((a.detach() - a0).abs().max()) > 1e-3  # five steps of lr 1e-2 moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # summation order only


def test_adamw_falls_back_to_the_loop_for_parameters_on_two_devices():
    from scott.optim_groups import adamw

    on_cpu = nn.Parameter(torch.zeros(3))
    on_meta = nn.Parameter(torch.zeros(3, device="meta"))
    assert not adamw([on_cpu, on_meta], lr=1e-3).defaults["fused"]
