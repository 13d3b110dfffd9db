"""Writers of the reference-LLaVA sweep and of the which-came-first video sweep (tables, README sections)."""
import json

from benchmarks import readme, results
from benchmarks import llava_quality as lq

LLAVA_ROWS = [
    {"method": "none", "keep": 144, "keep_share": 1.0, "accuracy": 0.9, "agreement": 1.0, "acc_colour": 0.95,
     "acc_count": 0.85, "acc_left": 0.9, "ms": 40.0, "speedup": 1.0, "acc_drop": 0.0},
    {"method": "tome", "keep": 16, "keep_share": 16 / 144, "accuracy": 0.5, "agreement": 0.52, "acc_colour": 0.3,
     "acc_count": 0.6, "acc_left": 0.6, "ms": 20.0, "speedup": 2.0, "acc_drop": 40.0},
    {"method": "divprune", "keep": 16, "keep_share": 16 / 144, "accuracy": 0.7, "agreement": 0.72, "acc_colour": 0.6,
     "acc_count": 0.7, "acc_left": 0.8, "ms": 21.0, "speedup": 1.9, "acc_drop": 20.0},
    {"method": "tome", "keep": 48, "keep_share": 48 / 144, "accuracy": 0.8, "agreement": 0.85, "acc_colour": 0.8,
     "acc_count": 0.8, "acc_left": 0.8, "ms": 25.0, "speedup": 1.6, "acc_drop": 10.0},
]


def test_llava_summary_table_and_ranking():
    text = lq.summary(LLAVA_ROWS)
    assert "Keep-all: 90.0% on 144 visual tokens" in text
    assert "| tome | 50.0 (+40.0), 52.0, 2.00x | 80.0 (+10.0), 85.0, 1.60x |" in text
    assert "| divprune | 70.0 (+20.0), 72.0, 1.90x |  |" in text  # a missing cell stays empty
    assert "Ranking at keep 16: divprune 70.0 > tome 50.0" in text
    assert "| divprune | 60.0 | 70.0 | 80.0 |" in text  # per kind at the smallest keep


def test_llava_plot_and_report(tmp_path):
    (path,) = lq.plot(LLAVA_ROWS, tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## All rows" in lq.report(LLAVA_ROWS)


def test_readme_gets_the_new_sections_only_when_their_results_exist(tmp_path):
    ref = tmp_path / "ref"
    (ref / "llava").mkdir(parents=True)
    (ref / "llava" / "training.json").write_text(json.dumps(
        {"held_out_accuracy": 0.9, "chance": 0.29, "steps": 10, "train_seconds": 5.0,
         "held_out_factor_accuracy": {"colour": 0.95}, "command": "python -m benchmarks.train_reference llava"}))
    assert readme.llava_section(tmp_path, ref) == "" and readme.time_section(tmp_path, ref) == ""
    results.write_json(LLAVA_ROWS, tmp_path / "llava_quality.json",
                       meta={"command": "python -m benchmarks llava_quality"})
    section = readme.llava_section(tmp_path, ref)
    assert section.startswith("### Quality on the reference LLaVA")
    assert "`llava`: 90.0% held-out (chance 29.0%; colour 95.0%)" in section
    assert "Ranking at keep 16" in section
    time_rows = [{"model": "videomae_when", "method": "none", "time_mode": "-", "target": 1.0, "tokens": 256,
                  "gflops": 0.17, "accuracy": 0.95, "agreement": 1.0, "kl": 0.0, "speedup": 1.0, "acc_drop": 0.0},
                 {"model": "videomae_when", "method": "tome", "time_mode": "global", "target": 0.5, "tokens": 256,
                  "gflops": 0.09, "flops_ratio": 0.5, "accuracy": 0.6, "agreement": 0.62, "kl": 0.5, "speedup": 1.8,
                  "acc_drop": 35.0}]
    results.write_json(time_rows, tmp_path / "time_quality.json", meta={"command": "python -m benchmarks time_quality"})
    section = readme.time_section(tmp_path, ref)
    assert "which-came-first" in section and "60.0 (+35.0), 62.0, 1.80x" in section
