"""Write the embedded demo images as PNG files, as your own images would be.

    python tools/demo_to_folder.py OUT [--split train|test] [--layout nested|classes] [--limit N]

``nested`` (default): no labels, images two folders deep (``OUT/part_00/group_3/00342.png``),
for trying ``data.name: folder`` on an unlabelled collection. ``classes``: ``OUT/<class>/...``
(labels for evaluation only). Prints how many files it wrote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scott.cli import run_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (created)")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--layout", default="nested", choices=("nested", "classes"))
    parser.add_argument("--limit", type=int, default=None, help="write only the first N images")
    args = parser.parse_args(argv)
    from scott.data.datasets import build_dataset
    from scott.data.folder import write_images

    paths = write_images(build_dataset({"name": "demo"}, args.split), args.out, args.layout, args.limit)
    print(f"wrote {len(paths)} demo {args.split} images to {args.out} ({args.layout})")
    return 0


if __name__ == "__main__":
    run_cli(main)
