"""The benchmark task generators and result writers, and a smoke run of the LLaVA benchmark (it drives the
adapter's internals); the benchmarks themselves are not tests."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from benchmarks import results, tasks


# --------------------------------------------------------------------------------------------- generators
def test_video_deterministic_given_seed():
    x1, y1 = tasks.video_batch(8, seed=3)
    x2, y2 = tasks.video_batch(8, seed=3)
    x3, y3 = tasks.video_batch(8, seed=4)
    assert x1.shape == (8, tasks.VIDEO_FRAMES, 3, tasks.VIDEO_SIZE, tasks.VIDEO_SIZE)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.min() >= -1 and x1.max() <= 1


def test_audio_deterministic_given_seed():
    x1, y1 = tasks.audio_batch(2, seed=3)
    x2, y2 = tasks.audio_batch(2, seed=3)
    x3, _ = tasks.audio_batch(2, seed=4)
    assert x1.shape == (2, tasks.AUDIO_FRAMES, tasks.MEL_BINS)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_labels_cover_every_class():
    assert set(tasks.video_labels(tasks.video_params(200, 0)).tolist()) == set(range(tasks.VIDEO_CLASSES))
    assert set(tasks.audio_labels(tasks.audio_params(200, 0)).tolist()) == set(range(tasks.AUDIO_CLASSES))


def test_reversed_video_is_the_flipped_clip_with_another_label():
    p = tasks.video_params(32, seed=5)
    q = tasks.reverse_video_params(p)
    assert torch.equal(tasks.render_video(q), tasks.render_video(p).flip(1))  # frames played backwards
    y, y_rev = tasks.video_labels(p), tasks.video_labels(q)
    assert (y != y_rev).all()
    # Both factors flip: direction right<->left, down<->up, and which flash comes first.
    assert torch.equal(y_rev // 2, (y // 2) ^ 1)
    assert torch.equal(y_rev % 2, 1 - y % 2)


def test_video_frame_order_alone_changes_the_label():
    # Same frames, same appearance, only the order differs: the labels must differ.
    p = tasks.video_params(8, seed=6)
    x = tasks.render_video(p)
    assert sorted(x.flip(1)[0].reshape(tasks.VIDEO_FRAMES, -1).sum(1).tolist()) == \
        sorted(x[0].reshape(tasks.VIDEO_FRAMES, -1).sum(1).tolist())
    assert (tasks.video_labels(tasks.reverse_video_params(p)) != tasks.video_labels(p)).all()


def test_video_flashes_fill_whole_tubelets_in_opposite_halves():
    # Each flash covers exactly one tubelet (2 frames from an even frame) and whole 4 x 4 patches, the first
    # in frames 0-3 and the other in frames 4-7, so every token sees all of a flash or none of it.
    p = tasks.video_params(256, seed=9)
    for name in ("red", "green"):
        assert (p[f"{name}_t"] % tasks.FLASH_FRAMES == 0).all()
        assert (p[f"{name}_x"] % 4 == 0).all() and (p[f"{name}_y"] % 4 == 0).all()
    first = torch.minimum(p["red_t"], p["green_t"])
    second = torch.maximum(p["red_t"], p["green_t"])
    assert (first + tasks.FLASH_FRAMES <= tasks.VIDEO_FRAMES // 2).all()
    assert (second >= tasks.VIDEO_FRAMES // 2).all()
    q = tasks.reverse_video_params(p)  # reversal keeps the alignment
    assert (q["red_t"] % tasks.FLASH_FRAMES == 0).all() and (q["green_t"] % tasks.FLASH_FRAMES == 0).all()


def test_reversed_audio_is_the_flipped_clip_with_another_label():
    p = tasks.audio_params(8, seed=5)
    q = tasks.reverse_audio_params(p)
    w, w_rev = tasks.render_audio(p), tasks.render_audio(q)
    assert w.shape == (8, tasks.AUDIO_SAMPLES)
    assert torch.allclose(w_rev, w.flip(-1), atol=5e-3)
    y, y_rev = tasks.audio_labels(p), tasks.audio_labels(q)
    assert (y != y_rev).all()
    assert torch.equal(y_rev // 4, 1 - y // 4)  # order of the low and high tones flips
    assert torch.equal((y_rev // 2) % 2, 1 - (y // 2) % 2)  # the chirp sweeps the other way
    assert torch.equal(y_rev % 2, y % 2)  # the gap is the same


def test_audio_events_land_where_the_label_says():
    # Relative to each frame's median over all bins (noise bursts are broadband), the loudest of the low
    # tone's mel bins (~250-500 Hz: bins 14-27) is louder inside the low tone than anywhere outside it, and
    # likewise for the high tone (~2.5-4.5 kHz: bins 79-105): the events sit where the label's order says.
    p = tasks.audio_params(8, seed=7)
    feats = tasks.fbank(tasks.render_audio(p))  # [B, 256 frames, 128 bins]
    rel = feats - feats.median(-1, keepdim=True).values
    seconds = torch.arange(tasks.AUDIO_FRAMES).float() * 0.01 + 0.0125  # centre of each 25 ms frame
    for band, name in ((slice(14, 28), "low"), (slice(79, 106), "high")):
        energy = rel[:, :, band].amax(-1)  # [B, frames]
        inside = (seconds - p[f"{name}_c"].unsqueeze(1)).abs() < p[f"{name}_d"].unsqueeze(1) / 2 - 0.03
        outside = (seconds - p[f"{name}_c"].unsqueeze(1)).abs() > p[f"{name}_d"].unsqueeze(1) / 2 + 0.03
        for i in range(len(energy)):
            assert energy[i][inside[i]].mean() > energy[i][outside[i]].max() + 0.2, (name, i)
    assert (tasks.audio_labels(p) // 4 == 1).tolist() == (p["high_c"] < p["low_c"]).tolist()


def test_fbank_matches_the_ast_feature_extractor():
    transformers = pytest.importorskip("transformers")
    w = tasks.render_audio(tasks.audio_params(2, seed=8))
    ours = tasks.fbank(w)
    fe = transformers.ASTFeatureExtractor(max_length=tasks.AUDIO_FRAMES, num_mel_bins=tasks.MEL_BINS)
    theirs = fe([c.numpy() for c in w], sampling_rate=tasks.SAMPLE_RATE, return_tensors="pt").input_values
    assert torch.allclose(ours, theirs, atol=1e-4)


# ------------------------------------------------------------------------------------------------ writers
ROWS = [{"method": "tome", "time_mode": "global", "speedup": 1.5, "accuracy": 0.9, "note": "a|b"},
        {"method": "tome", "time_mode": "global", "speedup": 2.0, "accuracy": 0.8},
        {"method": "prune", "time_mode": "global", "speedup": 1.9, "accuracy": float("nan")},
        {"method": "prune", "time_mode": "adjacent", "speedup": 1.8, "accuracy": 0.7}]


def test_write_json_is_strict_json(tmp_path):
    path = results.write_json(ROWS, tmp_path / "sub" / "x.json", meta={"threads": 2, "v": torch.tensor(1.5)})
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["meta"] == {"threads": 2, "v": 1.5}
    assert doc["rows"][0] == ROWS[0]
    assert doc["rows"][2]["accuracy"] is None  # NaN is not valid JSON
    assert results.read_json(path)[1] == ROWS[1]


def test_markdown_table_shape(tmp_path):
    path = results.write_markdown(ROWS, tmp_path / "x.md", title="T", notes=["note one"])
    text = path.read_text()
    assert text.startswith("# T\n")
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| method | time_mode | speedup | accuracy | note |"
    assert table[1] == "|---|---|---|---|---|"
    assert len(table) == 2 + len(ROWS)
    for line in table:  # every row has the header's cell count (the | in a value is escaped)
        assert line.replace("\\|", "").count("|") == 6
    assert "| tome | global | 1.5 | 0.9 | a\\|b |" in table


def test_plot_writes_a_png(tmp_path):
    path = results.plot_lines(ROWS, tmp_path / "p" / "plot.png", x="speedup", y="accuracy", line="method",
                              panel="time_mode", reference={"speedup": 1.0, "accuracy": 0.95})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200


def test_missing_suite_gives_a_clear_error():
    from benchmarks.__main__ import load_suite

    with pytest.raises(SystemExit, match="unknown suite"):
        load_suite("nope")


def test_readme_results_section_is_replaced_between_markers(tmp_path):
    from benchmarks import readme

    rows = [{"model": "m", "method": "none", "time_mode": "-", "target": 1.0, "tokens": 10, "gflops": 1.0,
             "accuracy": 0.9, "agreement": 1.0, "kl": 0.0, "speedup": 1.0, "acc_drop": 0.0},
            {"model": "m", "method": "tome", "time_mode": "global", "target": 0.5, "tokens": 10, "gflops": 0.5,
             "flops_ratio": 0.5, "accuracy": 0.8, "agreement": 0.85, "kl": 0.1, "speedup": 1.9, "acc_drop": 10.0}]
    results.write_json(rows, tmp_path / "quality.json", meta={"command": "python -m benchmarks quality", "cpu": "x"})
    (tmp_path / "ref" / "m").mkdir(parents=True)
    (tmp_path / "ref" / "m" / "training.json").write_text(json.dumps(
        {"held_out_accuracy": 0.9, "chance": 0.125, "steps": 5, "train_seconds": 1.0, "command": "train m"}))
    section = readme.quality_section(tmp_path, tmp_path / "ref")
    assert "80.0 (+10.0), 85.0, 1.90x" in section and "90.0% held-out" in section
    text = f"intro\n{readme.START}\nold figures\n{readme.END}\noutro\n"
    new = readme.replace_section(text, section)
    assert "old figures" not in new and new.startswith("intro\n") and new.endswith(f"{readme.END}\noutro\n")
    assert readme.replace_section(new, section) == new  # idempotent
    with pytest.raises(ValueError, match="no results markers"):
        readme.replace_section("no markers here", section)
    with pytest.raises(FileNotFoundError, match="run python -m benchmarks quality"):
        readme.quality_section(tmp_path / "missing", tmp_path / "ref")


@pytest.mark.parametrize("name", ["vivit", "videomae", "ast"])
def test_training_logits_are_the_models_own(name):
    # The training loop computes logits through the base model and head (to also get the mean-pooled
    # auxiliary logits); they must be exactly what the saved model's forward gives.
    from benchmarks import train_reference as tr

    recipe = tr.RECIPES[name]
    model = tr.build_model(recipe).eval()
    x, _ = recipe.batch(2, 3)
    logits, pooled = tr.logits_and_mean_pool(model, x)
    with torch.no_grad():
        assert torch.equal(logits, model(**{recipe.input_key: x}).logits)
    assert pooled.shape == logits.shape
    if name != "videomae":
        assert not torch.allclose(pooled, logits)


@pytest.mark.parametrize("size", ["quick", "next-quick"])
def test_llava_benchmark_smoke_run_fills_every_table(size):
    """The LLaVA benchmark on tiny models (seconds): it drives the adapter's internals, so it must follow them."""
    from benchmarks import llava as llava_bench

    rows = llava_bench.run(quick=True, size=size, repeats=1)
    tables = {row["table"] for row in rows}
    assert {"prefill", "reduction"} <= tables
    assert all(row.get("error") is None for row in rows)
    assert {row["batch"] for row in rows if row["table"] == "prefill"} == {1, 2}  # batch 1 and 8, capped by quick
    for row in (r for r in rows if r["table"] == "reduction"):  # through the public entry point only
        assert row["reduce_ops"] > 0 and row["tower_ops"] > 0 and row["tower_host_ms_meta"] > 0


def test_llava_benchmark_compiled_rows_and_batch_option():
    from benchmarks import llava as llava_bench

    rows = llava_bench.run(quick=True, size="quick", repeats=1, sections=("compiled",), batches=(1,))
    assert {row["mode"] for row in rows} == {"eager", "compiled (default)"} and all(r["prefill_ms"] > 0 for r in rows)
    with pytest.raises(ValueError, match="batches"):
        llava_bench.run(quick=True, size="quick", sections=("prefill",), batches=(0,))


# ------------------------------------------------------------------------------------------- padded clips
def test_padded_clips_keep_their_labels_and_their_events_in_the_real_part():
    from benchmarks import padding
    from mmmerge.adapters import audio

    p = tasks.audio_params(64, seed=3)
    real = torch.full((64,), 256)
    placed = tasks.place_audio_events(p, torch.maximum(tasks.needed_frames(p), real - 100), torch.Generator())
    assert torch.equal(tasks.audio_labels(placed), tasks.audio_labels(p))  # order, sweep and gap are kept
    whole, x, labels = padding.padded_batch(32, 128, seed=5)
    assert torch.equal(audio.real_lengths(x), torch.full((32,), 128))  # what the extractor's padding reads as
    assert torch.equal(x[:, :128], whole[:, :128]) and (x[:, 128:] == tasks.AUDIO_PAD_VALUE).all()
    q = padding.fitted_params(32, 128, seed=5)
    assert torch.equal(tasks.audio_labels(q), labels)
    end = (128 - 1) * 0.01 + 0.025  # the last real frame's end, seconds
    for name in ("low", "high", "chirp"):
        assert (q[f"{name}_c"] + q[f"{name}_d"] / 2 <= end).all() and (q[f"{name}_c"] - q[f"{name}_d"] / 2 >= 0).all()
    x, y = tasks.padded_audio_batch(64, seed=9)
    lengths = audio.real_lengths(x)
    assert (lengths == 256).any() and (lengths < 256).any() and y.shape == (64,)


def test_padding_benchmark_rows_on_a_tiny_ast():
    from benchmarks import padding
    from transformers import ASTConfig, ASTForAudioClassification

    torch.manual_seed(0)
    model = ASTForAudioClassification(ASTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                                intermediate_size=64, max_length=256, num_mel_bins=128,
                                                time_stride=16, frequency_stride=16, num_labels=8)).eval()
    whole, x, labels = padding.padded_batch(16, 128, seed=1)
    rows = {r["variant"]: r for r in padding.measure(model, whole, x, labels, 128, "tiny")}
    assert rows["padded"]["agreement"] == 1.0 and rows["keep"]["max_logit_diff"] == 0.0  # kept padding is exact
    assert rows["drop"]["tokens"] < rows["keep"]["tokens"] and rows["drop"]["gflops"] < rows["keep"]["gflops"]
    assert rows["drop"]["max_logit_diff"] > 0.0  # dropping the padding changes the outputs
    assert "| drop |" in padding.report(list(rows.values()))


def test_the_gpu_check_runs_its_kernel_and_merge_step_sections_on_the_cpu(tmp_path):
    """The prepared GPU script itself (``--quick``, tiny shapes): its JSON holds every row, none in error."""
    import json

    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--quick", "--repeats", "1", "--out", str(out), "--sections", "kernels", "merge_step"])
    sections = json.loads(out.read_text())["sections"]
    rows = sections["merge_step"]["rows"]
    assert {(r["method"], r["batch"]) for r in rows} == {(m, b) for m in ("tome", "pitome", "tps") for b in (1, 2)}
    assert not [r for r in rows if "error" in r] and "error" not in sections["merge_step"]
    assert sections["kernels"]["rows"][0].get("skipped")  # no CUDA here
