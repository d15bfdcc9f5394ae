"""How every command-line tool ends: one line on stderr and exit status 2 for a bad recipe or
bad data (:class:`scott.config.RecipeError`, including ``scott.data.DatasetError``), no traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable

from scott.config import RecipeError

__all__ = ["run_cli"]


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
