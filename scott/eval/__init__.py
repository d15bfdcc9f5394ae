"""Evaluation of frozen encoders: feature extraction, weighted kNN, linear and attentive probes,
fine-tuning. Submodules are imported on use so that `import scott.eval` stays light."""

__all__ = ["features", "knn", "linear", "attentive", "protocol", "finetune", "runs"]
