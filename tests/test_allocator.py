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


@pytest.mark.parametrize("flags, calls", [([], 1), (["--malloc-defaults"], 0)])
def test_pretrain_cli_keeps_freed_memory_unless_asked_not_to(tmp_path, monkeypatch, flags, calls):
    """tools/pretrain.py applies the setting once, after the recipe loads and before training
    (here the run stops at once on an unusable --output, exit 2), and not with --malloc-defaults."""
    import scott.allocator
    from cli_helpers import exit_code, load_tool

    seen = []
    monkeypatch.setattr(scott.allocator, "retain_freed_memory", lambda: seen.append(1) or True)
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    argv = [str(demo), "--output", str(blocker), "--no-knn", *flags]
    assert exit_code(load_tool("pretrain"), argv) == 2
    assert len(seen) == calls
