"""Write the embedded demo data set (a small real Fashion-MNIST subset) into scott/data/demo/.

Example:
    python tools/make_demo_data.py --src /usr/share/datasets/fashion-mnist
"""

import argparse

from scott.data.demo_maker import make_demo_subset
from scott.data.roots import DEMO_DIR, default_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(default_root("fashion_mnist")), help="folder with Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(DEMO_DIR), help="output folder")
    parser.add_argument("--train", type=int, default=5000, help="training images (class-balanced)")
    parser.add_argument("--test", type=int, default=1000, help="test images (class-balanced)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = make_demo_subset(args.src, args.out, args.train, args.test, args.seed)
    print(f"wrote {counts['train']} train + {counts['test']} test images to {args.out}")


if __name__ == "__main__":
    main()
