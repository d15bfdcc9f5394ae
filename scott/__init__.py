"""scott: self-supervised Vision Transformers for small image datasets (SCOTT + MIM-JEPA)."""
from .tokenizer import Tokenizer, gather_visible
from .models import ScottViT  # also registers the scott_vit_* models with timm (timm.list_models("scott_*"))

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy access to the evaluation helpers (they import PIL and the data pipeline).
    if name == "build_encoder":
        from .models import build_encoder
        return build_encoder
    if name in ("load_encoder", "extract_features"):
        from .eval import features
        return getattr(features, name)
    if name == "from_pretrained":  # a model folder written by scott.hub.export_pretrained
        from .hub import from_pretrained
        return from_pretrained
    raise AttributeError(f"module 'scott' has no attribute {name!r}")


__all__ = ["Tokenizer", "gather_visible", "ScottViT", "build_encoder", "load_encoder", "extract_features",
           "from_pretrained", "__version__"]
