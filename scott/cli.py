"""How every command-line tool ends: one line on stderr and exit status 2 for a bad recipe or
bad data (:class:`scott.config.RecipeError`, including ``scott.data.DatasetError``), no traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable

from scott.config import RecipeError

__all__ = ["add_malloc_flag", "apply_malloc_choice", "run_cli"]


def add_malloc_flag(parser) -> None:
    """``--malloc-defaults``: the training CLIs' switch back to glibc's malloc thresholds."""
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc's malloc thresholds (by default freed memory stays in the process, "
                             "so each step does not page-fault its activations afresh: scott.allocator, "
                             "docs/benchmarks.md)")


def apply_malloc_choice(args) -> bool:
    """Keep freed memory in the process unless ``args.malloc_defaults``; whether it was applied."""
    if getattr(args, "malloc_defaults", False):
        return False
    from scott import allocator

    return allocator.retain_freed_memory()


def run_cli(main: Callable[[], Any]) -> None:
    """Run a CLI ``main()``; on :class:`RecipeError` print ``error: ...`` to stderr and exit 2.

    Any other return value of ``main`` is used as the exit status (None -> 0).
    """
    try:
        status = main()
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
