#!/usr/bin/env python
"""Figure for docs/tokenizer.md: a demo image, its visible patches and the token-norm map that the
`tiles` backend computes (masked tokens are exactly 0).

    python tools/tokenizer_figure.py docs/figures/tokenizer_mask.png [--visible 0.4] [--seed 0]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from scott import Tokenizer  # noqa: E402
from scott.data.datasets import build_dataset  # noqa: E402
from scott.masks import build_mask_generator, masks_for_step  # noqa: E402
from scott.viz import mask_figure, tile, upscale  # noqa: E402


def token_norm_panel(tokens: torch.Tensor, grid: tuple[int, int], size: int) -> Image.Image:
    """Norm of every token as a grey map (black = exactly zero)."""
    norms = tokens.norm(dim=-1).reshape(grid).numpy()
    scaled = norms / max(float(norms.max()), 1e-12)
    arr = (np.stack([scaled] * 3, -1) * 255).astype(np.uint8)
    return upscale(Image.fromarray(arr, mode="RGB"), size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--visible", type=float, default=0.4, help="visible fraction [0.4]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    data = build_dataset({"name": "demo", "root": None, "on_bad_image": "error"}, "test")
    images = [data[i][0] for i in range(args.num_images)]
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None] for im in images])
    grid = (7, 7)
    gen = build_mask_generator({"kind": "blockwise", "ratio": 1 - args.visible, "min_block": 4,
                                "aspect": [0.3, 3.3]}, grid)
    masks = masks_for_step(gen, len(images), args.seed, 0, 0)
    tok = Tokenizer(embed_dim=64, patch_size=4, in_chans=1, stack="small", hidden_dim=16, backend="tiles")
    with torch.no_grad():
        tokens = tok(x, masks.visible)
    base = mask_figure(images, masks.visible)
    panel = 160
    norms = [token_norm_panel(tokens[i], grid, panel) for i in range(len(images))]
    # mask_figure lays out [image | masked image | token map]; add the token-norm column.
    rows = []
    for i in range(len(images)):
        pad = 4
        y = pad + i * (panel + pad)
        cells = [base.crop((pad + j * (panel + pad), y, pad + j * (panel + pad) + panel, y + panel)) for j in range(3)]
        rows.append(cells + [norms[i]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tile(rows).save(args.out)
    print(f"wrote {args.out} (backend {tok.last_backend}, {int(masks.visible[0].sum())}/49 patches visible)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
