"""Checkpoint folders: atomic publication, torn-checkpoint skipping, keep-K, no-pickle loading."""

import fractions
import json
import pickle
import random

import numpy as np
import pytest
import torch

from scott import checkpoint as ck


def _save(run_dir, step, value, keep=None, log=print):
    """A minimal checkpoint: one safetensors file and one torch state file."""
    tmp = ck.begin_checkpoint(run_dir, step)
    ck.save_tensors(tmp / "model.safetensors", {"w": torch.full((3,), float(value))})
    ck.save_torch_state(tmp / "optimizer.pt", {"step": step, "m": torch.arange(4.0) * value})
    return ck.finish_checkpoint(run_dir, step, {"epoch": 0}, keep=keep, log=log)


def test_complete_checkpoint_roundtrip(tmp_path):
    path = _save(tmp_path, 7, 2.5)
    assert path.name == "step_00000007"
    meta = ck.read_meta(path)
    assert meta["step"] == 7 and meta["epoch"] == 0
    assert set(meta["files"]) == {"model.safetensors", "optimizer.pt"}
    tensors, _ = ck.load_tensors(path / "model.safetensors")
    assert torch.equal(tensors["w"], torch.full((3,), 2.5))
    state = ck.load_torch_state(path / "optimizer.pt")
    assert state["step"] == 7 and torch.equal(state["m"], torch.tensor([0.0, 2.5, 5.0, 7.5]))
    assert ck.find_last_complete(tmp_path) == path
    # nothing temporary is left behind
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000007"]


def test_torn_checkpoint_without_meta_is_skipped_with_message(tmp_path):
    good = _save(tmp_path, 10, 1.0)
    torn = tmp_path / "checkpoints" / "step_00000020"
    torn.mkdir()
    ck.save_tensors(torn / "model.safetensors", {"w": torch.zeros(3)})  # no meta.json
    messages = []
    assert ck.find_last_complete(tmp_path, log=messages.append) == good
    assert len(messages) == 1
    assert "step_00000020" in messages[0] and "meta.json" in messages[0]


def test_checkpoint_with_truncated_file_is_skipped(tmp_path):
    good = _save(tmp_path, 1, 1.0)
    bad = _save(tmp_path, 2, 2.0)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    messages = []
    assert ck.find_last_complete(tmp_path, log=messages.append) == good
    assert "step_00000002" in messages[0] and "model.safetensors" in messages[0]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    good = _save(tmp_path, 3, 1.0)
    tmp = ck.begin_checkpoint(tmp_path, 6)  # crash before finish_checkpoint
    ck.save_tensors(tmp / "model.safetensors", {"w": torch.zeros(3)})
    assert ck.find_last_complete(tmp_path) == good
    # the next save clears the leftover temporary folder
    _save(tmp_path, 9, 3.0)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000009"]


def test_only_torn_checkpoints_raise_instead_of_restarting(tmp_path):
    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)
    with pytest.raises(ck.CheckpointError, match="none is complete"):
        ck.find_last_complete(tmp_path, log=lambda m: None)


def test_no_checkpoints_returns_none(tmp_path):
    assert ck.find_last_complete(tmp_path) is None


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step * 10, step, keep=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_00000040", "step_00000050"]


def test_keep_k_removes_stale_torn_but_not_newer_torn(tmp_path):
    _save(tmp_path, 1, 1.0)
    (tmp_path / "checkpoints" / "step_00000002").mkdir()   # torn, older than next save
    (tmp_path / "checkpoints" / "step_00000099").mkdir()   # torn, newer than every save
    _save(tmp_path, 3, 3.0, keep=1)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_00000003", "step_00000099"]


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 4, 1.0)
    path = _save(tmp_path, 4, 9.0)
    tensors, _ = ck.load_tensors(path / "model.safetensors")
    assert tensors["w"][0].item() == 9.0


def test_export_encoder_metadata_roundtrip(tmp_path):
    state = {"blocks.0.weight": torch.randn(4, 4), "pos": torch.randn(1, 16, 4)}
    model_cfg = {"embed_dim": 4, "depth": 1, "patch_size": 4, "img_size": 16}
    spec = {"size": 16, "mean": [0.5], "std": [0.25]}
    path = ck.export_encoder(tmp_path / "encoder.safetensors", state, model_cfg, spec,
                             extra={"step": 12, "which": "target"})
    loaded, cfg, spec2, extra = ck.load_encoder_file(path)
    assert cfg == model_cfg and spec2 == spec and extra == {"step": 12, "which": "target"}
    assert set(loaded) == set(state)
    for key in state:
        assert torch.equal(loaded[key], state[key])
    _, metadata = ck.load_tensors(path)
    assert json.loads(metadata["model"]) == model_cfg  # plain JSON strings in the header


def test_load_encoder_file_rejects_foreign_safetensors(tmp_path):
    ck.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(ck.CheckpointError, match="not a scott encoder"):
        ck.load_encoder_file(tmp_path / "x.safetensors")


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    ck.save_torch_state(tmp_path / "rng.pt", ck.capture_rng_state())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ck.restore_rng_state(ck.load_torch_state(tmp_path / "rng.pt"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_torch_state_loader_refuses_pickled_objects(tmp_path):
    # an arbitrary class instance needs real unpickling (import of code) to load
    torch.save({"obj": fractions.Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        ck.load_torch_state(tmp_path / "evil.pt")


def test_library_messages_go_to_logging_by_default(tmp_path, caplog, capsys):
    good = _save(tmp_path, 3, 1.0)
    torn = _save(tmp_path, 6, 2.0)  # a newer checkpoint, then damaged
    (torn / "model.safetensors").write_bytes(b"damaged")
    with caplog.at_level("WARNING", logger="scott.checkpoint"):
        assert ck.find_last_complete(tmp_path) == good
    assert any(str(torn) in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert capsys.readouterr().out == ""  # nothing printed
