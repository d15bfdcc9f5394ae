"""Crash-safe checkpoints and safetensors encoder export.

Layout of a run folder::

    checkpoints/
      step_00000500/         a complete checkpoint (has meta.json)
        model.safetensors    weights (never pickled)
        optimizer.pt         optimiser state: tensors / numbers only, loaded with weights_only=True
        rng_rank0.pt ...     RNG states per process (weights_only=True)
        meta.json            written LAST; lists every file with its size and sha256 = "complete" marker
      .tmp_step_00001000/    a checkpoint being written (ignored, removed by the next save)

Atomicity: every file is written under a temporary name in its final folder, flushed, fsync'd
and renamed with ``os.replace``; a checkpoint is assembled in ``.tmp_step_XXXXXXXX`` and the
folder is renamed to ``step_XXXXXXXX`` only after ``meta.json`` is in place. A crash at any
moment leaves either the previous set of complete checkpoints or a temporary folder.

Content hashes: every file's sha256 is computed from the bytes as they are written (the writer
serialises to memory, hashes and writes; nothing is read back) and recorded in ``meta.json``.
Files written by other processes leave a tiny ``<name>.sha256`` note that
``finish_checkpoint`` folds into ``meta.json``.

Resume policy (``find_last_complete``): checkpoints that lack ``meta.json``, whose meta.json is
unreadable, whose files are missing / of the wrong size, or (``verify=True``, the default) whose
bytes no longer match their recorded sha256 (bit rot, a bad copy, a partial rsync) are skipped
with a printed message naming the folder and the reason, and the newest intact one is used. When no checkpoint folder exists at all the function returns
``None`` (a fresh start: nothing would be lost). When checkpoint folders exist but none is
complete it raises :class:`CheckpointError` instead of silently restarting from step 0.

Exported encoders carry ``sha256`` in their safetensors metadata: a hash of the other metadata
and every tensor's name, dtype, shape and bytes, computed when writing; ``load_encoder_file``
recomputes it and refuses a damaged file with :class:`DamagedFileError`.

A failed write (e.g. disk full) removes its temporary file and raises ``OSError``; the folder of
the checkpoint being written stays temporary, so earlier complete checkpoints are untouched.

Nothing here unpickles arbitrary objects: weights use safetensors, other state uses
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

_LOG = logging.getLogger(__name__)  # where messages go when the caller passes no ``log``

CHECKPOINTS = "checkpoints"
META = "meta.json"
ENCODER_FORMAT = "scott.encoder/1"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp_"


class CheckpointError(RuntimeError):
    """A checkpoint folder is unusable (e.g. checkpoints exist but none is complete)."""


class DamagedFileError(CheckpointError, ValueError):
    """A file's bytes no longer match the sha256 recorded when it was written."""


DIGEST_SUFFIX = ".sha256"
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | memoryview) -> str:
    """Write ``data`` to ``path`` via a temporary file, fsync and os.replace (same folder).

    Returns the sha256 (hex) of the bytes, hashed chunk by chunk as they are written. On any
    error (disk full, ...) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    digest = hashlib.sha256()
    view = memoryview(data)
    try:
        with open(tmp, "wb") as fh:
            for start in range(0, len(view), _CHUNK):
                chunk = view[start:start + _CHUNK]
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_digest_note(path: str | Path, digest: str) -> None:
    """Leave ``<path>.sha256`` next to a file written into a pending checkpoint folder."""
    path = Path(path)
    _atomic_write(path.with_name(path.name + DIGEST_SUFFIX), digest.encode("ascii"))


def atomic_write_text(path: str | Path, text: str) -> str:
    """Atomically replace ``path`` with ``text`` (UTF-8); returns its sha256."""
    return _atomic_write(Path(path), text.encode("utf-8"))


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None, note_digest: bool = False) -> str:
    """Atomically save a flat name->tensor mapping as safetensors (tensors copied to CPU).

    Returns the file's sha256; ``note_digest`` also leaves it in ``<path>.sha256`` (files of a
    pending checkpoint).
    """
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    digest = _atomic_write(Path(path), save_bytes(flat, metadata=meta))
    if note_digest:
        write_digest_note(path, digest)
    return digest


def load_tensors(path: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file -> (tensors, metadata). Never unpickles."""
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as fh:
        metadata = dict(fh.metadata() or {})
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    return tensors, metadata


def save_torch_state(path: str | Path, obj, note_digest: bool = False) -> str:
    """Atomically ``torch.save`` an object made of tensors, numbers, strings, lists, dicts.

    Returns the file's sha256 (``note_digest``: also in ``<path>.sha256``).
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    digest = _atomic_write(Path(path), buf.getbuffer())
    if note_digest:
        write_digest_note(path, digest)
    return digest


def load_torch_state(path: str | Path, map_location="cpu"):
    """Load a file written by :func:`save_torch_state` with ``weights_only=True`` (no pickle)."""
    return torch.load(path, map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """This process's torch / CUDA / numpy / python RNG states as weights_only-safe values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoint folders
def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):08d}"


def checkpoint_step(path: str | Path) -> int:
    """The global step encoded in a ``step_XXXXXXXX`` folder name."""
    match = _STEP_RE.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path} is not a checkpoint folder (expected step_XXXXXXXX)")
    return int(match.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every ``step_XXXXXXXX`` folder (complete or not), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create (empty) the temporary folder a checkpoint for ``step`` is written into.

    Leftover temporary folders of interrupted saves are removed first. Call on one process,
    then let every process write its files into the returned folder.
    """
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f"{_TMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f"{_TMP_PREFIX}{checkpoint_name(step)}"
    tmp.mkdir()
    return tmp


def pending_checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The temporary folder of the checkpoint for ``step`` (as made by ``begin_checkpoint``)."""
    return checkpoints_root(run_dir) / f"{_TMP_PREFIX}{checkpoint_name(step)}"


def finish_checkpoint(run_dir: str | Path, step: int, meta: Mapping, keep: int | None = None,
                      log: Callable[[str], None] | None = None) -> Path:
    """Mark the pending checkpoint complete and publish it as ``checkpoints/step_XXXXXXXX``.

    Writes ``meta.json`` (the given ``meta`` plus ``step`` and the name, size and sha256 of every
    file) last, renames the folder into place, then keeps only the newest ``keep`` complete
    checkpoints (``None`` or ``<= 0`` keeps all). The sha256 comes from the ``<name>.sha256``
    note its writer left (see :func:`save_tensors`), else it is computed from the file.
    """
    tmp = pending_checkpoint_dir(run_dir, step)
    if not tmp.is_dir():
        raise CheckpointError(f"no pending checkpoint folder {tmp}; call begin_checkpoint first")
    items = [p for p in sorted(tmp.iterdir())
             if p.is_file() and p.name != META and not p.name.startswith(_TMP_PREFIX)]
    notes = {p.name[:-len(DIGEST_SUFFIX)]: p for p in items if p.name.endswith(DIGEST_SUFFIX)}
    items = [p for p in items if not p.name.endswith(DIGEST_SUFFIX)]
    files = {p.name: p.stat().st_size for p in items}
    digests = {p.name: (notes[p.name].read_text(encoding="ascii").strip() if p.name in notes else file_sha256(p))
               for p in items}
    for note in notes.values():
        note.unlink()
    full_meta = dict(meta)
    full_meta.update(step=int(step), files=files, sha256=digests)
    atomic_write_text(tmp / META, json.dumps(full_meta, indent=2, sort_keys=True))
    final = checkpoints_root(run_dir) / checkpoint_name(step)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep is not None and keep > 0:
        prune_checkpoints(run_dir, keep, log=log)
    return final


def check_complete(path: str | Path, verify: bool = False) -> str | None:
    """``None`` when the checkpoint folder is complete, otherwise the reason it is not.

    Sizes are always checked; ``verify`` also re-hashes every file against the sha256 recorded
    in ``meta.json`` (reads the whole checkpoint once). Checkpoints written before hashes were
    recorded pass on their sizes.
    """
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        return "no meta.json (the save was interrupted)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"unreadable meta.json ({err})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        return "meta.json lists no files"
    for name, size in files.items():
        item = path / name
        if not item.is_file():
            return f"missing file {name}"
        if item.stat().st_size != size:
            return f"file {name} has {item.stat().st_size} bytes, meta.json says {size}"
    digests = meta.get("sha256")
    if verify and isinstance(digests, dict):
        for name, expected in digests.items():
            try:
                actual = file_sha256(path / name)
            except OSError as err:
                return f"cannot read {name} ({err})"
            if actual != expected:
                return (f"file {name} is damaged: its sha256 {actual[:12]}... differs from the "
                        f"{str(expected)[:12]}... recorded when it was written")
    return None


def find_last_complete(run_dir: str | Path, log: Callable[[str], None] | None = None,
                       verify: bool = True) -> Path | None:
    """The newest complete (and, with ``verify``, intact: sha256 of every file) checkpoint of a run.

    Incomplete or damaged ones are skipped with a message for each (folder and reason), given to
    ``log`` (default: a warning on this module's ``logging`` logger).
    Returns ``None`` when the run has no checkpoint folder at all; raises
    :class:`CheckpointError` when checkpoint folders exist but none is usable.
    """
    candidates = list_checkpoints(run_dir)
    skipped = []
    for path in reversed(candidates):
        reason = check_complete(path, verify=verify)
        if reason is None:
            return path
        (log or _LOG.warning)(f"skipping checkpoint {path}: {reason}")
        skipped.append(f"{path.name} ({reason})")
    if skipped:
        raise CheckpointError(
            f"{checkpoints_root(run_dir)} holds checkpoints but none is complete and intact: "
            + "; ".join(skipped)
            + ". Refusing to restart from step 0 silently: remove the folder or use a new output.")
    return None


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of a checkpoint folder."""
    return json.loads((Path(path) / META).read_text(encoding="utf-8"))


def prune_checkpoints(run_dir: str | Path, keep: int, log: Callable[[str], None] | None = None) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and stale torn ones.

    Torn folders newer than the newest complete checkpoint are left alone (they are reported by
    :func:`find_last_complete`). Returns the removed folders.
    """
    if keep <= 0:
        return []
    folders = list_checkpoints(run_dir)
    complete = [p for p in folders if check_complete(p) is None]
    kept = set(complete[-keep:])
    newest_complete = checkpoint_step(complete[-1]) if complete else -1
    removed = []
    for path in folders:
        if path in kept or checkpoint_step(path) > newest_complete:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        _fsync_dir(checkpoints_root(run_dir))
    return removed


# ----------------------------------------------------------------------------- encoder export
def export_encoder(path: str | Path, encoder_state_dict: Mapping[str, torch.Tensor],
                   model_cfg: Mapping, eval_transform_spec: Mapping | None,
                   extra: Mapping | None = None) -> Path:
    """Write encoder weights as safetensors with JSON metadata.

    Metadata keys (all JSON strings): ``format`` = ``scott.encoder/1``, ``model`` (the recipe's
    model section, enough for ``build_encoder``), ``eval_transform`` (the evaluation transform
    spec), ``extra`` (free-form, e.g. step, which encoder, recipe name) and ``sha256``
    (:func:`encoder_digest` of the other metadata and the tensors, checked on load).
    """
    metadata = {
        "format": ENCODER_FORMAT,
        "model": json.dumps(dict(model_cfg), sort_keys=True),
        "eval_transform": json.dumps(dict(eval_transform_spec) if eval_transform_spec else None,
                                     sort_keys=True),
        "extra": json.dumps(dict(extra or {}), sort_keys=True, default=str),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder_state_dict.items()}
    metadata["sha256"] = encoder_digest(tensors, metadata)
    save_tensors(path, tensors, metadata)
    return Path(path)


def encoder_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 of the metadata (but ``sha256``) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_encoder_file(path: str | Path, device: str | torch.device = "cpu"
                      ) -> tuple[dict[str, torch.Tensor], dict, dict | None, dict]:
    """Read a file written by :func:`export_encoder`, checking its ``sha256``.

    Returns ``(state_dict, model_cfg, eval_transform_spec, extra)``; never unpickles. Raises
    :class:`DamagedFileError` when the content no longer matches the recorded hash (files
    exported before hashes were recorded load unchecked).
    """
    from safetensors import SafetensorError

    try:
        tensors, metadata = load_tensors(path, "cpu")
    except SafetensorError as exc:
        raise DamagedFileError(f"{path}: damaged or not a safetensors file ({exc}); export it again or copy "
                               "it again from its source") from None
    if metadata.get("format") != ENCODER_FORMAT:
        raise CheckpointError(f"{path} is not a scott encoder file "
                              f"(format {metadata.get('format')!r}, expected {ENCODER_FORMAT!r})")
    expected = metadata.get("sha256")
    if expected is not None and encoder_digest(tensors, metadata) != expected:
        raise DamagedFileError(f"{path}: damaged file: its content no longer matches the sha256 recorded when "
                               "it was exported; copy it again from its source or re-export it from the run's "
                               "last checkpoint")
    model_cfg = json.loads(metadata["model"])
    spec = json.loads(metadata.get("eval_transform", "null"))
    extra = json.loads(metadata.get("extra", "{}"))
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, model_cfg, spec, extra
