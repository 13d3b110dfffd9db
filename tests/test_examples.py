"""The examples' input errors (run as users run them: subprocesses) and the benchmarks' command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
VIDEO = ROOT / "examples" / "video_classification.py"
AUDIO = ROOT / "examples" / "audio_tagging.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every bad-input run, started together (each costs an interpreter with torch and transformers)."""
    av = pytest.importorskip("av", reason="the 5-frame clip is written with PyAV (the video extra)")
    tmp = tmp_path_factory.mktemp("examples")
    five = tmp / "five.mp4"
    with av.open(str(five), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (tmp / "text.mp4").write_text("this is not a video\n" * 50)
    (tmp / "text.wav").write_text("this is not audio\n" * 50)
    import soundfile as sf

    sf.write(str(tmp / "tiny.wav"), np.zeros(192, dtype=np.float32), 16000)  # 12 ms: not one 25 ms fbank frame
    (tmp / "not_a_model").mkdir()
    from transformers import ASTConfig, ASTForAudioClassification

    small = tmp / "small_ast"  # a 1.28 s window (max_length 128): the example must not assume AST-base's 10.24 s
    ASTForAudioClassification(ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_length=128, num_labels=3)).save_pretrained(small)
    cases = {
        "missing video": ([VIDEO, "--video", tmp / "missing.mp4"], "--video .*missing.mp4: no such file"),
        "text video": ([VIDEO, "--video", tmp / "text.mp4"], "could not decode .*text.mp4.* as a video"),
        "short video": ([VIDEO, "--video", five],
                        "the clip has 5 frames and the model takes 8 .*: pass --num-frames 5 \\(or fewer\\)"),
        "text audio": ([AUDIO, "--audio", tmp / "text.wav"], "could not read .*text.wav.* as audio"),
        "hop past the window": ([AUDIO, "--model", small, "--hop", "5.12", "--long-seconds", "3"],
                                r"--hop must be at most one window of this model \(1.28 s\), got 5.12"),
        "small model": ([AUDIO, "--model", small, "--long-seconds", "3", "--repeats", "1", "--flops", "0.75"], None),
        "12 ms audio": ([AUDIO, "--audio", tmp / "tiny.wav"],
                        r"--audio .*tiny.wav: 12 ms of audio; AST needs at least one 25 ms fbank frame"),
        "no video model folder": ([VIDEO, "--model", "/no/such/folder"], "--model /no/such/folder: no such model folder"),
        "no audio model folder": ([AUDIO, "--model", "/no/such/folder"], "--model /no/such/folder: no such model folder"),
        "not a model folder": ([VIDEO, "--model", tmp / "not_a_model"],
                               r"--model .*not_a_model: not a model folder \(no config.json in it\)"),
    }
    started = {name: (subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), expected)
               for name, (argv, expected) in cases.items()}
    results = {}
    for name, (process, expected) in started.items():
        out, err = process.communicate(timeout=300)
        results[name] = (process.returncode, out, err, expected)
    return results


def test_the_audio_example_runs_both_parts_on_a_model_with_a_short_window(runs):
    code, out, err, _ = runs["small model"]
    assert code == 0, err[-2000:]
    assert "long recording: a generated 3 s recording" in out and "speedup" in out


@pytest.mark.parametrize("case", ["missing video", "text video", "short video", "text audio", "hop past the window",
                                  "12 ms audio", "no video model folder", "no audio model folder",
                                  "not a model folder"])
def test_bad_input_exits_with_one_clear_line(runs, case):
    import re

    code, out, err, expected = runs[case]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert re.search(expected, lines[0]) and lines[0].startswith(("video_classification.py: error:",
                                                                  "audio_tagging.py: error:")), lines[0]
    assert "model:" not in out  # refused before any model loaded


def test_usage_examples_keep_their_line_continuations():
    """Each example's --help (its docstring) shows the usage lines as written: a backslash that ends a source line
    of the docstring must be escaped, or Python joins the wrapped command onto one line."""
    import ast

    for script in sorted((ROOT / "examples").glob("*.py")):
        source = script.read_text()
        node = ast.parse(source).body[0]
        evaluated = node.value.value  # the docstring as argparse prints it
        written = "\n".join(source.splitlines()[node.lineno - 1:node.end_lineno])
        assert evaluated.count("\n") == written.count("\n"), f"{script.name}: a line continuation was lost"


def test_model_folder_check_leaves_hub_names_to_transformers():
    import importlib.util

    for name in ("video_classification", "audio_tagging"):
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for hub in ("MCG-NJU/videomae-base", "bert-base-uncased"):
            module.check_model_folder(hub)  # not a path: no complaint here
        module.check_model_folder(str(ROOT / "benchmarks" / "reference" / "videomae"))
        for bad in ("/no/such/folder", "./nothing", "a/b/c"):
            with pytest.raises(module.InputError, match="no such model folder"):
                module.check_model_folder(bad)


def test_benchmark_cli_prints_the_table(tmp_path, monkeypatch, capsys):
    from benchmarks import __main__ as cli
    from benchmarks import engine

    rows = [{"N": 1568, "C": 768, "r": 156, "method": m, "layer_ms": 10.0, "merge_ms": 0.3, "fraction": 0.03}
            for m in ("tome", "pitome")]
    monkeypatch.setattr(engine, "run", lambda out_dir, quick=False: rows)
    cli.main(["engine", "--quick", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| N | C | r | method | layer_ms | merge_ms | fraction |" in out
    assert "| 1568 | 768 | 156 | pitome | 10 | 0.3 | 0.03 |" in out
    assert "goal tome <= 10% of a layer at N=1568, C=768: 3.0% (met)" in out
    assert f"wrote: {tmp_path / 'engine.json'}, {tmp_path / 'engine.md'}" in out


def test_benchmark_help_speaks_of_the_project_not_of_issues():
    from benchmarks import __main__ as cli
    from benchmarks import audio, engine, video

    for module in (cli, engine, video, audio):
        assert "issue" not in (module.__doc__ or "").lower(), module.__name__
