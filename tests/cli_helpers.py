"""Running the command-line tools in-process, as ``python tools/<name>.py`` would."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from scott.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """The module ``tools/<name>.py``, loaded fresh."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exit_code(tool, argv) -> int:
    """The exit status of ``tool.main(argv)`` run through ``run_cli`` (exit 2 on a RecipeError)."""
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: tool.main(argv))
    return info.value.code
