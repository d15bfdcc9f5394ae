"""``train.deterministic``: the switches that make a GPU run repeat itself bit for bit.

On CPU every run of this project is already exact (resume included). On CUDA the defaults are
not: cuBLAS picks workspace-dependent reduction orders, cuDNN autotunes its algorithms, and two
tokenizer backends accumulate with atomics (spconv's implicit GEMM, ``index_add_`` in
``tiles``). :func:`enable_deterministic` turns on PyTorch's deterministic algorithms (an op
without a deterministic implementation then raises instead of silently varying), fixes the
cuBLAS workspace, disables cuDNN autotuning, and - through
``torch.are_deterministic_algorithms_enabled()`` - makes ``model.backend: auto`` use the dense
tokenizer backend on CUDA (see ``scott.tokenizer.module.choose_backend``).
"""
from __future__ import annotations

import os

import torch

__all__ = ["enable_deterministic", "CUBLAS_WORKSPACE"]

CUBLAS_WORKSPACE = ":4096:8"


def enable_deterministic() -> None:
    """Deterministic algorithms, fixed cuBLAS workspace, no cuDNN autotuning (process-wide)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
