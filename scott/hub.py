"""A model folder you can share: the Hugging Face / timm layout of an exported encoder.

    export_pretrained(run_dir_or_encoder, out_dir, metrics=None, which=None) -> Path
    from_pretrained(folder, num_classes=0, **kwargs) -> ScottViT

The folder holds three files, the layout ``timm`` and ``huggingface_hub`` expect:

* ``config.json``: timm's keys. ``architecture`` is the registered ``scott_vit_*`` model that
  needs the fewest changes, ``model_args`` holds those changes, ``num_classes`` is 0 (an export
  has no classifier), ``num_features`` the pooled width, ``pretrained_cfg`` the evaluation
  transform (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``).
  A ``scott`` block holds the full ``model`` section, the recipe name, the measured metrics,
  the sha256 of ``model.safetensors`` and the sha256 of the encoder export it came from.
* ``model.safetensors``: the weights of a :class:`~scott.models.timm_family.ScottViT` with
  ``num_classes=0`` (``encoder.*`` and ``fc_norm.*``), with the export's integrity metadata:
  ``format`` = ``scott.vit/1``, ``model``, ``eval_transform``, ``extra`` and ``sha256``
  (:func:`scott.checkpoint.encoder_digest`, checked on every load).
* ``README.md``: the model card. YAML front matter (``library_name: timm``, tags, a license
  placeholder), then how to load it, the data, steps, the kNN / linear numbers with their splits
  ("not measured" where none was passed) and the recipe as YAML.

Loading is offline: ``scott.from_pretrained(folder)`` or, with timm,
``timm.create_model("local-dir:FOLDER", pretrained=True)`` after ``import scott`` (which
registers the architectures); both verify the sha256. ``huggingface_hub.upload_folder`` can
upload the folder unchanged, after which ``timm.create_model("hf-hub:USER/REPO",
pretrained=True)`` reads the same ``config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

__all__ = ["export_pretrained", "from_pretrained", "closest_architecture", "model_card", "verify_weights",
           "CONFIG_FILE", "WEIGHTS_FILE", "CARD_FILE", "WEIGHTS_FORMAT"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
WEIGHTS_FORMAT = "scott.vit/1"

#: ScottViT arguments from_pretrained accepts besides ``num_classes`` (the architecture is the export's)
LOAD_KWARGS = ("global_pool", "drop_rate", "drop_path_rate", "fc_norm", "dynamic_img_size", "backend")
#: Metric rows every card shows (measured or not), with the command that measures them
_STANDARD = {"knn": ("kNN", "--knn"), "linear": ("linear probe", "--linear")}


# ----------------------------------------------------------------------------- architecture
def _norm(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]  # img_size [28, 28] == 28
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return json.dumps(value)


def _vit_args(model_cfg: Mapping) -> dict:
    """ScottViT architecture arguments of a recipe ``model`` section (no backend)."""
    from scott.models.encoder import encoder_kwargs

    args = encoder_kwargs(model_cfg)
    args.pop("backend")
    return args


def closest_architecture(model_cfg: Mapping) -> tuple[str, dict]:
    """(registered ``scott_vit_*`` name, ``model_args``): the name whose arguments differ from the
    export's in the fewest places, and those differences (empty when the name matches)."""
    import inspect

    from scott.models.timm_family import FAMILY, ScottViT

    args = _vit_args(model_cfg)
    defaults = {k: p.default for k, p in inspect.signature(ScottViT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults["global_pool"] = "avg"  # ScottViT's None: the encoder's default pool
    best: tuple[str, dict] | None = None
    for name, fixed in FAMILY.items():
        ref = {**defaults, **fixed}
        diff = {k: v for k, v in args.items() if _norm(ref.get(k)) != _norm(v)}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    assert best is not None
    return best


def _build(model_cfg: Mapping, spec: Mapping | None, num_classes: int, source_path: str | None = None,
           **kwargs):
    """ScottViT of an export's ``model`` section, its encoder carrying the export's metadata."""
    from scott.config import as_section
    from scott.models.encoder import Encoder
    from scott.models.timm_family import ScottViT

    unknown = sorted(set(kwargs) - set(LOAD_KWARGS))
    if unknown:
        raise TypeError(f"from_pretrained builds the exported architecture; it accepts num_classes and "
                        f"{', '.join(LOAD_KWARGS)}, not {', '.join(unknown)}")
    section = as_section("model", dict(model_cfg))
    args = _vit_args(section)
    encoder = Encoder(**args, backend=kwargs.pop("backend", None) or "auto",
                      drop_path_rate=float(kwargs.pop("drop_path_rate", 0.0)), model_cfg=section,
                      eval_transform_spec=spec, source_path=source_path)
    return ScottViT(num_classes=num_classes, encoder=encoder, **kwargs)


# ----------------------------------------------------------------------------- integrity
def verify_weights(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | Path) -> None:
    """Raise :class:`scott.checkpoint.DamagedFileError` (one line) unless ``tensors`` are what
    was written to ``path`` (a ``scott.vit/1`` file): its ``sha256`` over metadata and tensors."""
    from scott.checkpoint import DamagedFileError, encoder_digest

    if metadata.get("format") != WEIGHTS_FORMAT:
        raise DamagedFileError(f"{path}: not a scott model file (format {metadata.get('format')!r}, expected "
                               f"{WEIGHTS_FORMAT!r}); write the folder with tools/export_model.py")
    expected = metadata.get("sha256")
    if not expected or encoder_digest(tensors, metadata) != expected:
        raise DamagedFileError(f"{path}: damaged file: its content no longer matches the sha256 recorded when it "
                               "was exported; copy the folder again from its source or export it again")


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError

    from scott.checkpoint import DamagedFileError, load_tensors

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an exported model folder holds {CONFIG_FILE}, "
                                f"{WEIGHTS_FILE} and {CARD_FILE})")
    try:
        tensors, metadata = load_tensors(path)
    except (SafetensorError, OSError) as exc:
        raise DamagedFileError(f"{path}: damaged or not a safetensors file ({exc}); copy the folder again "
                               "from its source or export it again") from None
    verify_weights(tensors, metadata, path)
    return tensors, metadata


# ----------------------------------------------------------------------------- export
def export_pretrained(run_dir_or_encoder: str | Path, out_dir: str | Path, metrics: Mapping | None = None,
                      which: str | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``out_dir``; returns it.

    ``run_dir_or_encoder`` is a run folder (its ``encoder.safetensors`` for ``which="target"``,
    ``context_encoder.safetensors`` for ``"context"``, the one its recipe's
    ``train.export_encoder`` names for ``None``) or an exported ``.safetensors`` file (the encoder
    it records being); the
    recipe is read from ``recipe.yaml`` next to it when there is one. ``metrics`` maps a
    protocol to its result, top-1 as a fraction in [0, 1]: a number, a mapping with ``top1`` and
    ``split`` (and optionally ``top5``, ``k``, ``pool``, ``n_train``/``n_test`` or
    ``n_bank``/``n_query``, ``random_init``, ``pixels``), or for ``"knn"`` the report of
    :func:`scott.eval.online.compare_with_random_init` as it is. Rows for ``knn`` and ``linear``
    always appear on the card, "not measured" when absent.

    Raises FileNotFoundError (no export), :class:`scott.checkpoint.DamagedFileError` (its sha256
    does not match) or ValueError (weights that do not fit their metadata).
    """
    from safetensors import safe_open

    import scott
    from scott.checkpoint import atomic_write_text, encoder_digest, load_encoder_file, save_tensors
    from scott.eval.features import encoder_file, resolve_which

    which = resolve_which(run_dir_or_encoder, which)
    source = encoder_file(run_dir_or_encoder, which)
    state, model_cfg, spec, extra = load_encoder_file(source)
    with safe_open(str(source), "pt") as fh:
        source_sha = (fh.metadata() or {}).get("sha256")
    model = _build(model_cfg, spec, num_classes=0)
    try:
        model.encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{source}: weights do not match the architecture in its metadata: {exc}") from None
    tensors = model.state_dict()
    recipe_path = source.parent / "recipe.yaml"
    recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else None
    info = {**extra, "which": which, "source_file": source.name, "source_sha256": source_sha}
    info.setdefault("recipe", _recipe_name(recipe_text))
    metadata = {"format": WEIGHTS_FORMAT, "model": json.dumps(dict(model_cfg), sort_keys=True),
                "eval_transform": json.dumps(dict(spec) if spec else None, sort_keys=True),
                "extra": json.dumps(info, sort_keys=True, default=str)}
    metadata["sha256"] = encoder_digest(tensors, metadata)

    architecture, model_args = closest_architecture(model_cfg)
    rows = _metric_rows(metrics, which)
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("url", "architecture")}
    pretrained_cfg["num_classes"] = 0
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "global_pool": model.global_pool,
        **({"model_args": model_args} if model_args else {}),
        "pretrained_cfg": pretrained_cfg,
        "scott": {"format": WEIGHTS_FORMAT, "version": scott.__version__, "model": dict(model_cfg),
                  "eval_transform": spec, "recipe": info.get("recipe"), "objective": info.get("objective"),
                  "which": which, "step": info.get("step"), "sha256": metadata["sha256"],
                  "encoder_sha256": source_sha,
                  "metrics": {r["name"]: {k: v for k, v in r.items() if k not in ("name", "label")}
                              for r in rows if r.get("top1") is not None}},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / WEIGHTS_FILE, tensors, metadata)
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
    atomic_write_text(out / CARD_FILE, model_card(config, rows, recipe_text))
    return out


def _recipe_name(recipe_text: str | None) -> str | None:
    if not recipe_text:
        return None
    import yaml

    try:
        loaded = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        return None
    return loaded.get("name") if isinstance(loaded, dict) else None


# ----------------------------------------------------------------------------- model card
def _metric_rows(metrics: Mapping | None, which: str) -> list[dict]:
    """One normalised row per protocol: name, label, top1 (None: not measured), split, details."""
    metrics = dict(metrics or {})
    rows = []
    for name in [*_STANDARD, *[m for m in metrics if m not in _STANDARD]]:
        entry = metrics.get(name)
        label = _STANDARD.get(name, (name, None))[0]
        if entry is None:
            rows.append({"name": name, "label": label, "top1": None})
            continue
        row = dict(entry) if isinstance(entry, Mapping) else {"top1": entry}
        if "top1" not in row and "pretrained" in row:  # compare_with_random_init's report
            row["top1"] = row.pop("pretrained_context" if which == "context" else "pretrained")
            row.pop("pretrained", None)
            row.pop("pretrained_context", None)
        top1 = row.get("top1")
        row["top1"] = float(top1) if isinstance(top1, (int, float)) and not isinstance(top1, bool) else None
        rows.append({"name": name, "label": label, **row})
    return rows


def _pct(value) -> str:
    value = float(value)
    return f"{100 * value:.2f} %" if 0.0 <= value <= 1.0 else f"{value:g}"


def _details(row: Mapping) -> str:
    parts = []
    if row.get("k") is not None:
        parts.append(f"k = {row['k']}")
    if row.get("pool"):
        parts.append(f"{row['pool']} pooling")
    for a, b, what in (("n_bank", "n_query", "bank / queries"), ("n_train", "n_test", "train / test")):
        if row.get(a) is not None and row.get(b) is not None:
            parts.append(f"{row[a]} / {row[b]} images ({what})")
    if row.get("top5") is not None:
        parts.append(f"top-5 {_pct(row['top5'])}")
    if row.get("random_init") is not None:
        parts.append(f"random init {_pct(row['random_init'])}")
    if row.get("pixels") is not None:
        parts.append(f"raw pixels {_pct(row['pixels'])}")
    if row.get("selected"):
        parts.append("chosen on val: " + ", ".join(f"{k} {v}" for k, v in dict(row["selected"]).items()))
    return "; ".join(parts)


def _front_matter(config: Mapping) -> str:
    import yaml

    block = config["scott"]
    tags = ["timm", "image-feature-extraction", "self-supervised", "vision-transformer", "scott"]
    tags += [str(block["objective"])] if block.get("objective") else []
    meta = {"library_name": "timm", "pipeline_tag": "image-feature-extraction",
            "tags": list(dict.fromkeys(tags))}
    body = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False)
    return ("---\n" + body + "license: other  # placeholder: set the weights' license (and the data's terms) "
            "before uploading\n---\n")


def model_card(config: Mapping, rows: list[dict], recipe_text: str | None) -> str:
    """README.md text of an export folder (see :func:`export_pretrained`)."""
    block = config["scott"]
    model = block.get("model") or {}
    arch = config["architecture"]
    args = config.get("model_args") or {}
    name = block.get("recipe") or "scott"
    which = "EMA target encoder" if block.get("which") == "target" else "context encoder"
    size = config["pretrained_cfg"].get("input_size")
    lines = [
        _front_matter(config),
        f"# {name}: {arch}" + (" (with model_args)" if args else ""),
        "",
        f"A Vision Transformer encoder pretrained self-supervised with "
        f"scott ({block.get('objective') or 'objective not recorded'}; the {which}). "
        f"It has no classifier (`num_classes` 0): the model returns pooled features of width "
        f"{config['num_features']} ({config.get('global_pool', 'avg')} pooling of the "
        f"{model.get('tokenizer', '?')} tokenizer's tokens, then LayerNorm). Input: "
        f"{'x'.join(str(s) for s in size) if size else 'see config.json'}, normalised as in config.json.",
        "",
        "## Use",
        "",
        "```python",
        "import scott  # registers the scott_vit_* architectures with timm",
        "",
        'model = scott.from_pretrained("PATH/TO/THIS/FOLDER", num_classes=0).eval()',
        "# or with timm (offline):",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True, num_classes=0)',
        "# after uploading (huggingface_hub.upload_folder), from the Hub:",
        'model = timm.create_model("hf-hub:USER/REPO", pretrained=True, num_classes=10)',
        "data_cfg = timm.data.resolve_data_config({}, model=model)  # the evaluation transform",
        "```",
        "",
        "Both loaders check the sha256 recorded in `model.safetensors` and refuse a damaged file.",
        "",
        "## Training",
        "",
        f"- recipe: `{name}`" + (f", objective `{block['objective']}`" if block.get("objective") else ""),
        f"- data: {_data_line(recipe_text, rows)}",
        f"- steps: {block['step'] if block.get('step') is not None else 'not recorded'}",
        f"- weights: the {which} (`{block.get('which')}`), exported with scott {block.get('version')}; "
        f"sha256 of the source export `{block.get('encoder_sha256') or 'not recorded'}`",
        f"- architecture: `{arch}`" + (f" with `model_args` {json.dumps(args)}" if args else "")
        + f"; model section: `{json.dumps(model, sort_keys=True)}`",
        "",
        "## Evaluation",
        "",
        "Top-1 accuracy of frozen features, measured at the end of pretraining on the recipe's data.",
        "",
        "| protocol | split | top-1 | details |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row.get("top1") is None:
            flag = _STANDARD.get(row["name"], (None, None))[1]
            how = f"`python tools/export_model.py RUN --out DIR {flag}` measures it" if flag else ""
            lines.append(f"| {row['label']} | - | not measured | {how} |")
        else:
            lines.append(f"| {row['label']} | {row.get('split') or 'not recorded'} | {_pct(row['top1'])} | "
                         f"{_details(row)} |")
    lines += ["", "## Recipe", ""]
    if recipe_text:
        lines += ["```yaml", recipe_text.rstrip("\n"), "```"]
    else:
        lines.append("Not recorded (the encoder was exported without its run folder's recipe.yaml).")
    return "\n".join(lines) + "\n"


def _data_line(recipe_text: str | None, rows: list[dict]) -> str:
    import yaml

    data = {}
    if recipe_text:
        try:
            data = (yaml.safe_load(recipe_text) or {}).get("data") or {}
        except (yaml.YAMLError, AttributeError):
            data = {}
    name = data.get("name", "not recorded")
    text = f"`{name}`"
    limits = [f"classes {data['classes']}" if data.get("classes") else "",
              f"train_subset {data['train_subset']}" if data.get("train_subset") else ""]
    limits = [x for x in limits if x]
    if limits:
        text += f" ({', '.join(limits)})"
    counts = [_details({k: r.get(k) for k in ("n_bank", "n_query", "n_train", "n_test")}) + f" for {r['label']}"
              for r in rows if r.get("top1") is not None
              and any(r.get(k) is not None for k in ("n_bank", "n_query", "n_train", "n_test"))]
    text += "; " + ("; ".join(counts) if counts else "image counts not recorded")
    return text


# ----------------------------------------------------------------------------- loading
def _folder(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE):
        path = path.parent
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not an exported model folder; write one with "
                                "python tools/export_model.py RUN --out DIR)")
    return path


def from_pretrained(path: str | Path, num_classes: int = 0, **kwargs) -> "torch.nn.Module":
    """:class:`~scott.models.timm_family.ScottViT` of an exported folder, offline, in eval mode.

    ``path`` is the folder (or a file in it). ``num_classes`` > 0 adds a freshly initialised
    head; ``kwargs`` may set ``global_pool``, ``drop_rate``, ``drop_path_rate``, ``fc_norm``,
    ``dynamic_img_size``, ``backend`` (the architecture is the export's). The encoder carries the
    export's ``eval_transform_spec`` and ``model.pretrained_cfg`` its timm data config.

    Raises FileNotFoundError (no folder / file), :class:`scott.checkpoint.DamagedFileError`
    (``model.safetensors`` damaged, or not the file ``config.json`` was written with), ValueError
    (not a scott folder).
    """
    from scott.checkpoint import DamagedFileError

    folder = _folder(path)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / CONFIG_FILE}: unreadable ({exc})") from None
    block = config.get("scott") if isinstance(config, dict) else None
    if not isinstance(block, dict) or block.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE}: not a scott model folder (no 'scott' block of format "
                         f"{WEIGHTS_FORMAT!r}); for other timm models use timm.create_model('local-dir:...')")
    tensors, metadata = _read_weights(folder / WEIGHTS_FILE)
    if block.get("sha256") != metadata.get("sha256"):
        raise DamagedFileError(f"{folder}: {WEIGHTS_FILE} is not the file {CONFIG_FILE} was written with "
                               "(their sha256 differ); copy the whole folder again or export it again")
    model_cfg = json.loads(metadata["model"])
    spec = json.loads(metadata.get("eval_transform", "null"))
    model = _build(model_cfg, spec, int(num_classes), source_path=str(folder / WEIGHTS_FILE), **kwargs)
    encoder_state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    try:
        model.encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{folder / WEIGHTS_FILE}: weights do not match the architecture in its metadata: "
                         f"{exc}") from None
    own = model.state_dict()
    rest = {k: v for k, v in tensors.items() if not k.startswith("encoder.") and k in own
            and own[k].shape == v.shape}
    model.load_state_dict({**own, **rest}, strict=True)
    cfg = dict(config.get("pretrained_cfg") or {})
    for key in ("input_size", "mean", "std", "test_input_size", "min_input_size"):
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    cfg.update(architecture=config.get("architecture"), file=str(folder), source="local-dir", num_classes=0)
    model.pretrained_cfg = model.default_cfg = cfg
    return model.eval()

