"""The fair benchmark: every row trained on the SAME images with the SAME budget, one protocol.

    python benchmarks/quality.py recipes/demo.yaml --budget-minutes 3 --seeds 3
    python benchmarks/quality.py recipes/demo.yaml --subset 1000 --budget-minutes 1.5 --seeds 3
    python benchmarks/quality.py recipes/fashion_mnist_cpu.yaml --budget-minutes 30 --rows ours random_init pixels
    python benchmarks/quality.py recipes/demo.yaml --pretrain-classes 0 1 2 3 4 --eval-classes 5 6 7 8 9 \
        --rows ours random_init pixels --budget-minutes 3          # transfer to unseen classes
    python benchmarks/quality.py recipes/demo.yaml --steps 2 --rows ours pixels --draws 1   # smoke test

Rows (``--rows``, default all):
  ours         the recipe as given (SCOTT tokenizer, sparse masking, MIM-JEPA)
  patchify     the same ViT with a linear patch embedding (does the tokenizer matter?)
  leaky        the SCOTT stack as a dense conv of the masked image, no re-masking between layers
  pixel        SCOTT + pixel-regression objective (does the latent target matter?)
  supervised   the same ViT trained from scratch on the labels, with the recipe's augmentation,
               given row ``ours``' whole budget (pretraining + probe wall time), or
               ``--supervised-epochs N`` epochs
  random_init  the same encoder untrained (floor)
  pixels       raw pixels (floor)

Budget: ``--budget-minutes M`` runs a short calibration of each pretraining row on this machine
and gives it the number of steps that fits M minutes (its schedules are set for that many steps);
``--steps N`` gives every row N steps instead. The steps reached and wall times are recorded.

Evaluation (the same for every row, on the recipe's official test split, read once per number):
weighted kNN top-1 (k=20, T=0.07), the linear probe of ``tools/eval_linear.py`` (grid chosen on the
validation split carved from train), label efficiency (linear probe on 10 and 100 labels per
class drawn from the fit part, 3 draws, chosen on the same validation split), and an optional
short fine-tune (``--finetune-epochs``; ``--finetune-augment recipe`` trains it on the recipe's
pretraining views, the augmentation the supervised row trains on, instead of flips only;
``--finetune-lr``, and ``--finetune-probe-epochs`` for LP-FT: the head fitted on the frozen encoder
first). ``--linear-lrs`` / ``--linear-epochs`` replace the linear
probe's grid (60,000 x 6,272 flat features need fewer epochs for the same number of updates,
and the default 18-point grid takes most of an hour there). Time to accuracy
(``--monitor-every E``): each pretraining row runs the validation kNN monitor every E epochs, and
the column ``min to kNN`` is the pretraining time (the steps' own wall times, the monitor's
evaluations left out) until it first reaches ``--time-to-knn`` (0.85). Seeds change the pretraining seed (weights, data
order, masks) of every trained row; floors use them too (random init draws new weights).

Output: a rich table, ``OUT/quality.json`` (command, recipe, CPU, every number) and
``OUT/quality.png`` (bars with seed spread). Finished rows are kept: rerunning the same command
continues where it stopped; ``--report-only`` tabulates what is finished without training;
``--first-seed S`` runs seeds S.. in a second process on the same ``--out`` (its own core, or machine). A
finished record remembers what it was made for (overrides, steps or budget, label counts, draws,
fine-tune epochs, the supervised row's epochs); a command that asks for something else stops with
exit 2 naming the record, rather than tabulating numbers of another setting (``--report-only``
warns instead).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scott.cli import add_malloc_flag, apply_malloc_choice, run_cli  # noqa: E402
from scott.config import RecipeError, load_recipe  # noqa: E402

PRETRAIN_ROWS = {
    "ours": [],
    "patchify": ["model.tokenizer=patchify"],
    "leaky": ["model.tokenizer_masking=leaky"],
    "pixel": ["objective.name=pixel"],
}
ALL_ROWS = [*PRETRAIN_ROWS, "random_init", "pixels", "supervised"]
CALIBRATION_STEPS = 12
FEW_LABEL_STEPS = 600  # supervised-from-scratch steps on 10 / 100 labels per class (it overfits long before)
KNN_K = 20


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension (speeds differ ~2x between them)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({vector}, {sum(line.startswith('processor') for line in info)} cores)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-minutes", type=float, help="pretraining wall-clock budget of every row")
    budget.add_argument("--steps", type=int, help="fixed pretraining steps of every row instead of a budget")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row [1]")
    p.add_argument("--first-seed", type=int, default=0, metavar="S",
                   help="seeds S .. S+N-1 instead of 0 .. N-1 (run one table's seeds in parallel processes "
                        "on the same --out, then --report-only with --seeds N tabulates them all) [0]")
    p.add_argument("--row-seeds", action="append", default=[], metavar="ROW:N",
                   help="seeds for one row instead of --seeds (e.g. pixel:1)")
    p.add_argument("--rows", nargs="+", default=ALL_ROWS, choices=ALL_ROWS)
    p.add_argument("--subset", type=int, default=None, metavar="N_IMAGES",
                   help="use N images drawn from the train split (stratified, data.train_subset)")
    p.add_argument("--pretrain-classes", type=int, nargs="+", default=None,
                   help="pretrain on these classes only (transfer regime)")
    p.add_argument("--eval-classes", type=int, nargs="+", default=None,
                   help="evaluate on these classes only (with --pretrain-classes: unseen classes)")
    p.add_argument("--label-counts", type=int, nargs="*", default=[10, 100], help="labels per class [10 100]")
    p.add_argument("--draws", type=int, default=3, help="label draws per count [3]")
    p.add_argument("--encoder", choices=["target", "context"], default=None,
                   help="which encoder of each pretrained row is evaluated: the EMA target (I-JEPA's "
                        "choice) or the context encoder [the recipe's train.export_encoder]")
    p.add_argument("--finetune-epochs", type=int, default=0, help="short fine-tune of each trained row [0 = off]")
    p.add_argument("--finetune-augment", choices=["flip", "recipe"], default="flip",
                   help="the fine-tune's training views: horizontal flips, or the recipe's pretraining "
                        "augmentation, as the supervised row [flip]")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="peak lr of the fine-tune [1e-3]")
    p.add_argument("--finetune-probe-epochs", type=int, default=0, metavar="N",
                   help="LP-FT: fit the head alone on the frozen encoder for N epochs before the fine-tune "
                        "(scored on validation as epoch 0, a candidate like the others) [0 = off]")
    p.add_argument("--supervised-epochs", type=int, default=None, metavar="N",
                   help="epochs of the supervised row instead of the ones ours' wall budget buys on this "
                        "machine (to rerun a recorded table's supervised row elsewhere with the epochs it got)")
    p.add_argument("--linear-lrs", type=float, nargs="+", default=None, metavar="LR",
                   help="learning rates of the linear probe's validation grid [tools/eval_linear.py's]")
    p.add_argument("--linear-epochs", type=int, nargs="+", default=None, metavar="E",
                   help="epochs of the linear probe's validation grid [tools/eval_linear.py's]; on 60,000 "
                        "images 10-30 epochs are as many updates as 100-300 on the demo's 4,500")
    p.add_argument("--whiten-dims", type=int, nargs="+", default=None, metavar="D",
                   help="add the column kNN@20 of PCA-whitened features (fit on the bank, never the test "
                        "split), its dim chosen per row among these on the validation split carved from train "
                        "(scott.eval.whitening.whitened_knn) [off]")
    p.add_argument("--monitor-every", type=int, default=0, metavar="EPOCHS",
                   help="kNN monitor on the validation split every EPOCHS epochs of each pretraining row, "
                        "for the time-to-accuracy column [0 = off]")
    p.add_argument("--time-to-knn", type=float, default=0.85, metavar="FRACTION",
                   help="time-to-accuracy column: minutes of pretraining until the validation kNN first "
                        "reaches FRACTION [0.85]; needs --monitor-every")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe override for every row")
    p.add_argument("--row-set", action="append", default=[], metavar="ROW:SECTION.KEY=VALUE",
                   help="override for one row (e.g. pixel:optim.lr=2e-4)")
    p.add_argument("--out", default=None, help="output folder [runs/quality/<recipe>-<regime>]")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_malloc_flag(p)
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: tabulate the rows and seeds already finished in OUT")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- recipes
def regime_name(args) -> str:
    parts = [f"subset{args.subset}" if args.subset else "full"]
    if args.pretrain_classes:
        parts.append("cls" + "".join(map(str, args.pretrain_classes)))
    if args.eval_classes:
        parts.append("eval" + "".join(map(str, args.eval_classes)))
    return "-".join(parts)


def row_overrides(args, row: str, seed: int) -> list[str]:
    """Overrides of a row's PRETRAINING recipe."""
    sets = list(args.overrides) + PRETRAIN_ROWS.get(row, []) + [f"train.seed={seed}",
                                                                f"train.monitor_every={args.monitor_every}"]
    if args.subset:
        sets.append(f"data.train_subset={args.subset}")
    if args.pretrain_classes:
        sets.append(f"data.classes={list(args.pretrain_classes)}")
    sets += [s.split(":", 1)[1] for s in args.row_set if s.split(":", 1)[0] == row]
    return sets


def eval_recipe(args, recipe):
    """The recipe evaluation reads: the pretraining data, restricted to ``--eval-classes``."""
    classes = list(args.eval_classes) if args.eval_classes else None
    return recipe.with_overrides([f"data.classes={'null' if classes is None else classes}"])


# ----------------------------------------------------------------------------- finished records
def legacy_request(record: dict) -> dict:
    """What a record written before records kept their ``request`` was made for, as far as its
    numbers tell: the pretraining overrides and fixed steps, the supervised row's fixed epochs,
    the label counts and draws, the fine-tune epochs."""
    made = {}
    if "overrides" in record:
        made["overrides"] = record["overrides"]
        made["steps"] = None if "calibration_images_per_s" in record else record.get("steps")
    if record.get("row") == "supervised":
        made["supervised_epochs"] = record.get("finetune_epochs") if record.get("budget_s") is None else None
    elif "knn" in record:  # an evaluation record: fine-tuned only if it says so
        made["finetune_epochs"] = record.get("finetune_epochs", 0)
    counts = sorted(int(k[6:]) for k in record if k.startswith("labels") and k[6:].isdigit())
    if counts or "knn" in record or record.get("row") == "supervised":
        made["label_counts"] = counts
    draws = [v for k, v in record.items() if k.startswith("labels") and k.endswith("_draws")]
    if draws:
        made["draws"] = len(draws[0])
    return made


# what a record made before a request key existed was made with
REQUEST_DEFAULTS = {"finetune_augment": "flip", "whiten_dims": None, "finetune_lr": 1e-3, "finetune_probe_epochs": 0}
FINETUNE_KEYS = ("finetune_augment", "finetune_lr", "finetune_probe_epochs")  # what only a fine-tune depends on


def request_mismatch(record: dict, request: dict) -> str | None:
    """Why a finished ``record`` does not answer ``request`` (None if it does). The record's own
    ``request`` (or, for an older record, :func:`legacy_request`) is compared key by key; a key
    it does not know is not held against it. ``label_counts`` need only be among the record's;
    ``finetune_epochs`` of 0 asks for no fine-tune, which any record answers (whatever its
    ``finetune_augment``; a record from before that key fine-tuned on flips)."""
    made = {**REQUEST_DEFAULTS, **(record.get("request") or legacy_request(record))}
    for key, want in request.items():
        if key not in made:
            continue
        if key in FINETUNE_KEYS and not request.get("finetune_epochs"):
            continue
        have = made[key]
        if key == "label_counts":
            missing = sorted(set(want) - set(have))
            if missing:
                return f"it has no {', '.join(f'labels{c}' for c in missing)} column (label counts {have})"
        elif key == "finetune_epochs" and not want:
            continue
        elif have != want:
            return f"it was made with {key} {have!r}, this command asks for {want!r}"
    return None


def finished_record(record_file: Path, request: dict, args, log) -> dict | None:
    """The finished record in ``record_file`` when it answers ``request``; None when there is none.
    A record made for another request stops the benchmark with one line (exit 2), since reusing
    it would tabulate numbers of another setting; ``--report-only`` only warns."""
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    why = request_mismatch(record, request)
    if why is not None:
        message = (f"{record_file}: a finished record that does not match this command: {why}. "
                   "Use another --out, or delete that folder to redo it")
        if not args.report_only:
            raise RecipeError(message)
        log(f"[yellow]warning[/]: {message}")
    return record


def pretrain_request(args, row: str, seed: int) -> dict:
    return {"overrides": row_overrides(args, row, seed), "steps": args.steps, "budget_minutes": args.budget_minutes}


def eval_request(args) -> dict:
    return {"label_counts": sorted(args.label_counts), "draws": args.draws,
            "whiten_dims": sorted(set(args.whiten_dims)) if args.whiten_dims else None,
            "linear_grid": linear_grid_of(args) or "default", "finetune_epochs": args.finetune_epochs,
            "finetune_augment": args.finetune_augment, "finetune_lr": args.finetune_lr,
            "finetune_probe_epochs": args.finetune_probe_epochs}


def floor_request(args, overrides: list[str]) -> dict:
    """A floor row's request: the probes' settings, never a fine-tune (floors are not fine-tuned)."""
    return {"overrides": overrides,
            **{k: v for k, v in eval_request(args).items() if k != "finetune_epochs" and k not in FINETUNE_KEYS}}


def supervised_request(args) -> dict:
    return {"supervised_epochs": args.supervised_epochs, "label_counts": sorted(args.label_counts),
            "draws": args.draws}


# ----------------------------------------------------------------------------- pretraining
def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _median_seconds_per_image(run_dir: Path) -> float:
    """Median seconds per image of a run's steps, the first two (warm-up) left out."""
    records = _records(run_dir)
    times = [1.0 / r["images_per_s"] for r in records[2:] if r.get("images_per_s")]
    return float(np.median(times))


def minutes_to_knn(records: list[dict], threshold: float, batch_size: int) -> tuple[float | None, int | None]:
    """``(minutes, step)`` of pretraining until the validation kNN monitor of a run's metrics
    ``records`` first reached ``threshold`` (a fraction), or ``(None, None)`` if it never did.
    Minutes are the sum of the steps' own wall times (``batch_size / images_per_s`` of each
    record), so the monitor's evaluations and the run's start-up are not counted."""
    seconds = 0.0
    for r in records:
        seconds += batch_size / r["images_per_s"]
        if r.get("knn_top1") is not None and r["knn_top1"] >= threshold:
            return seconds / 60.0, int(r["step"])
    return None, None


def steps_for_budget(recipe, budget_s: float, scratch: Path) -> tuple[int, float]:
    """(steps that fit ``budget_s``, measured images/s) from a short calibration run."""
    from scott.train import pretrain

    cal = recipe.with_overrides([f"train.max_steps={CALIBRATION_STEPS}", f"train.checkpoint_every={10 ** 9}"])
    if scratch.exists():
        import shutil

        shutil.rmtree(scratch)
    pretrain(cal, scratch)
    sec_per_image = _median_seconds_per_image(scratch)
    sec_per_step = sec_per_image * int(recipe["optim"]["batch_size"])
    return max(1, int(budget_s / sec_per_step)), 1.0 / sec_per_image


def pretrain_row(args, row: str, seed: int, out: Path, log) -> dict:
    """Pretrain one row/seed (or reuse a finished one); returns its record."""
    from scott.train import pretrain

    run_dir = out / row / f"seed{seed}"
    record_file = run_dir / "pretrain_record.json"
    request = pretrain_request(args, row, seed)
    finished = finished_record(record_file, request, args, log)
    if finished is not None:
        return finished
    recipe = load_recipe(args.recipe, request["overrides"])
    info = {}
    if args.steps:
        steps = int(args.steps)
    else:
        steps, ips = steps_for_budget(recipe, 60.0 * args.budget_minutes, out / "_calibration")
        info["calibration_images_per_s"] = ips
    recipe = recipe.with_overrides([f"train.max_steps={steps}", f"train.checkpoint_every={max(1, steps // 4)}"])
    log(f"[bold]{row}[/] seed {seed}: pretraining {steps} steps")
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    summary = pretrain(recipe, run_dir)
    record = {"row": row, "seed": seed, "steps": steps, "wall_s": time.perf_counter() - t0,
              "train_wall_s": summary["wall_s"], "images_per_s": summary["images_per_s"],
              "overrides": request["overrides"], "request": request, **info}
    if args.monitor_every:
        records = _records(run_dir)
        minutes, step = minutes_to_knn(records, args.time_to_knn, int(recipe["optim"]["batch_size"]))
        record.update({"minutes_to_knn": minutes, "step_to_knn": step, "time_to_knn": args.time_to_knn,
                       "monitor_knn": [[r["step"], r["knn_top1"]] for r in records if "knn_top1" in r]})
    record_file.write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------- evaluation
def feature_sets(encoder, recipe: dict):
    from scott.eval.features import extract_features
    from scott.eval.protocol import FeatureSet
    from scott.eval.runs import eval_datasets

    train, test = eval_datasets(recipe)
    xb, yb = extract_features(encoder, train, progress=False)
    xq, yq = extract_features(encoder, test, progress=False)
    return FeatureSet(xb, yb), FeatureSet(xq, yq)


def linear_grid_of(args) -> list[dict] | None:
    """The linear probe's grid from ``--linear-lrs`` / ``--linear-epochs`` (None: the default)."""
    from scott.eval.linear import DEFAULT_EPOCHS, DEFAULT_LRS, linear_grid

    if args.linear_lrs is None and args.linear_epochs is None:
        return None
    return linear_grid(args.linear_lrs or DEFAULT_LRS, args.linear_epochs or DEFAULT_EPOCHS)


def evaluate_features(args, train, test, seed: int) -> dict:
    """kNN, linear probe and label-efficiency numbers of frozen features (fractions)."""
    from scott.eval.few_labels import few_label_probe
    from scott.eval.knn import knn_classify
    from scott.eval.linear import linear_probe

    t0 = time.perf_counter()
    knn = knn_classify(train.features, train.labels, test.features, test.labels, k=KNN_K)[0]
    linear = linear_probe(train, test, seed=seed, grid=linear_grid_of(args))
    out = {"knn": knn, "linear": linear.test["top1"], "linear_best": linear.best,
           "linear_val": linear.val["top1"], "n_train": len(train), "n_test": len(test)}
    if args.whiten_dims:
        from scott.eval.whitening import whitened_knn

        out.update(whitened_knn(train, test, args.whiten_dims, k=KNN_K, seed=seed))
    for count in args.label_counts:
        few = few_label_probe(train, test, count, draws=args.draws, seed=seed)
        out[f"labels{count}"] = few["test_top1_mean"]
        out[f"labels{count}_std"] = few["test_top1_std"]
        out[f"labels{count}_draws"] = [d["test_top1"] for d in few["draws"]]
    out["probe_wall_s"] = time.perf_counter() - t0
    return out


def finetune_encoder(encoder, recipe: dict, epochs: int, seed: int, augment: str = "flip", lr: float = 1e-3,
                     probe_epochs: int = 0) -> dict:
    """Fine-tune ``encoder`` on the fit part; ``augment`` "recipe" trains on the recipe's
    pretraining views (``AugmentedLabels``, as the supervised row), "flip" on flipped images;
    ``probe_epochs`` > 0 fits the head on the frozen encoder first (LP-FT)."""
    from scott.data.datasets import split_train_val
    from scott.eval.features import EvalView, encoder_in_chans, resolve_transform
    from scott.eval.finetune import FinetuneClassifier, finetune, seeded_init
    from scott.eval.runs import dataset_labels, eval_datasets
    from scott.eval.supervised import training_views

    train, test = eval_datasets(recipe)
    labels = dataset_labels(train)
    fit_idx, val_idx = split_train_val(labels.numpy(), float(recipe["data"]["val_fraction"]), seed)
    fn, convert = resolve_transform(encoder, None)
    chans = encoder_in_chans(encoder)
    view = lambda ds: EvalView(ds, fn, chans, convert)  # noqa: E731
    fit = training_views(torch.utils.data.Subset(train, fit_idx.tolist()), recipe, view, augment, seed)
    val = view(torch.utils.data.Subset(train, val_idx.tolist()))
    with seeded_init(seed):
        model = FinetuneClassifier(encoder.train(), int(labels.max()) + 1)
    res = finetune(model, fit, val, view(test), epochs=epochs, lr=lr, seed=seed, log=lambda s: None,
                   probe_epochs=probe_epochs)
    return {"finetune": res["test"]["top1"], "finetune_val": res["val"]["top1"], "finetune_epochs": epochs,
            "finetune_augment": augment, "finetune_lr": lr, "finetune_probe_epochs": probe_epochs,
            "finetune_best_epoch": res["best_epoch"]}


def eval_record_name(encoder: str) -> str:
    """A pretrained row's evaluation record for ``encoder`` (both can sit in one run folder)."""
    return "eval_record.json" if encoder == "target" else f"eval_record_{encoder}.json"


def evaluate_pretrained(args, row: str, seed: int, out: Path, log) -> dict:
    from scott.eval.features import load_encoder

    run_dir = out / row / f"seed{seed}"
    result_file = run_dir / eval_record_name(args.encoder)
    request = eval_request(args)
    finished = finished_record(result_file, request, args, log)
    if finished is not None:
        return finished
    recipe = eval_recipe(args, load_recipe(run_dir / "recipe.yaml"))
    encoder = load_encoder(run_dir, which=args.encoder)
    train, test = feature_sets(encoder, recipe)
    result = {"encoder": args.encoder, "request": request, **evaluate_features(args, train, test, seed)}
    if args.finetune_epochs:
        result.update(finetune_encoder(encoder, recipe, args.finetune_epochs, seed, args.finetune_augment,
                                       args.finetune_lr, args.finetune_probe_epochs))
    result_file.write_text(json.dumps(result, indent=1))
    return result


def evaluate_floor(args, row: str, seed: int, out: Path, log) -> dict:
    from scott.eval.runs import pixel_source, random_init_source

    result_file = out / row / f"seed{seed}" / "eval_record.json"
    sets = row_overrides(args, "ours", seed)
    request = floor_request(args, sets)
    finished = finished_record(result_file, request, args, log)
    if finished is not None:
        return finished
    source = (random_init_source(args.recipe, sets, seed=seed) if row == "random_init"
              else pixel_source(args.recipe, sets))
    recipe = eval_recipe(args, source.recipe)
    train, test = feature_sets(source.encoder, recipe)
    result = {"row": row, "seed": seed, "request": request, **evaluate_features(args, train, test, seed)}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def evaluate_supervised(args, seed: int, budget_s: float, out: Path, log) -> dict:
    """Row 5: from scratch on all labels (given ``budget_s``), and on each label count."""
    from scott.data.datasets import LabeledSubset, split_train_val
    from scott.data.subsets import labels_per_class
    from scott.data.transforms import eval_transform_spec, transform_from_spec
    from scott.eval.features import EvalView
    from scott.eval.runs import dataset_labels, eval_datasets
    from scott.eval.supervised import build_classifier, seconds_per_step, supervised_from_scratch

    result_file = out / "supervised" / f"seed{seed}" / "eval_record.json"
    finished = finished_record(result_file, supervised_request(args), args, log)
    if finished is not None:
        return finished
    recipe = eval_recipe(args, load_recipe(args.recipe, row_overrides(args, "ours", seed)))
    train, test = eval_datasets(recipe)
    labels = dataset_labels(train).numpy()
    classes = int(labels.max()) + 1
    fit_idx, val_idx = split_train_val(labels, float(recipe["data"]["val_fraction"]), seed)
    fn = transform_from_spec(eval_transform_spec(recipe["model"]))  # the recipe's evaluation transform
    view = lambda ds: EvalView(ds, fn, int(recipe["model"]["in_chans"]), True)  # noqa: E731
    val, test_view = view(LabeledSubset(train, val_idx)), view(test)
    batch = int(recipe["optim"]["batch_size"])
    steps_per_epoch = max(1, len(fit_idx) // batch)
    if args.supervised_epochs is None:  # the epochs ours' budget buys, timed on this machine
        size, c = recipe["model"]["img_size"], recipe["model"]["in_chans"]
        probe = build_classifier(recipe, classes, seed)
        sec = seconds_per_step(probe, torch.randn(batch, c, size, size), torch.randint(0, classes, (batch,)))
        epochs = max(1, int(budget_s / (sec * steps_per_epoch)))
        log(f"[bold]supervised[/] seed {seed}: {epochs} epochs from scratch ({budget_s:.0f} s budget)")
    else:
        epochs = args.supervised_epochs
        log(f"[bold]supervised[/] seed {seed}: {epochs} epochs from scratch (--supervised-epochs)")
    t0 = time.perf_counter()
    full = supervised_from_scratch(recipe, LabeledSubset(train, fit_idx), val, test_view, epochs, classes,
                                   seed=seed, log=lambda s: None)
    result = {"row": "supervised", "seed": seed, "request": supervised_request(args), "finetune": full["test"]["top1"], "finetune_val": full["val"]["top1"],
              "finetune_epochs": epochs, "wall_s": time.perf_counter() - t0,
              "budget_s": budget_s if args.supervised_epochs is None else None,
              "n_train": len(fit_idx), "n_test": len(test)}
    for count in args.label_counts:
        accs = []
        for d in range(args.draws):
            few = labels_per_class(labels, count, seed=d, pool=fit_idx)
            # as many optimiser steps as the full-label run, capped at FEW_LABEL_STEPS, >= 20 epochs
            steps = min(epochs * steps_per_epoch, FEW_LABEL_STEPS)
            few_epochs = max(20, int(steps / max(1, len(few) // batch)))
            res = supervised_from_scratch(recipe, LabeledSubset(train, few), val, test_view, few_epochs, classes,
                                          seed=seed, batch_size=min(batch, len(few)), log=lambda s: None)
            accs.append(res["test"]["top1"])
        result[f"labels{count}"] = float(np.mean(accs))
        result[f"labels{count}_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        result[f"labels{count}_draws"] = accs
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- report
def columns(label_counts, whiten: bool = False) -> list[tuple[str, str]]:
    """(record key, header) of the table's columns."""
    return ([("knn", f"kNN@{KNN_K}")] + ([("knn_white", f"kNN@{KNN_K} whitened")] if whiten else [])
            + [("linear", "linear")]
            + [(f"labels{c}", f"{c} labels/cls") for c in label_counts]
            + [("finetune", "fine-tune"), ("minutes_to_knn", "min to kNN"), ("images_per_s", "img/s"),
               ("steps", "steps"), ("wall_s", "wall s")])


def is_percent(key: str) -> bool:
    return key in ("knn", "knn_white", "linear", "finetune") or (key.startswith("labels") and key[6:].isdigit())


def summarise(rows: dict[str, list[dict]], cols) -> dict[str, dict]:
    """Per row: mean and sample std over seeds of every numeric column."""
    table = {}
    for row, records in rows.items():
        stats = {"seeds": len(records)}
        for key, _ in cols:
            values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
            if key == "minutes_to_knn" and any(key in r and r[key] is None for r in records):
                stats["minutes_to_knn_missed"] = sum(key in r and r[key] is None for r in records)
            if values:
                stats[key] = float(np.mean(values))
                stats[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        table[row] = stats
    return table


def format_cell(stats: dict, key: str) -> str:
    if key == "minutes_to_knn" and stats.get("minutes_to_knn_missed"):
        return f"not reached ({stats['minutes_to_knn_missed']} of {stats['seeds']})"
    if key not in stats:
        return "-"
    scale = 100.0 if is_percent(key) else 1.0
    mean, std = stats[key] * scale, stats.get(f"{key}_std", 0.0) * scale
    digits = 1 if is_percent(key) or key in ("wall_s", "minutes_to_knn") else 0
    text = f"{mean:.{digits}f}"
    if stats["seeds"] > 1 and is_percent(key):
        text += f" ± {std:.{digits}f}"
    return text


def rich_table(summary: dict, title: str, cols):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("row")
    table.add_column("seeds", justify="right")
    for _, name in cols:
        table.add_column(name, justify="right")
    for row, stats in summary.items():
        table.add_row(row, str(stats["seeds"]), *[format_cell(stats, k) for k, _ in cols])
    return table


def bar_chart_png(summary: dict, path: Path, title: str, cols) -> Path:
    from scott.viz import bar_chart

    metrics = [(k, n) for k, n in cols if is_percent(k) and any(k in s for s in summary.values())]
    groups = {name: {row: (100 * s[k], 100 * s.get(f"{k}_std", 0.0)) for row, s in summary.items() if k in s}
              for k, name in metrics}
    bar_chart(groups, title=title, ylabel="top-1 %").save(path)
    return path


def finished_ours_budgets(out: Path, encoder: str) -> list[float]:
    """Pretraining + probe seconds of every finished seed of row ``ours`` under ``out`` whose
    ``encoder`` (target | context) has been evaluated."""
    budgets = []
    for seed in range(1000):
        folder = out / "ours" / f"seed{seed}"
        evaluated = folder / eval_record_name(encoder)
        if not evaluated.is_file() or not (folder / "pretrain_record.json").is_file():
            break
        pre = json.loads((folder / "pretrain_record.json").read_text())
        budgets.append(pre["train_wall_s"] + json.loads(evaluated.read_text())["probe_wall_s"])
    return budgets


def seeds_of(args, row: str) -> int:
    """``--row-seeds ROW:N`` for ``row``, else ``--seeds``."""
    for item in args.row_seeds:
        name, _, count = item.partition(":")
        if name not in ALL_ROWS or not count.isdigit() or int(count) < 1:
            raise RecipeError(f"--row-seeds {item!r}: expected ROW:N with ROW one of {', '.join(ALL_ROWS)} and N >= 1")
        if name == row:
            return int(count)
    return args.seeds


def check_label_counts(args, recipe: dict) -> None:
    """Every ``--label-counts`` value must fit in the smallest class of the probes' fit part."""
    from scott.data.datasets import split_train_val
    from scott.eval.runs import dataset_labels, eval_datasets

    train, _ = eval_datasets(eval_recipe(args, recipe))
    labels = dataset_labels(train).numpy()
    fit, _ = split_train_val(labels, float(recipe["data"]["val_fraction"]), 0)
    smallest = int(np.bincount(labels[fit])[np.unique(labels[fit])].min())
    too_many = [c for c in args.label_counts if c > smallest]
    if too_many:
        raise RecipeError(f"--label-counts {too_many}: the smallest class has {smallest} labelled images in the "
                          f"probes' fit part ({len(fit)} images); use counts <= {smallest}")


def main(argv=None):
    from rich.console import Console

    from scott.data.datasets import build_pretrain_dataset

    args = parse_args(argv)
    console = Console(width=max(150, Console().width))
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_malloc_choice(args)
    if args.seeds < 1 or args.first_seed < 0 or args.draws < 1 or (args.steps is not None and args.steps < 1) or \
            (args.budget_minutes is not None and args.budget_minutes <= 0) or \
            (args.supervised_epochs is not None and args.supervised_epochs < 1) or \
            args.finetune_lr <= 0 or args.finetune_probe_epochs < 0:
        raise RecipeError("need --seeds >= 1, --first-seed >= 0, --draws >= 1, a positive --steps or --budget-minutes, "
                          "--supervised-epochs >= 1 when given, --finetune-lr > 0 and --finetune-probe-epochs >= 0")
    base = load_recipe(args.recipe, row_overrides(args, "ours", 0))  # fails early, one line, exit 2
    args.encoder = args.encoder or base["train"]["export_encoder"]  # the encoder the recipe exports
    check_label_counts(args, base)
    out = Path(args.out or Path("runs") / "quality" / f"{Path(args.recipe).stem}-{regime_name(args)}")
    out.mkdir(parents=True, exist_ok=True)
    log = console.log
    t_start = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    ours_budget = finished_ours_budgets(out, args.encoder)  # row "ours" of an earlier or parallel invocation
    for row in [r for r in ALL_ROWS if r in args.rows]:
        for seed in range(args.first_seed, args.first_seed + seeds_of(args, row)):
            record_name = eval_record_name(args.encoder) if row in PRETRAIN_ROWS else "eval_record.json"
            if args.report_only and not (out / row / f"seed{seed}" / record_name).is_file():
                continue
            if row in PRETRAIN_ROWS:
                record = pretrain_row(args, row, seed, out, log)
                record.update(evaluate_pretrained(args, row, seed, out, log))
                if row == "ours" and seed >= len(ours_budget):
                    ours_budget.append(record["train_wall_s"] + record["probe_wall_s"])
            elif row == "supervised":
                budget = (float(np.mean(ours_budget)) if ours_budget
                          else 60.0 * (args.budget_minutes or 1.0))
                record = evaluate_supervised(args, seed, budget, out, log)
            else:
                record = evaluate_floor(args, row, seed, out, log)
            rows.setdefault(row, []).append(record)
            log(f"{row} seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in record.items()
                                                   if is_percent(k) and isinstance(v, float)))
    if not rows:
        raise RecipeError(f"{out}: no finished rows to report")
    cols = columns(args.label_counts, whiten=bool(args.whiten_dims))
    summary = summarise(rows, cols)
    title = (f"{Path(args.recipe).name} [{regime_name(args)}], "
             + (f"{args.budget_minutes:g} min budget" if args.budget_minutes else f"{args.steps} steps"))
    console.print(rich_table(summary, title, cols))
    record = {
        "command": "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "recipe_file": args.recipe, "recipe": base.to_dict(), "data": base["data"]["name"], "regime": regime_name(args), "budget_minutes": args.budget_minutes,
        "steps": args.steps, "seeds": {r: len(records) for r, records in rows.items()}, "label_counts": args.label_counts, "draws": args.draws,
        "linear_grid": linear_grid_of(args) or "default", "encoder": args.encoder, "monitor_every": args.monitor_every,
        "time_to_knn": args.time_to_knn if args.monitor_every else None,
        "cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "n_pretrain_images": len(build_pretrain_dataset(base["data"])), "knn_k": KNN_K,
        "summary": summary, "rows": rows, "total_wall_s": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d"),
    }
    first = next(iter(rows.values()))[0]
    record["n_train"], record["n_test"] = first.get("n_train"), first.get("n_test")
    (out / "quality.json").write_text(json.dumps(record, indent=1, default=str))
    png = bar_chart_png(summary, out / "quality.png", title, cols)
    console.print(f"record -> {out / 'quality.json'}\nchart  -> {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
