"""examples/qwen_vl_vqa.py run as users run it (subprocesses, offline tiny models)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qwen_vl_vqa.py"


@pytest.fixture(scope="module")
def runs():
    cases = {
        "qwen2.5": ["--tiny", "qwen2.5", "--repeats", "1", "--max-new-tokens", "2"],
        "qwen3 within_frame": ["--tiny", "qwen3", "--repeats", "1", "--max-new-tokens", "2", "--method", "dominant"],
        "bad keep": ["--keep", "0"],
        "bad time mode": ["--tiny", "qwen2", "--time-mode", "adjacnet"],
    }
    started = {name: subprocess.Popen([sys.executable, str(EXAMPLE), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name, argv in cases.items()}
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        results[name] = (process.returncode, out, err)
    return results


@pytest.mark.parametrize("case", ["qwen2.5", "qwen3 within_frame"])
def test_tiny_modes_print_full_and_reduced_counts(runs, case):
    code, out, err = runs[case]
    assert code == 0, err[-2000:]
    assert "[full] image tokens 54, video tokens 32" in out, out
    assert "keep=0.25] image tokens 14, video tokens 8" in out, out
    assert "prefill speedup" in out


@pytest.mark.parametrize("case, message", [("bad keep", "a token count must be >= 1"),
                                           ("bad time mode", "unknown time_mode 'adjacnet'")])
def test_bad_input_exits_with_one_clear_line(runs, case, message):
    code, out, err = runs[case]
    lines = [line for line in err.splitlines() if line.strip() and "config" not in line]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and message in lines[-1] and lines[-1].startswith("qwen_vl_vqa.py: error:"), err


def test_benchmark_quick_size_gives_both_tables():
    from benchmarks import qwen_vl as bench

    rows = bench.run("quick", repeats=1)
    prefill = [r for r in rows if r["table"] == "prefill"]
    assert [r["keep"] for r in prefill] == list(bench.KEEPS)
    assert [r["prefill_tokens"] for r in prefill] == [106, 74, 58, 50]  # 40 text + 2 markers + 64/32/16/8 visual
    reduction = [r for r in rows if r["table"] == "reduction"]
    assert len(reduction) == 3 and all(r["fraction_of_tower"] > 0 for r in reduction)
