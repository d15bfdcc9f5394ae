"""Data: datasets (``build_dataset``), IDX reader, transforms and the embedded demo subset."""

from scott.data.datasets import (
    BadImageError,
    DatasetError,
    build_dataset,
    build_pretrain_dataset,
    check_dataset_size,
    pretrain_split,
    split_train_val,
)
from scott.data.idx import read_idx
from scott.data.transforms import (
    PretrainDataset,
    TwoViewTransform,
    build_pretrain_transform,
    eval_transform,
    eval_transform_spec,
    transform_from_spec,
)

__all__ = [
    "BadImageError",
    "DatasetError",
    "PretrainDataset",
    "TwoViewTransform",
    "build_dataset",
    "build_pretrain_dataset",
    "build_pretrain_transform",
    "check_dataset_size",
    "eval_transform",
    "eval_transform_spec",
    "pretrain_split",
    "read_idx",
    "split_train_val",
    "transform_from_spec",
]
