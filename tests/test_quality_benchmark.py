"""The fair benchmark's pieces: label subsets, class / size regimes, each row's configuration
taking an optimisation step, and the table / JSON / PNG of a two-step run."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scott.checkpoint import load_tensors
from scott.config import load_recipe
from scott.data.datasets import build_dataset, split_train_val
from scott.data.subsets import class_indices, labels_per_class, stratified_subset
from scott.eval.few_labels import few_label_probe
from scott.eval.protocol import FeatureSet
from scott.objectives import build_objective

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402

TINY_SETS = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.hidden_dim=8",
             "model.predictor_depth=1", "model.predictor_dim=32", "optim.batch_size=8", "data.num_workers=0"]


def test_labels_per_class_exact_counts_seeded_and_inside_the_pool():
    labels = np.repeat(np.arange(5), 40)
    fit, val = split_train_val(labels, 0.25, seed=0)
    a = labels_per_class(labels, 7, seed=0, pool=fit)
    assert np.bincount(labels[a]).tolist() == [7] * 5
    assert not set(a) & set(val)                       # disjoint from the validation split
    assert np.array_equal(a, labels_per_class(labels, 7, seed=0, pool=fit))
    assert not np.array_equal(a, labels_per_class(labels, 7, seed=1, pool=fit))
    with pytest.raises(ValueError, match="fewer than 31"):
        labels_per_class(labels, 31, seed=0, pool=fit)


def test_stratified_subset_keeps_proportions_and_size():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_subset(labels, 10, seed=3)
    assert len(idx) == 10 and np.bincount(labels[idx]).tolist() == [6, 3, 1]
    assert len(set(idx)) == 10 and np.array_equal(idx, np.sort(idx))
    assert np.array_equal(idx, stratified_subset(labels, 10, seed=3))
    with pytest.raises(ValueError):
        stratified_subset(labels, 101, seed=0)


def test_class_indices_and_missing_classes():
    labels = np.array([0, 1, 2, 1, 0, 3])
    assert class_indices(labels, [1, 3]).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match=r"\[7\]"):
        class_indices(labels, [1, 7])


def test_class_split_datasets_never_mix_pretraining_and_transfer_classes():
    seen = load_recipe(ROOT / "recipes/demo.yaml", ["data.classes=[0,1,2,3,4]"], check_data=False)
    unseen = load_recipe(ROOT / "recipes/demo.yaml", ["data.classes=[5,6,7,8,9]"], check_data=False)
    a, b = build_dataset(seen["data"], "train"), build_dataset(unseen["data"], "train")
    assert set(a.labels.tolist()) == {0, 1, 2, 3, 4} and set(b.labels.tolist()) == {5, 6, 7, 8, 9}
    assert len(a) + len(b) == 5000
    test = build_dataset(unseen["data"], "test")
    assert set(test.labels.tolist()) == {5, 6, 7, 8, 9} and len(test) == 500


def test_train_subset_touches_train_not_test():
    recipe = load_recipe(ROOT / "recipes/demo.yaml", ["data.train_subset=1000"], check_data=False)
    train, test = build_dataset(recipe["data"], "train"), build_dataset(recipe["data"], "test")
    assert len(train) == 1000 and np.bincount(train.labels).tolist() == [100] * 10
    assert len(test) == 1000


@pytest.mark.parametrize("override, key", [
    ("data.classes=[1,1]", "data.classes"), ("data.classes=[]", "data.classes"),
    ("data.classes=[-1]", "data.classes"), ("data.train_subset=0", "data.train_subset"),
    ("objective.num_masks=0", "objective.num_masks"), ("objective.target_layers=9", "objective.target_layers"),
    ("objective.global_weight=-1", "objective.global_weight"),
    ("model.tokenizer_masking=dense", "model.tokenizer_masking"),
])
def test_new_recipe_keys_are_validated_at_the_cli(override, key):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/pretrain.py"), str(ROOT / "recipes/demo.yaml"),
                           "--set", override, "--output", "/nonexistent/never"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr


def test_few_label_probe_uses_k_labels_and_beats_chance_on_separable_features():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(50)
    feats = torch.nn.functional.one_hot(labels, 4).float() * 3 + 0.5 * torch.randn(200, 4, generator=g)
    test_labels = torch.arange(4).repeat_interleave(20)
    test = FeatureSet(torch.nn.functional.one_hot(test_labels, 4).float() * 3 + 0.5 * torch.randn(80, 4, generator=g),
                      test_labels)
    out = few_label_probe(FeatureSet(feats, labels), test, per_class=3, draws=2,
                          grid=[{"lr": 0.1, "epochs": 30, "batch_size": 8, "weight_decay": 0.0, "optimizer": "sgd"}])
    assert [d["n_train"] for d in out["draws"]] == [12, 12]
    assert out["test_top1_mean"] > 0.9


@pytest.mark.parametrize("row", list(quality.PRETRAIN_ROWS))
def test_each_pretraining_row_builds_and_takes_a_step(row, tmp_path):
    from scott.train import pretrain

    args = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--subset", "40"] +
                              sum((["--set", s] for s in TINY_SETS), []))
    recipe = load_recipe(ROOT / "recipes/demo.yaml", [*quality.row_overrides(args, row, seed=0), "train.max_steps=1"])
    torch.manual_seed(recipe["train"]["seed"])  # the run's initial weights
    before = build_objective(recipe).state_dict()
    summary = pretrain(recipe, tmp_path / row)
    assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])
    after, _ = load_tensors(Path(summary["last_checkpoint"]) / "model.safetensors")
    assert after.keys() == before.keys()
    moved = max(float((after[k] - before[k]).abs().max()) for k in after if k.startswith("context_encoder."))
    # one AdamW step at the warm-up lr (1e-6) moves weights by about the lr, no more
    assert 0 < moved < 1e-4


def test_supervised_row_takes_steps_with_the_recipe_augmentation():
    from scott.data.transforms import build_pretrain_transform
    from scott.eval.supervised import AugmentedLabels

    recipe = load_recipe(ROOT / "recipes/demo.yaml", [], check_data=False)
    train = build_dataset(recipe["data"], "train")
    view = AugmentedLabels(train, build_pretrain_transform(recipe), seed=0)
    first, second = view[3][0], view[3][0]
    assert first.shape == (1, 28, 28) and not torch.equal(first, second)  # a new draw per visit
    again = AugmentedLabels(train, build_pretrain_transform(recipe), seed=0)
    assert torch.equal(again[3][0], first)  # reproducible


def test_two_step_benchmark_writes_table_json_and_png(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, str(ROOT / "benchmarks/quality.py"), str(ROOT / "recipes/demo.yaml"), "--steps", "2",
           "--subset", "100", "--rows", "ours", "supervised", "pixels", "--label-counts", "2", "--draws", "2",
           "--linear-lrs", "0.1", "0.3", "--linear-epochs", "3", "--out", str(out)] + sum((["--set", s] for s in TINY_SETS), [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kNN@20" in proc.stdout and "2 labels/cls" in proc.stdout
    record = json.loads((out / "quality.json").read_text())
    assert set(record["summary"]) == {"ours", "supervised", "pixels"}
    assert record["rows"]["ours"][0]["steps"] == 2 and record["n_train"] == 100 and record["n_test"] == 1000
    assert record["n_pretrain_images"] == 100
    assert record["cpu"] and record["command"].startswith("python benchmarks/quality.py")
    for row in ("ours", "pixels"):
        stats = record["summary"][row]
        assert 0.0 <= stats["knn"] <= 1.0 and 0.0 <= stats["linear"] <= 1.0 and "labels2" in stats
        assert len(record["rows"][row][0]["labels2_draws"]) == 2
        assert record["rows"][row][0]["linear_best"]["epochs"] == 3  # the --linear-* grid was used
        assert record["rows"][row][0]["linear_best"]["lr"] in (0.1, 0.3)
    assert [(g["lr"], g["epochs"]) for g in record["linear_grid"]] == [(0.1, 3), (0.3, 3)]
    assert 0.0 <= record["summary"]["supervised"]["finetune"] <= 1.0
    assert "knn" not in record["summary"]["supervised"]
    with Image.open(out / "quality.png") as img:
        assert img.size[0] >= 480 and img.size[1] == 420
    # a rerun reuses the finished rows instead of training again
    proc2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc2.returncode == 0 and "pretraining 2 steps" not in proc2.stdout
    assert json.loads((out / "quality.json").read_text())["summary"] == record["summary"]
    # without --encoder the benchmark evaluates the encoder the recipe exports (demo.yaml: context);
    # --encoder target evaluates the same finished runs' EMA targets, next to the context records
    seed_dir = out / "ours" / "seed0"
    assert json.loads((seed_dir / "eval_record_context.json").read_text())["encoder"] == "context"
    assert not (seed_dir / "eval_record.json").exists() and record["encoder"] == "context"
    target_cmd = [a for a in cmd if a != "supervised"] + ["--encoder", "target"]
    proc3 = subprocess.run(target_cmd, capture_output=True, text=True, timeout=600,
                           env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc3.returncode == 0, proc3.stderr[-2000:]
    assert "pretraining 2 steps" not in proc3.stdout
    assert json.loads((seed_dir / "eval_record.json").read_text())["encoder"] == "target"
    assert json.loads((seed_dir / "eval_record_context.json").read_text())["encoder"] == "context"
    assert json.loads((out / "quality.json").read_text())["encoder"] == "target"


def test_report_only_tabulates_finished_rows_without_training(tmp_path):
    out = tmp_path / "q"
    base = [sys.executable, str(ROOT / "benchmarks/quality.py"), str(ROOT / "recipes/demo.yaml"), "--steps", "1",
            "--subset", "60", "--label-counts", "2", "--draws", "1", "--out", str(out)] + \
        sum((["--set", s] for s in TINY_SETS), [])
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    empty = subprocess.run(base + ["--report-only"], capture_output=True, text=True, timeout=300, env=env)
    assert empty.returncode == 2 and "no finished rows" in empty.stderr and "Traceback" not in empty.stderr
    done = subprocess.run(base + ["--rows", "pixels"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = subprocess.run(base + ["--report-only"], capture_output=True, text=True, timeout=300, env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    record = json.loads((out / "quality.json").read_text())
    assert list(record["summary"]) == ["pixels"] and record["seeds"] == {"pixels": 1}
    assert not (out / "ours").exists()  # nothing was trained


def _floor_benchmark(out, row: str, subset: int) -> list[str]:
    """A one-row floor benchmark command on ``subset`` demo images with a one-point linear grid."""
    return [sys.executable, str(ROOT / "benchmarks/quality.py"), str(ROOT / "recipes/demo.yaml"), "--steps", "1",
            "--subset", str(subset), "--rows", row, "--label-counts", "2", "--draws", "1",
            "--linear-lrs", "0.1", "--linear-epochs", "2", "--out", str(out)] + sum((["--set", s] for s in TINY_SETS), [])


def _run_quiet(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})


def test_first_seed_runs_later_seeds_that_a_report_then_joins(tmp_path):
    out = tmp_path / "q"
    base = _floor_benchmark(out, "random_init", 60)

    def run(*extra):
        return _run_quiet(base + list(extra))

    later = run("--first-seed", "1")  # a second process's share of a 2-seed table
    assert later.returncode == 0, later.stderr[-2000:]
    assert (out / "random_init" / "seed1" / "eval_record.json").is_file()
    assert not (out / "random_init" / "seed0").exists()
    seed1 = json.loads((out / "quality.json").read_text())["rows"]["random_init"]
    assert [r["seed"] for r in seed1] == [1]
    assert run().returncode == 0  # the first process: seed 0
    report = run("--seeds", "2", "--report-only")
    assert report.returncode == 0, report.stderr[-2000:]
    record = json.loads((out / "quality.json").read_text())
    assert record["seeds"] == {"random_init": 2}
    assert [r["seed"] for r in record["rows"]["random_init"]] == [0, 1]
    assert record["rows"]["random_init"][1]["knn"] == seed1[0]["knn"]  # read back, not recomputed
    bad = run("--first-seed", "-1")
    assert bad.returncode == 2 and "--first-seed" in bad.stderr and "Traceback" not in bad.stderr


def test_whiten_dims_adds_a_whitened_knn_column_chosen_on_validation(tmp_path):
    out = tmp_path / "q"
    base = _floor_benchmark(out, "pixels", 200)
    proc = _run_quiet(base + ["--whiten-dims", "8", "32", "5000"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "whitened" in proc.stdout
    record = json.loads((out / "quality.json").read_text())
    row = record["rows"]["pixels"][0]
    assert set(row["knn_white_val"]) == {"8", "32"}  # 5000 > what 180 fit images span
    assert row["knn_white_dim"] == max((8, 32), key=lambda d: (row["knn_white_val"][str(d)], -d))
    assert record["summary"]["pixels"]["knn_white"] == row["knn_white"] and 0.0 <= row["knn_white"] <= 1.0
    # a record made without the column does not answer a request for it
    plain = _run_quiet(base + ["--out", str(tmp_path / "p")])
    assert plain.returncode == 0 and "whitened" not in plain.stdout
    again = _run_quiet(base + ["--out", str(tmp_path / "p"), "--whiten-dims", "8"])
    assert again.returncode == 2 and "whiten_dims" in again.stderr


def test_minutes_to_knn_sums_the_steps_own_times_until_the_first_hit():
    records = [{"step": 1, "images_per_s": 32.0}, {"step": 2, "images_per_s": 16.0, "knn_top1": 0.80},
               {"step": 3, "images_per_s": 32.0}, {"step": 4, "images_per_s": 8.0, "knn_top1": 0.86},
               {"step": 5, "images_per_s": 32.0, "knn_top1": 0.90}]
    minutes, step = quality.minutes_to_knn(records, 0.85, batch_size=32)
    assert step == 4 and minutes == pytest.approx((1 + 2 + 1 + 4) / 60.0)  # seconds: 32/32 + 32/16 + ...
    assert quality.minutes_to_knn(records, 0.95, batch_size=32) == (None, None)


def test_time_to_knn_column_says_when_a_seed_never_got_there():
    cols = quality.columns([10])
    summary = quality.summarise({"ours": [{"minutes_to_knn": 4.0}, {"minutes_to_knn": None}],
                                 "patchify": [{"minutes_to_knn": 3.0}, {"minutes_to_knn": 5.0}]}, cols)
    assert quality.format_cell(summary["ours"], "minutes_to_knn") == "not reached (1 of 2)"
    assert quality.format_cell(summary["patchify"], "minutes_to_knn") == "4.0"


def test_supervised_epochs_fixes_the_supervised_rows_epochs(tmp_path):
    out = tmp_path / "q"
    common = [sys.executable, str(ROOT / "benchmarks/quality.py"), str(ROOT / "recipes/demo.yaml"), "--steps", "1",
              "--subset", "100", "--rows", "supervised", "--label-counts", "2", "--draws", "1"]
    common += sum((["--set", s] for s in TINY_SETS), [])
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    proc = subprocess.run(common + ["--supervised-epochs", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((out / "quality.json").read_text())["rows"]["supervised"][0]
    assert row["finetune_epochs"] == 3 and row["budget_s"] is None  # not the epochs a wall budget buys
    assert "3 epochs from scratch (--supervised-epochs)" in proc.stdout
    bad = subprocess.run(common + ["--supervised-epochs", "0", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "--supervised-epochs >= 1" in bad.stderr and "Traceback" not in bad.stderr
    # the finished record answers the same request, and refuses another: 2 epochs, or the wall budget
    again = subprocess.run(common + ["--supervised-epochs", "3", "--out", str(out)],
                           capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "epochs from scratch" not in again.stdout  # reused, not retrained
    for other in (["--supervised-epochs", "2"], []):
        clash = subprocess.run(common + other + ["--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
        assert clash.returncode == 2 and "Traceback" not in clash.stderr, clash.stderr[-2000:]
        assert "does not match this command" in clash.stderr and "supervised_epochs 3" in clash.stderr
        assert "seed0/eval_record.json" in clash.stderr
    report = subprocess.run(common + ["--supervised-epochs", "2", "--report-only", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert report.returncode == 0 and "warning" in report.stdout  # --report-only tabulates, and says so
    assert json.loads((out / "quality.json").read_text())["rows"]["supervised"][0]["finetune_epochs"] == 3


def test_request_mismatch_compares_what_a_record_was_made_for():
    made = {"request": {"overrides": ["train.seed=0"], "steps": 2, "budget_minutes": None,
                        "label_counts": [2, 10], "draws": 3, "finetune_epochs": 0}}
    same = {"overrides": ["train.seed=0"], "steps": 2, "budget_minutes": None}
    assert quality.request_mismatch(made, same) is None
    assert quality.request_mismatch(made, {"label_counts": [10], "draws": 3}) is None  # a subset of its columns
    assert "labels100" in quality.request_mismatch(made, {"label_counts": [10, 100]})
    assert "steps 2" in quality.request_mismatch(made, {**same, "steps": 5})
    assert "overrides" in quality.request_mismatch(made, {**same, "overrides": ["train.seed=1"]})
    assert "finetune_epochs 0" in quality.request_mismatch(made, {"finetune_epochs": 3})
    assert quality.request_mismatch({"request": {"finetune_epochs": 3}}, {"finetune_epochs": 0}) is None


def test_records_without_a_request_are_read_for_what_their_numbers_say():
    budget_pretrain = {"row": "ours", "steps": 900, "overrides": ["train.seed=0"], "calibration_images_per_s": 300.0}
    assert quality.legacy_request(budget_pretrain) == {"overrides": ["train.seed=0"], "steps": None}
    assert "steps None" in quality.request_mismatch(budget_pretrain, {"steps": 900})
    fixed = {"row": "ours", "steps": 900, "overrides": ["train.seed=0"]}
    assert quality.request_mismatch(fixed, {"overrides": ["train.seed=0"], "steps": 900}) is None
    supervised_budget = {"row": "supervised", "finetune_epochs": 56, "budget_s": 120.0,
                         "labels10": 0.7, "labels10_draws": [0.7, 0.7, 0.7]}
    assert quality.legacy_request(supervised_budget) == {"supervised_epochs": None, "label_counts": [10], "draws": 3}
    assert "supervised_epochs None" in quality.request_mismatch(supervised_budget, {"supervised_epochs": 56})
    supervised_fixed = {**supervised_budget, "budget_s": None}
    assert quality.request_mismatch(supervised_fixed, {"supervised_epochs": 56, "label_counts": [10]}) is None
    evaluated = {"knn": 0.8, "linear": 0.8}  # evaluated, not fine-tuned, no label columns
    assert "finetune_epochs 0" in quality.request_mismatch(evaluated, {"finetune_epochs": 5})
    assert "labels10" in quality.request_mismatch(evaluated, {"label_counts": [10]})


def test_a_floor_record_answers_any_fine_tune_request():
    """Floors are never fine-tuned, so --finetune-epochs does not make their records stale;
    the probes' settings do."""
    made = quality.parse_args(["recipes/demo.yaml", "--steps", "1"])
    record = {"row": "pixels", "knn": 0.8, "request": quality.floor_request(made, ["train.seed=0"])}
    asked = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--finetune-epochs", "3"])
    assert quality.request_mismatch(record, quality.floor_request(asked, ["train.seed=0"])) is None
    assert "finetune_epochs" in quality.eval_request(asked)  # the trained rows' request keeps it
    fewer = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--draws", "1"])
    assert "draws" in quality.request_mismatch(record, quality.floor_request(fewer, ["train.seed=0"]))


def test_the_fine_tunes_augmentation_is_part_of_what_a_record_answers():
    """--finetune-augment is compared like the fine-tune epochs; a record from before the key
    fine-tuned on flips; without a fine-tune it is not asked; floors never carry it."""
    flips = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--finetune-epochs", "3"])
    views = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--finetune-epochs", "3",
                                "--finetune-augment", "recipe"])
    old = {"knn": 0.8, "request": {"finetune_epochs": 3}}  # made before the key existed
    assert quality.request_mismatch(old, quality.eval_request(flips)) is None
    assert "finetune_augment 'flip'" in quality.request_mismatch(old, quality.eval_request(views))
    legacy = {"knn": 0.8, "finetune_epochs": 3, "labels10": 0.7, "labels100": 0.8}  # no request: flips
    assert "finetune_augment 'flip'" in quality.request_mismatch(legacy, quality.eval_request(views))
    assert quality.request_mismatch(legacy, quality.eval_request(flips)) is None
    made = {"knn": 0.8, "request": quality.eval_request(views)}
    assert quality.request_mismatch(made, quality.eval_request(views)) is None
    no_ft = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--finetune-augment", "recipe"])
    assert quality.request_mismatch(old, quality.eval_request(no_ft)) is None
    assert "finetune_augment" not in quality.floor_request(views, [])


def test_finetune_encoder_recipe_augment_trains_on_the_recipes_views(monkeypatch):
    import scott.eval.finetune as ft
    from scott.eval.supervised import AugmentedLabels
    from scott.models import build_encoder

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", TINY_SETS)
    seen = []

    def fake(model, fit, val, test, **kw):
        seen.append((fit, val))
        return {"test": {"top1": 0.5}, "val": {"top1": 0.6}, "best_epoch": 2}

    monkeypatch.setattr(ft, "finetune", fake)
    for augment in ("recipe", "flip"):
        out = quality.finetune_encoder(build_encoder(recipe["model"]), recipe, 2, 0, augment)
        assert out["finetune_augment"] == augment and out["finetune_epochs"] == 2
    (views, val), (flips, _) = seen
    assert isinstance(views, AugmentedLabels) and isinstance(flips, ft.FlipView)
    assert len(views) == len(flips) and len(views) + len(val) == 5000
    assert views[0][0].shape == val[0][0].shape and not torch.equal(views[3][0], views[3][0])
    from scott.eval.supervised import training_views
    with pytest.raises(ValueError, match="augment"):
        training_views(views.dataset, recipe, lambda ds: ds, "crops")


def test_the_fine_tunes_lr_and_head_stage_reach_it_and_are_part_of_what_a_record_answers(monkeypatch):
    """--finetune-lr / --finetune-probe-epochs (LP-FT) go to the fine-tune; a record made with
    other values, or before the keys (lr 1e-3, no head stage), is told apart; floors never carry them."""
    import scott.eval.finetune as ft
    from scott.models import build_encoder

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", TINY_SETS)
    seen = {}

    def fake(model, fit, val, test, **kw):
        seen.update(kw)
        return {"test": {"top1": 0.5}, "val": {"top1": 0.6}, "best_epoch": 0}

    monkeypatch.setattr(ft, "finetune", fake)
    out = quality.finetune_encoder(build_encoder(recipe["model"]), recipe, 2, 0, "flip", lr=3e-4, probe_epochs=50)
    assert (seen["lr"], seen["probe_epochs"]) == (3e-4, 50)
    assert (out["finetune_lr"], out["finetune_probe_epochs"], out["finetune_best_epoch"]) == (3e-4, 50, 0)

    plain = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--finetune-epochs", "3"])
    lpft = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--finetune-epochs", "3",
                               "--finetune-lr", "3e-4", "--finetune-probe-epochs", "50"])
    old = {"knn": 0.8, "request": {"finetune_epochs": 3, "finetune_augment": "flip"}}  # before the keys
    assert quality.request_mismatch(old, quality.eval_request(plain)) is None
    why = quality.request_mismatch(old, quality.eval_request(lpft))
    assert "finetune_lr 0.001" in why or "finetune_probe_epochs 0" in why
    made = {"knn": 0.8, "request": quality.eval_request(lpft)}
    assert quality.request_mismatch(made, quality.eval_request(lpft)) is None
    assert "finetune_lr" in quality.request_mismatch(made, quality.eval_request(plain))
    no_ft = quality.parse_args(["recipes/demo.yaml", "--steps", "1", "--finetune-lr", "3e-4"])
    assert quality.request_mismatch(made, quality.eval_request(no_ft)) is None
    assert not {"finetune_lr", "finetune_probe_epochs"} & set(quality.floor_request(lpft, []))
    from scott.config import RecipeError

    for bad in (["--finetune-probe-epochs", "-1"], ["--finetune-lr", "0"]):
        with pytest.raises(RecipeError, match="--finetune-probe-epochs >= 0"):  # run_cli: one line, exit 2
            quality.main([str(ROOT / "recipes" / "demo.yaml"), "--steps", "1", *bad])
