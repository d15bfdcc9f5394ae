"""Evaluation CLIs end to end on a tiny exported run folder (demo data, small subsets)."""

import json
from pathlib import Path

import pytest
import torch

from scott.checkpoint import export_encoder
from scott.config import format_recipe, load_recipe
from scott.data.transforms import eval_transform_spec
from scott.models import build_encoder
from cli_helpers import exit_code, load_tool

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.hidden_dim=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", SMALL)
    (path / "recipe.yaml").write_text(format_recipe(recipe), encoding="utf-8")
    torch.manual_seed(0)
    for name in ("encoder", "context_encoder"):
        export_encoder(path / f"{name}.safetensors", build_encoder(recipe["model"]).state_dict(), recipe["model"],
                       eval_transform_spec(recipe["model"]))
    return path


def test_eval_knn_json_record(run_dir, tmp_path):
    knn = load_tool("eval_knn")
    out = tmp_path / "knn.json"
    argv = [str(run_dir), "--k", "5", "500", "--limit-train", "60", "--limit-test", "20", "--json", str(out),
            "--seed", "3", "--which", "context"]
    with pytest.warns(UserWarning, match="exceeds"):
        assert exit_code(knn, argv) == 0
    rec = json.loads(out.read_text())
    assert set(rec["k"]) == {"5", "500"}
    assert rec["n_train"] == 60 and rec["n_test"] == 20 and rec["seed"] == 3
    assert rec["which"] == "context" and "context_encoder.safetensors" in rec["encoder"]
    assert "tools/eval_knn.py" in rec["command"] and rec["command"].endswith("--seed 3 --which context")
    assert rec["recipe"]["model"]["embed_dim"] == 32 and rec["data"] == "demo"
    # the recorded accuracy is the one a hand-written reference computes from the same images:
    # eval transform -> context encoder -> the recipe's flat pooling -> cosine kNN with
    # exp(sim / 0.07) votes (k = 5)
    from scott.eval.features import load_encoder
    from scott.eval.runs import eval_datasets, limit_dataset

    recipe = load_recipe(run_dir / "recipe.yaml")
    bank, queries = eval_datasets(recipe)
    bank, queries = limit_dataset(bank, 60, 3), limit_dataset(queries, 20, 3)
    encoder = load_encoder(run_dir, which="context").eval()
    mean, std = encoder.eval_transform_spec["mean"], encoder.eval_transform_spec["std"]

    def features(ds):
        import numpy as np

        xs = torch.stack([(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None] - mean[0]) / std[0]
                          for img, _ in ds])
        with torch.no_grad():
            return encoder(xs).flatten(1), torch.tensor([int(y) for _, y in ds])

    fb, yb = features(bank)
    fq, yq = features(queries)
    fb, fq = fb / fb.norm(dim=1, keepdim=True), fq / fq.norm(dim=1, keepdim=True)
    correct = 0
    for q, y in zip(fq, yq):
        sims = fb @ q
        top = sims.argsort(descending=True)[:5]
        votes = torch.zeros(10).index_add_(0, yb[top], (sims[top] / 0.07).exp())
        correct += int(votes.argmax() == y)
    assert rec["k"]["5"]["top1"] == pytest.approx(correct / 20)
    # k=500 is clamped to the 60 bank images: every image votes, the closest ones weigh most
    assert 0.0 <= rec["k"]["500"]["top1"] <= rec["k"]["500"]["top5"] <= 1.0


def test_eval_knn_val_only_scores_the_carved_validation_split(tmp_path, monkeypatch):
    """--val-only: queries are the stratified carve-out (data.val_fraction, --seed) of the bank the
    probes and fine-tuning choose on, the bank is the rest, and the test split is never built."""
    import numpy as np

    import scott.eval.runs as runs
    from scott.data.datasets import split_train_val
    from scott.eval.features import extract_features

    knn = load_tool("eval_knn")
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    bank = runs.limit_dataset(runs.eval_bank(recipe), 200, 2)
    labels = np.array([int(y) for _, y in bank])
    fit_idx, val_idx = split_train_val(labels, 0.25, 2)
    encoder = runs.pixel_source("demo").encoder

    def no_test(*a, **kw):
        raise AssertionError("--val-only built the test split")

    monkeypatch.setattr(runs, "eval_datasets", no_test)
    monkeypatch.setattr(knn, "eval_datasets", no_test)
    out = tmp_path / "val.json"
    assert exit_code(knn, ["--pixels", "demo", "--val-only", "--val-fraction", "0.25", "--limit-train", "200",
                           "--seed", "2", "--k", "5", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["val_only"] is True and rec["queries"] == "val"
    assert (rec["n_train"], rec["n_test"]) == (len(fit_idx), len(val_idx)) and len(fit_idx) + len(val_idx) == 200
    fb, _ = extract_features(encoder, torch.utils.data.Subset(bank, fit_idx.tolist()), progress=False)
    fq, _ = extract_features(encoder, torch.utils.data.Subset(bank, val_idx.tolist()), progress=False)
    fb, fq = fb / fb.norm(dim=1, keepdim=True), fq / fq.norm(dim=1, keepdim=True)
    correct = 0
    for q, y in zip(fq, labels[val_idx]):
        sims = fb @ q
        top = sims.argsort(descending=True)[:5]
        votes = torch.zeros(10).index_add_(0, torch.as_tensor(labels[fit_idx])[top], (sims[top] / 0.07).exp())
        correct += int(votes.argmax() == int(y))
    assert rec["k"]["5"]["top1"] == pytest.approx(correct / len(val_idx))
    assert exit_code(knn, ["--pixels", "demo", "--val-fraction", "0.25"]) == 2  # needs --val-only
    assert exit_code(knn, ["--pixels", "demo", "--val-only", "--val-fraction", "1.5"]) == 2


def test_pixels_baseline_beats_chance(tmp_path):
    knn = load_tool("eval_knn")
    out = tmp_path / "pix.json"
    assert exit_code(knn, ["--pixels", "demo", "--k", "10", "--limit-train", "300", "--limit-test", "100",
                           "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["source"] == "pixels" and rec["encoder"].startswith("raw pixels (1x28x28)")
    assert rec["k"]["10"]["top1"] > 0.5  # 10 classes: chance is 0.1


def test_bad_input_exits_2(run_dir, tmp_path):
    knn = load_tool("eval_knn")
    assert exit_code(knn, []) == 2  # no source
    assert exit_code(knn, [str(tmp_path / "missing")]) == 2
    assert exit_code(knn, ["--random-init", str(tmp_path / "nope.yaml")]) == 2
    assert exit_code(knn, ["--pixels", "not_a_dataset"]) == 2
    bad = tmp_path / "badrun"
    bad.mkdir()
    (bad / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
    (bad / "encoder.safetensors").write_bytes(b"garbage" * 10)
    assert exit_code(knn, [str(bad), "--which", "target"]) == 2  # a damaged file
    assert exit_code(knn, [str(bad)]) == 2  # the recipe's context encoder was never exported
    assert exit_code(knn, [str(run_dir), "--k", "0"]) == 2


def test_tools_read_the_encoder_the_run_exports(run_dir, tmp_path):
    """Without --which a run folder means the encoder its recipe exports (train.export_encoder),
    and --which names the other one (scott.eval.features.resolve_which, tested there)."""
    knn, export = load_tool("eval_knn"), load_tool("export_model")
    target_run = tmp_path / "target_run"
    target_run.mkdir()
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", SMALL + ["train.export_encoder=target"])
    (target_run / "recipe.yaml").write_text(format_recipe(recipe), encoding="utf-8")
    for name in ("encoder.safetensors", "context_encoder.safetensors"):
        (target_run / name).write_bytes((run_dir / name).read_bytes())
    small = ["--k", "5", "--limit-train", "40", "--limit-test", "10"]
    cases = [(run_dir, [], "context"), (target_run, [], "target"),
             (run_dir, ["--which", "target"], "target"), (target_run, ["--which", "context"], "context")]
    for run, extra, which in cases:
        out = tmp_path / f"{run.name}-{which}.json"
        assert exit_code(knn, [str(run), *small, "--json", str(out), *extra]) == 0
        rec = json.loads(out.read_text())
        file = "encoder.safetensors" if which == "target" else "context_encoder.safetensors"
        assert rec["which"] == which and rec["encoder"].endswith(file), (run, extra, rec["encoder"])
    for run, which in ((run_dir, "context"), (target_run, "target")):
        assert exit_code(export, [str(run), "--out", str(tmp_path / f"card-{run.name}")]) == 0
        config = json.loads((tmp_path / f"card-{run.name}" / "config.json").read_text())
        assert config["scott"]["which"] == which


def test_eval_linear_default_json_and_selection(run_dir):
    lin = load_tool("eval_linear")
    argv = [str(run_dir), "--limit-train", "80", "--limit-test", "30", "--lrs", "0.1", "1.0", "--epochs", "3"]
    assert exit_code(lin, argv) == 0
    # no --which: the encoder the run exports (the demo recipe's train.export_encoder: context)
    rec = json.loads((run_dir / "eval" / "linear_context.json").read_text())
    assert rec["which"] == "context" and "context_encoder.safetensors" in rec["encoder"]
    probe = rec["probe"]
    assert probe["n_fit"] + probe["n_val"] == rec["n_train"] == 80 and rec["n_test"] == 30
    assert [r["lr"] for r in probe["selection"]] == [0.1, 1.0]
    # the chosen lr is the first grid point with the best validation top-1 (never a test number)
    table = probe["selection"]
    best_val = max(r["val_top1"] for r in table)
    assert probe["best"]["lr"] == next(r["lr"] for r in table if r["val_top1"] == best_val)
    assert 0.0 <= rec["top1"] <= 1.0
    assert any((run_dir / "cache" / "features").glob("*.safetensors"))  # features cached


def test_eval_attentive_and_finetune_run(run_dir, tmp_path):
    att = load_tool("eval_attentive")
    out = tmp_path / "att.json"
    assert exit_code(att, [str(run_dir), "--limit-train", "60", "--limit-test", "20", "--lrs", "1e-3",
                           "--epochs", "2", "--heads", "2", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["pool"] == "tokens" and rec["probe"]["n_refit"] == 60
    assert exit_code(att, [str(run_dir), "--heads", "5", "--limit-train", "20", "--limit-test", "5"]) == 2

    ft = load_tool("finetune")
    out = tmp_path / "ft.json"
    assert exit_code(ft, [str(run_dir), "--limit-train", "60", "--limit-test", "20", "--epochs", "2",
                          "--batch-size", "16", "--layer-decay", "0.75", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert len(rec["history"]) == 2 and rec["best_epoch"] in (1, 2)
    assert rec["n_fit"] + rec["n_val"] == 60 and rec["n_test"] == 20
    assert rec["hyperparameters"]["layer_decay"] == 0.75
    assert rec["hyperparameters"]["pool"] == "flat"  # no --pool: the recipe's model.global_pool (demo: flat)
    assert exit_code(ft, ["--pixels", "demo"]) == 2


def test_finetune_val_only_never_reads_the_test_split(run_dir, tmp_path, monkeypatch):
    """--val-only: the same fit / validation split and training as a full run, no test split built."""
    import scott.eval.runs as runs

    ft = load_tool("finetune")
    argv = [str(run_dir), "--limit-train", "60", "--epochs", "2", "--batch-size", "16", "--seed", "1"]
    full, only = tmp_path / "full.json", tmp_path / "only.json"
    assert exit_code(ft, [*argv, "--limit-test", "20", "--json", str(full)]) == 0

    def no_test(*a, **kw):
        raise AssertionError("--val-only built the test split")

    monkeypatch.setattr(runs, "eval_datasets", no_test)
    monkeypatch.setattr(ft, "eval_datasets", no_test, raising=False)
    assert exit_code(ft, [*argv, "--val-only", "--json", str(only)]) == 0
    a, b = json.loads(full.read_text()), json.loads(only.read_text())
    assert b["val_only"] is True and b["test"] is None and b["n_test"] == 0 and "top1" not in b
    assert (b["n_fit"], b["n_val"]) == (a["n_fit"], a["n_val"]) and a["test"] is not None
    assert [h["val_top1"] for h in b["history"]] == [h["val_top1"] for h in a["history"]]
    assert b["best_epoch"] == a["best_epoch"]


def test_finetune_augment_recipe_trains_on_the_recipes_views(run_dir, tmp_path, monkeypatch):
    """--augment recipe: the fit part seen through the recipe's pretraining augmentation (a new
    view per visit, the model's input shape), as the supervised-from-scratch baseline trains."""
    from scott.eval.supervised import AugmentedLabels

    ft = load_tool("finetune")
    seen = {}
    real = ft.finetune

    def spy(model, fit, val, test, **kw):
        seen["fit"], seen["val"] = fit, val
        return real(model, fit, val, test, **kw)

    monkeypatch.setattr(ft, "finetune", spy)
    out = tmp_path / "aug.json"
    assert exit_code(ft, [str(run_dir), "--limit-train", "40", "--epochs", "1", "--batch-size", "16",
                          "--val-only", "--augment", "recipe", "--json", str(out)]) == 0
    fit, val = seen["fit"], seen["val"]
    assert isinstance(fit, AugmentedLabels) and len(fit) + len(val) == 40
    (x1, y1), (x2, y2) = fit[0], fit[0]
    assert x1.shape == val[0][0].shape and y1 == y2 and not torch.equal(x1, x2)
    assert json.loads(out.read_text())["hyperparameters"]["augment"] == "recipe"
    assert exit_code(ft, [str(run_dir), "--augment", "recipe", "--no-flip"]) == 2


def test_finetune_pool_sets_the_head_width(run_dir, tmp_path, monkeypatch):
    """--pool reaches the classifier: flat feeds the head every token (N * D inputs), avg D;
    without --pool the head pools as the recipe says (demo: flat)."""
    import scott.models.timm_family as tf

    ft = load_tool("finetune")
    widths = {}
    real = tf.ScottViT.from_encoder.__func__

    def spy(cls, encoder, num_classes, global_pool=None, **kw):
        model = real(cls, encoder, num_classes, global_pool=global_pool, **kw)
        widths[global_pool] = (model.head.in_features, encoder.num_patches * encoder.embed_dim, encoder.embed_dim)
        return model

    monkeypatch.setattr(tf.ScottViT, "from_encoder", classmethod(spy))
    for pool in ("flat", "avg", None):
        out = tmp_path / f"ft_{pool}.json"
        extra = [] if pool is None else ["--pool", pool]
        assert exit_code(ft, [str(run_dir), "--limit-train", "40", "--limit-test", "10", "--epochs", "1",
                              "--batch-size", "16", "--json", str(out), *extra]) == 0
        assert json.loads(out.read_text())["hyperparameters"]["pool"] == (pool or "flat")
    head, flat_width, dim = widths["flat"]
    assert head == flat_width and widths["avg"][0] == dim and flat_width > dim
    assert widths[None][0] == flat_width
    assert exit_code(ft, [str(run_dir), "--pool", "max"]) == 2


def test_feature_cache_tells_subsets_apart(run_dir, tmp_path):
    from scott.eval.runs import eval_datasets, features_for, limit_dataset, load_run_source

    source = load_run_source(run_dir)
    train, _ = eval_datasets(source.recipe)
    a = limit_dataset(train, 10, seed=0)
    b = limit_dataset(train, 10, seed=1)
    fa, la = features_for(source, a, "demo-trainval", "avg", 8, cache_dir=tmp_path)
    fb, lb = features_for(source, b, "demo-trainval", "avg", 8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.equal(fa, fb)
    fa2, _ = features_for(source, a, "demo-trainval", "avg", 8, cache_dir=tmp_path)
    assert torch.equal(fa, fa2)


def test_finetune_probe_epochs_fits_the_head_first_and_records_it(run_dir, tmp_path):
    ft = load_tool("finetune")
    out = tmp_path / "lpft.json"
    assert exit_code(ft, [str(run_dir), "--limit-train", "60", "--epochs", "1", "--batch-size", "16",
                          "--val-only", "--probe-epochs", "3", "--probe-lr", "2e-3", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [h["epoch"] for h in rec["history"]] == [0, 1] and len(rec["probe_losses"]) == 3
    assert rec["hyperparameters"]["probe_epochs"] == 3 and rec["hyperparameters"]["probe_lr"] == 2e-3
    assert rec["best_epoch"] in (0, 1)
    assert rec["hyperparameters"]["fc_norm"] is True
    out = tmp_path / "lpft_raw.json"
    assert exit_code(ft, [str(run_dir), "--limit-train", "60", "--epochs", "1", "--batch-size", "16",
                          "--val-only", "--probe-epochs", "3", "--no-fc-norm", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["hyperparameters"]["fc_norm"] is False
    assert exit_code(ft, [str(run_dir), "--probe-epochs", "-1"]) == 2
    assert exit_code(ft, [str(run_dir), "--probe-epochs", "2", "--probe-lr", "0"]) == 2
