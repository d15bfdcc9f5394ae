"""A model folder to share (scott.hub, tools/export_model.py): config.json + model.safetensors +
README.md, loaded offline by scott.from_pretrained and by timm's "local-dir:" route."""

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.data import resolve_data_config

import scott
from scott.checkpoint import DamagedFileError, export_encoder
from scott.config import format_recipe, load_recipe
from scott.data.transforms import eval_transform_spec
from scott.eval.features import load_encoder
from scott.hub import closest_architecture, export_pretrained, from_pretrained
from scott.models import build_encoder
from scott.models.timm_family import FAMILY
from cli_helpers import exit_code, load_tool
from train_helpers import one_torch_thread  # noqa: F401 (autouse: 1 thread)

ROOT = Path(__file__).resolve().parents[1]
# demo recipe, tiny encoder; two classes and 100 train images keep the measurements fast
SMALL = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.hidden_dim=8",
         "data.classes=[0,1]", "data.train_subset=100"]
FILES = {"config.json", "model.safetensors", "README.md"}
KNN = {"pretrained": 0.8125, "pretrained_context": 0.79, "random_init": 0.705, "pixels": 0.7425, "pool": "flat",
       "k": 20, "split": "test", "n_bank": 100, "n_query": 200}
LINEAR = {"top1": 0.8675, "top5": 1.0, "split": "test", "n_train": 100, "n_test": 200,
          "selected": {"lr": 0.1, "epochs": 2}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", SMALL)
    (path / "recipe.yaml").write_text(format_recipe(recipe), encoding="utf-8")
    torch.manual_seed(0)
    for which, name in (("target", "encoder"), ("context", "context_encoder")):
        enc = build_encoder(recipe["model"])
        with torch.no_grad():  # a non-trivial final norm, so a skipped or re-initialised norm shows
            enc.norm.weight.uniform_(0.5, 1.5)
            enc.norm.bias.normal_(0, 0.1)
        export_encoder(path / f"{name}.safetensors", enc.state_dict(), recipe["model"],
                       eval_transform_spec(recipe["model"]),
                       extra={"which": which, "step": 936, "recipe": "demo", "objective": "mimjepa"})
    return path


@pytest.fixture(scope="module")
def folder(run_dir, tmp_path_factory):
    return export_pretrained(run_dir, tmp_path_factory.mktemp("hub") / "export", metrics={"knn": KNN, "linear": LINEAR},
                             which="target")


def test_default_is_the_encoder_the_run_exports(run_dir, tmp_path):
    """No ``which``: the run's train.export_encoder (the demo recipe's context), weights and card."""
    out = export_pretrained(run_dir, tmp_path / "default")
    config = json.loads((out / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(run_dir / "context_encoder.safetensors"), "pt") as fh:
        assert config["scott"]["encoder_sha256"] == fh.metadata()["sha256"]
    assert config["scott"]["which"] == "context"


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's bytes
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------ layout
def test_folder_is_timms_layout(folder, run_dir):
    assert {p.name for p in folder.iterdir()} == FILES
    config = json.loads((folder / "config.json").read_text())
    # the closest registered model (scott_vit_cpu: small stack, 28 px grey, patch 4) + the differences
    assert config["architecture"] == "scott_vit_cpu" and config["num_classes"] == 0
    assert config["model_args"] == {"embed_dim": 32, "depth": 1, "num_heads": 2, "hidden_dim": 8,
                                    "global_pool": "flat"}
    assert config["num_features"] == 49 * 32 and config["global_pool"] == "flat"
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 28, 28] and cfg["mean"] == [0.5] and cfg["std"] == [0.5]
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 0
    block = config["scott"]
    assert block["recipe"] == "demo" and block["step"] == 936 and block["objective"] == "mimjepa"
    from safetensors import safe_open

    with safe_open(str(run_dir / "encoder.safetensors"), "pt") as fh:
        source = fh.metadata()
    assert block["encoder_sha256"] == source["sha256"]
    assert block["model"] == json.loads(source["model"]) and block["model"]["embed_dim"] == 32  # the full section
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["format"] == "scott.vit/1" and meta["sha256"] == block["sha256"]
    assert {k.split(".")[0] for k in keys} == {"encoder", "fc_norm"}  # ScottViT(num_classes=0) state dict
    assert block["metrics"]["knn"]["top1"] == KNN["pretrained"] and block["metrics"]["linear"]["top1"] == 0.8675
    # timm's own reader of a local folder sees the same architecture and arguments
    from timm.models._hub import load_model_config_from_path

    pretrained_cfg, name, model_args = load_model_config_from_path(folder)
    assert name == "scott_vit_cpu" and model_args == config["model_args"]


def test_closest_architecture_is_exact_for_a_registered_size():
    for name in ("scott_vit_tiny", "scott_vit_cpu_patchify"):
        assert closest_architecture(FAMILY[name]) == (name, {})
    name, args = closest_architecture({**FAMILY["scott_vit_small"], "depth": 6, "global_pool": "grid2"})
    assert name == "scott_vit_small" and args == {"depth": 6, "global_pool": "grid2"}


# ------------------------------------------------------------------------------------ loading
def test_from_pretrained_and_timm_equal_the_scott_encoder(folder, run_dir):
    enc = load_encoder(run_dir, which="target")  # the encoder `folder` exports
    ours = scott.from_pretrained(folder, num_classes=3)
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3).eval()
    assert type(theirs) is type(ours) and theirs.num_features == ours.num_features == 49 * 32
    theirs.head.load_state_dict(ours.head.state_dict())  # the same (fresh) head on both
    state = theirs.state_dict()
    for k, v in enc.state_dict().items():
        assert torch.equal(state[f"encoder.{k}"], v) and torch.equal(ours.state_dict()[f"encoder.{k}"], v)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        pooled = enc.forward_features_pooled(x)  # the export's own (flat) pooling
        expected = ours.head(ours.fc_norm(pooled))
        assert torch.equal(ours(x), expected) and torch.equal(theirs(x), expected)
        # num_classes 0 (the export): the pooled features through the LayerNorm, on both routes
        feats = from_pretrained(folder)
        timm_feats = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert torch.equal(feats(x), timm_feats(x))
        assert torch.equal(feats(x), torch.nn.functional.layer_norm(pooled, (49 * 32,)))
    # the evaluation transform travels with both
    for model in (ours, theirs):
        data_cfg = resolve_data_config({}, model=model)
        assert data_cfg["input_size"] == (1, 28, 28) and data_cfg["mean"] == (0.5,) and data_cfg["crop_pct"] == 1.0
    assert ours.encoder.eval_transform_spec == enc.eval_transform_spec
    with pytest.raises(TypeError, match="embed_dim"):
        from_pretrained(folder, embed_dim=64)  # the architecture is the export's


def test_context_encoder_export(run_dir, tmp_path):
    out = export_pretrained(run_dir / "context_encoder.safetensors", tmp_path / "ctx", which="context")
    model = from_pretrained(out / "model.safetensors")  # a file inside the folder works too
    enc = load_encoder(run_dir, which="context")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True),
                           model.fc_norm(enc.forward_features_pooled(x)))
    assert json.loads((out / "config.json").read_text())["scott"]["which"] == "context"


def test_damaged_folder_is_refused_in_one_line(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    _damage(bad / "model.safetensors")
    with pytest.raises(DamagedFileError, match="damaged file") as info:
        from_pretrained(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="damaged file"):
        timm.create_model(f"local-dir:{bad}", pretrained=True)
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(DamagedFileError, match="damaged or not a safetensors file"):
        from_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")


def test_config_and_weights_must_belong_together(run_dir, folder, tmp_path):
    ctx = export_pretrained(run_dir, tmp_path / "ctx", which="context")
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copy(ctx / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(DamagedFileError, match="not the file config.json was written with"):
        from_pretrained(mixed)


# ------------------------------------------------------------------------------------ card
def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_has_recipe_data_steps_and_the_numbers(folder, run_dir, tmp_path):
    text = (folder / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "timm" and meta["license"] == "other" and "scott" in meta["tags"]
    assert "placeholder" in text.split("---\n")[1]
    assert "| kNN | test | 81.25 % | k = 20; flat pooling; 100 / 200 images (bank / queries); random init " \
           "70.50 %; raw pixels 74.25 % |" in text
    assert "| linear probe | test | 86.75 % |" in text and "chosen on val: lr 0.1, epochs 2" in text
    assert "- steps: 936" in text and "classes [0, 1], train_subset 100" in text
    recipe_block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe_block) == yaml.safe_load((run_dir / "recipe.yaml").read_text())
    # nothing measured: said plainly, with the command that measures it
    bare = (export_pretrained(run_dir, tmp_path / "bare") / "README.md").read_text()
    assert "| kNN | - | not measured | `python tools/export_model.py RUN --out DIR --knn` measures it |" in bare
    assert "| linear probe | - | not measured |" in bare and "image counts not recorded" in bare
    # the context export's card reports the context encoder's kNN number
    ctx = (export_pretrained(run_dir, tmp_path / "c", metrics={"knn": KNN}, which="context") / "README.md")
    assert "| kNN | test | 79.00 % |" in ctx.read_text()


def test_huggingface_hub_sees_a_model_repo(folder, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = hub.ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-feature-extraction"
    # upload_folder uploads every file its default ignore patterns keep: all three, unchanged
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    names = sorted(p.name for p in folder.iterdir())
    assert sorted(filter_repo_objects(names, ignore_patterns=DEFAULT_IGNORE_PATTERNS)) == sorted(FILES)


# ------------------------------------------------------------------------------------ CLI
def test_cli_measures_and_writes_the_folder(run_dir, tmp_path, capsys):
    tool = load_tool("export_model")
    out = tmp_path / "export"
    assert exit_code(tool, [str(run_dir), "--out", str(out), "--knn", "--linear", "--lrs", "0.1",
                            "--epochs", "2", "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} == FILES
    metrics = json.loads((out / "config.json").read_text())["scott"]["metrics"]
    knn, linear = metrics["knn"], metrics["linear"]
    assert knn["split"] == "test" and knn["n_bank"] == 100 and knn["n_query"] == 200 and 0 <= knn["top1"] <= 1
    assert knn["k"] == 20 and knn["pool"] == "flat" and "random_init" in knn and "pixels" in knn
    assert linear["split"] == "test" and linear["n_train"] == 100 and linear["n_test"] == 200
    assert linear["selected"] == {"lr": 0.1, "epochs": 2}
    card = (out / "README.md").read_text()
    assert f"| kNN | test | {100 * knn['top1']:.2f} % |" in card
    assert f"| linear probe | test | {100 * linear['top1']:.2f} % |" in card
    assert f"model folder -> {out}" in capsys.readouterr().out
    # the folder loads like any other export
    assert from_pretrained(out).num_features == 49 * 32


def test_cli_errors_exit_2_in_one_line(run_dir, tmp_path, capsys):
    tool = load_tool("export_model")
    assert exit_code(tool, [str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such run folder" in err and err.count("\n") == 1
    bad = tmp_path / "badrun"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("cache", "eval"))
    _damage(bad / "context_encoder.safetensors")  # the encoder the demo recipe exports
    assert exit_code(tool, [str(bad), "--out", str(tmp_path / "o"), "--knn"]) == 2
    err = capsys.readouterr().err
    assert "damaged file" in err and err.count("\n") == 1
    (bad / "encoder.safetensors").write_bytes(b"garbage" * 10)
    assert exit_code(tool, [str(bad), "--out", str(tmp_path / "o"), "--which", "target"]) == 2
    assert "damaged or not a safetensors file" in capsys.readouterr().err
    (bad / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text().replace("train:\n", "train:\n  export_enc: x\n"))
    assert exit_code(tool, [str(bad), "--out", str(tmp_path / "o")]) == 2  # the run's recipe names the encoder
    err = capsys.readouterr().err
    assert "export_enc" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing written for a refused export
    empty = tmp_path / "empty"
    empty.mkdir()
    assert exit_code(tool, [str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "encoder file not found" in capsys.readouterr().err
