"""The run's reports: the collapse watch and the diagnostics that reach metrics.jsonl."""
import json

import torch

from scott.run_log import COLLAPSE_TARGET_STD, CollapseWatch
from scott.train import pretrain
from train_helpers import one_torch_thread, tiny_components, tiny_recipe  # noqa: F401


def test_collapse_watch_warns_once_below_the_threshold():
    watch = CollapseWatch(threshold=0.1)
    assert watch.check(1, {"target_std": 0.9}) is None
    assert watch.check(2, {}) is None  # objectives without the statistic
    message = watch.check(3, {"target_std": 0.05})
    assert message.startswith("warning: at step 3") and "0.05" in message and "collapsing" in message
    assert watch.check(4, {"target_std": 0.01}) is None  # once per run
    assert CollapseWatch().threshold == COLLAPSE_TARGET_STD


def test_a_collapsing_run_is_reported_while_it_runs(tmp_path):
    """Targets forced to a constant (a collapsed target encoder): the run says so in its log."""
    recipe = tiny_recipe(train={"max_steps": 3})
    parts = tiny_components(recipe)
    with torch.no_grad():  # a target encoder whose output ignores its input
        for p in parts.objective.target_encoder.parameters():
            p.zero_()
    parts.objective.update_target = lambda momentum: None  # keep it collapsed
    messages = []
    pretrain(recipe, tmp_path, components=parts, log=messages.append)
    warnings = [m for m in messages if "collapsing" in m]
    assert len(warnings) == 1 and "step 1" in warnings[0]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["target_std"] < 1e-3 for r in lines)
