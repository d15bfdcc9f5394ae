"""scott.allocator: which mallopt calls are made, what is refused, what is reported."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scott.allocator import MMAP_THRESHOLD_MAX, retain_freed_memory


class FakeLibc:
    """Records mallopt(param, value) calls; answers with the given return codes in turn."""

    def __init__(self, answers=(1, 1)):
        self.calls, self.answers = [], list(answers)

    def mallopt(self, param, value):
        self.calls.append((param.value, value.value))
        return self.answers.pop(0)


def test_sets_the_mmap_then_the_trim_threshold():
    libc = FakeLibc()
    assert retain_freed_memory(8 * 2 ** 20, 2 ** 30, libc=libc) is True
    # glibc's M_MMAP_THRESHOLD is -3, M_TRIM_THRESHOLD is -1
    assert libc.calls == [(-3, 8 * 2 ** 20), (-1, 2 ** 30)]


def test_defaults_are_glibcs_largest_mmap_threshold_and_a_2_gib_trim_threshold():
    libc = FakeLibc()
    retain_freed_memory(libc=libc)
    assert libc.calls == [(-3, 32 * 2 ** 20), (-1, 2 ** 31 - 1)]
    assert MMAP_THRESHOLD_MAX == 33554432


@pytest.mark.parametrize("answers", [(0, 1), (1, 0)])
def test_a_refused_setting_is_reported(answers):
    assert retain_freed_memory(libc=FakeLibc(answers)) is False


@pytest.mark.parametrize("kwargs, name", [
    ({"mmap_threshold": MMAP_THRESHOLD_MAX + 1}, "mmap_threshold"),
    ({"mmap_threshold": -1}, "mmap_threshold"),
    ({"trim_threshold": 2 ** 31}, "trim_threshold"),
])
def test_values_glibc_would_ignore_or_overflow_are_refused_before_any_call(kwargs, name):
    libc = FakeLibc()
    with pytest.raises(ValueError, match=name):
        retain_freed_memory(libc=libc, **kwargs)
    assert libc.calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_this_process_accepts_the_settings_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert retain_freed_memory() is True


DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def _stopping_argv(tool, tmp_path):
    """Arguments that make ``tool`` stop with exit 2 right after its start-up."""
    if tool == "pretrain":  # an --output that is a file
        blocker = tmp_path / "taken"
        blocker.write_text("x")
        return [str(DEMO), "--output", str(blocker), "--no-knn"]
    if tool == "finetune":  # raw pixels have nothing to fine-tune
        return ["--pixels", str(DEMO)]
    return [str(DEMO), "--steps", "1", "--seeds", "0"]  # benchmarks/quality.py: --seeds >= 1


@pytest.mark.parametrize("tool", ["pretrain", "finetune", "quality"])
@pytest.mark.parametrize("flags, calls", [([], 1), (["--malloc-defaults"], 0)])
def test_training_clis_keep_freed_memory_unless_asked_not_to(tmp_path, monkeypatch, tool, flags, calls):
    """The training CLIs apply the setting once at start-up, and not with --malloc-defaults."""
    import importlib.util

    import scott.allocator
    from cli_helpers import ROOT, exit_code, load_tool

    seen = []
    monkeypatch.setattr(scott.allocator, "retain_freed_memory", lambda: seen.append(1) or True)
    if tool == "quality":
        spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = load_tool(tool)
    assert exit_code(module, [*_stopping_argv(tool, tmp_path), *flags]) == 2
    assert len(seen) == calls
