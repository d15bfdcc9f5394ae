"""Damaged files are detected, never trusted: checkpoint hashes, encoder hashes, disk full."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from scott import checkpoint as ck
from scott.cli import run_cli
from scott.train import CheckpointWriteError, pretrain
from train_helpers import tiny_components, tiny_recipe, one_torch_thread  # noqa: F401 (autouse: 1 thread)

ROOT = Path(__file__).resolve().parents[1]




def _run(recipe, out, resume=False):
    torch.manual_seed(0)  # tiny_components draws the initial weights from the global RNG
    return pretrain(recipe, out, resume=resume, components=tiny_components(recipe))


def flip_byte(path: Path, offset_from_end: int = 7) -> None:
    """Bit rot: one byte changes, the size does not."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


def assert_same_tensors(a_path: Path, b_path: Path) -> None:
    a, _ = ck.load_tensors(a_path)
    b, _ = ck.load_tensors(b_path)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


RECIPE = dict(train={"max_steps": 6, "checkpoint_every": 3, "keep_checkpoints": 5})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("full")
    torch.set_num_threads(1)
    _run(tiny_recipe(**RECIPE), out)
    return out


# ----------------------------------------------------------------------------- checkpoint hashes
def test_meta_records_the_sha256_of_every_file(full_run):
    for step in (3, 6):
        folder = full_run / "checkpoints" / f"step_{step:08d}"
        meta = ck.read_meta(folder)
        assert set(meta["sha256"]) == set(meta["files"]) == {"model.safetensors", "optimizer.pt", "rng_rank0.pt"}
        for name, digest in meta["sha256"].items():
            assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert not list(folder.glob("*.sha256"))  # the writers' notes are folded into meta.json


def test_writer_hashes_what_it_writes(tmp_path):
    digest = ck.save_tensors(tmp_path / "w.safetensors", {"w": torch.arange(5.0)}, note_digest=True)
    assert digest == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert (tmp_path / "w.safetensors.sha256").read_text() == digest
    digest = ck.save_torch_state(tmp_path / "s.pt", {"m": torch.ones(3)})
    assert digest == hashlib.sha256((tmp_path / "s.pt").read_bytes()).hexdigest()


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "rng_rank0.pt"])
def test_damaged_newest_checkpoint_is_skipped_and_resume_is_bit_identical(full_run, tmp_path, victim):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    newest = run / "checkpoints" / "step_00000006"
    size = (newest / victim).stat().st_size
    flip_byte(newest / victim)
    assert (newest / victim).stat().st_size == size
    assert ck.check_complete(newest) is None  # sizes alone cannot see it

    messages = []
    assert ck.find_last_complete(run, log=messages.append) == run / "checkpoints" / "step_00000003"
    assert len(messages) == 1 and str(newest) in messages[0] and victim in messages[0] and "damaged" in messages[0]

    summary = _run(tiny_recipe(**RECIPE), run, resume=True)
    assert summary["start_step"] == 3  # not the damaged 6, not a silent restart at 0
    assert_same_tensors(full_run / "checkpoints" / "step_00000006" / "model.safetensors",
                        run / "checkpoints" / "step_00000006" / "model.safetensors")
    assert ck.check_complete(run / "checkpoints" / "step_00000006", verify=True) is None  # re-written intact


def test_every_checkpoint_damaged_is_an_error_not_a_restart(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    for folder in ck.list_checkpoints(run):
        flip_byte(folder / "model.safetensors")
    with pytest.raises(ck.CheckpointError, match="none is complete and intact") as info:
        _run(tiny_recipe(**RECIPE), run, resume=True)
    assert "step_00000003" in str(info.value) and "step_00000006" in str(info.value)


def test_checkpoint_without_hashes_still_resumes(full_run, tmp_path):
    """Checkpoints written before hashes were recorded are checked on their sizes."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    folder = run / "checkpoints" / "step_00000006"
    meta = ck.read_meta(folder)
    del meta["sha256"]
    (folder / "meta.json").write_text(json.dumps(meta))
    assert ck.find_last_complete(run) == folder


# ----------------------------------------------------------------------------- encoder exports
def test_exported_encoders_carry_their_hash(full_run):
    for name in ("encoder.safetensors", "context_encoder.safetensors"):
        tensors, metadata = ck.load_tensors(full_run / name)
        assert metadata["sha256"] == ck.encoder_digest(tensors, metadata)
        ck.load_encoder_file(full_run / name)  # intact: loads


@pytest.mark.parametrize("where", ["weights", "metadata"])
def test_damaged_encoder_is_refused(full_run, tmp_path, where):
    path = tmp_path / "encoder.safetensors"
    shutil.copy(full_run / "encoder.safetensors", path)
    if where == "weights":
        flip_byte(path)
    else:  # a digit of the recorded model section: still valid JSON, different architecture
        data = path.read_bytes()
        at = data.index(b'\\"depth\\": 1')
        path.write_bytes(data[:at] + b'\\"depth\\": 2' + data[at + len(b'\\"depth\\": 1'):])
    with pytest.raises(ck.DamagedFileError, match="damaged"):
        ck.load_encoder_file(path)


def test_eval_cli_refuses_a_damaged_encoder_in_one_line(full_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    flip_byte(run / "encoder.safetensors")
    spec = importlib.util.spec_from_file_location("tool_eval_knn", ROOT / "tools" / "eval_knn.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: tool.main([str(run), "--k", "3", "--limit-train", "20", "--limit-test", "10"]))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and "encoder.safetensors" in err and "damaged" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- disk full
def test_disk_full_while_checkpointing_keeps_the_previous_one_and_resumes_exactly(full_run, tmp_path,
                                                                                   monkeypatch):
    run = tmp_path / "run"
    real_write = ck._atomic_write

    def full_disk(path, data):
        if "step_00000006" in str(path) and Path(path).name == "optimizer.pt":
            Path(path).with_name("partial").write_bytes(bytes(data)[:100])  # half-written bytes
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(ck, "_atomic_write", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        _run(tiny_recipe(**RECIPE), run)
    msg = str(info.value)
    assert "step 6" in msg and "No space left on device" in msg and "step_00000003" in msg and "--resume" in msg
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003"]  # partial folder removed
    assert ck.check_complete(run / "checkpoints" / "step_00000003", verify=True) is None
    assert not (run / "encoder.safetensors").exists()

    monkeypatch.setattr(ck, "_atomic_write", real_write)  # space freed
    assert _run(tiny_recipe(**RECIPE), run, resume=True)["start_step"] == 3
    assert_same_tensors(full_run / "checkpoints" / "step_00000006" / "model.safetensors",
                        run / "checkpoints" / "step_00000006" / "model.safetensors")
    assert_same_tensors(full_run / "encoder.safetensors", run / "encoder.safetensors")
